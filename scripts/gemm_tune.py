"""Times the action expert's per-layer-step products (51 rows, bf16) on one CUDA GPU, each against
its torch (cuBLAS + elementwise kernels) equivalent, over a grid of tilings; CUDA-graph replays of
20 calls each. Prints us per call and the achieved weight-streaming rate (weights dominate the bytes).

- qkv side: rms_norm -> QKV -> rotary -> K/V cache write, vs rms_norm + skinny_gemm.fused_qkv;
- mlp in: rms_norm -> gate/up -> gelu(gate) * up, vs rms_norm + skinny_linear(gated_gelu=True);
- o / down: addmm with the residual, vs skinny_linear(residual=) (split-K).

    python scripts/gemm_tune.py
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from attn_tune import _time_us  # same CUDA-graph timing

from kvreuse.model.skinny_gemm import fused_qkv, skinny_linear

EPS = 1e-6


def _row(name, variant, us, wbytes, diff):
    print(f"| {name} | {variant} | {us:.1f} | {wbytes / (us * 1e-6) / 1e12:.2f} | {diff:.2e} |")


def _grid(name, wbytes, ref, make, grid):
    for cfg in grid:
        try:
            fn = make(*cfg)
            diff = (fn().float() - ref.float()).abs().max().item()
            _row(name, " ".join(map(str, cfg)), _time_us(fn), wbytes, diff)
        except Exception as exc:  # noqa: BLE001 — some tiles exceed shared memory / registers
            print(f"| {name} | {cfg} | failed: {type(exc).__name__}: {str(exc)[:60]} | | |")


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    m, w, h, hkv, d, f, t = 51, 1024, 8, 1, 256, 4096, 611
    print(torch.cuda.get_device_name())
    print("| product | variant (block_n block_k warps stages [split]) | us / call | weight TB/s | max abs diff vs torch |")
    print("|---|---|---|---|---|")

    # qkv side
    x = rnd(1, m, w)
    wq = rnd((h + 2 * hkv) * d, w) / w**0.5
    norm1p = 1 + 0.1 * rnd(w)
    kb, vb = torch.zeros(1, t, hkv, d, device=dev, dtype=dt), torch.zeros(1, t, hkv, d, device=dev, dtype=dt)
    ang = torch.arange(m, device=dev).float()[:, None] * (1e-4 ** (torch.arange(0, d, 2, device=dev).float() / d))
    cos_h, sin_h = ang.cos().contiguous(), ang.sin().contiguous()
    cos, sin = torch.cat([cos_h, cos_h], -1)[None, :, None], torch.cat([-sin_h, sin_h], -1)[None, :, None]
    start = t - m

    def torch_qkv():
        qkv = F.linear(F.rms_norm(x, (w,), norm1p, EPS), wq)
        qk = qkv[..., : (h + hkv) * d].view(1, m, h + hkv, d)
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin).to(dt)
        kb[:, start:].copy_(qk[:, :, h:])
        vb[:, start:].copy_(qkv[..., (h + hkv) * d :].view(1, m, hkv, d))
        return qk[:, :, :h]

    ref = torch_qkv()
    wq_t = wq.t()
    name = f"qkv side {m}x{w} @ {w}x{wq.shape[0]}"
    _row(name, "torch (norm, linear, rope, copies)", _time_us(torch_qkv), wq.numel() * 2, 0.0)
    _grid(name, wq.numel() * 2, ref,
          lambda bn, bk, nw, ns: lambda: fused_qkv(F.rms_norm(x, (w,), norm1p, EPS), wq_t, kb, vb, start, cos_h, sin_h,
                                                   h, hkv, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns),
          itertools.product((16, 32), (64, 128), (4, 8), (3, 4)))

    # mlp in
    wgu = rnd(2 * f, w) / w**0.5

    def torch_mlp_in():
        gu = F.linear(F.rms_norm(x, (w,), norm1p, EPS), wgu)
        return F.gelu(gu[..., :f], approximate="tanh") * gu[..., f:]

    ref = torch_mlp_in()
    wgu_t = wgu.t()
    name = f"mlp in {m}x{w} @ {w}x{2 * f}"
    _row(name, "torch (norm, linear, gelu*up)", _time_us(torch_mlp_in), wgu.numel() * 2, 0.0)
    _grid(name, wgu.numel() * 2, ref,
          lambda bn, bk, nw, ns: lambda: skinny_linear(F.rms_norm(x, (w,), norm1p, EPS), wgu_t, gated_gelu=True,
                                                       block_n=bn, block_k=bk, num_warps=nw, num_stages=ns),
          itertools.product((32, 64), (64, 128), (4, 8), (3, 4)))

    # residual products
    for k_in, kind in ((h * d, "o"), (f, "down")):
        a, res = rnd(1, m, k_in), rnd(1, m, w)
        wt = (rnd(w, k_in) / k_in**0.5).t()
        ref = torch.addmm(res.view(m, w), a.view(m, k_in), wt).view(1, m, w)
        name = f"{kind} {m}x{k_in} @ {k_in}x{w} + residual"
        _row(name, "torch addmm", _time_us(lambda a=a, wt=wt, res=res: torch.addmm(res.view(m, w), a.view(m, -1), wt)),
             wt.numel() * 2, 0.0)
        _grid(name, wt.numel() * 2, ref,
              lambda bn, bk, nw, ns, sk, a=a, wt=wt, res=res: lambda: skinny_linear(
                  a, wt, residual=res, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, split_k=sk),
              itertools.product((32,), (64, 128), (4,), (3, 4), (4, 8)))


if __name__ == "__main__":
    main()
