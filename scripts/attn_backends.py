"""The prefix LM's attention (bidirectional over the valid prefix: a key-padding mask only) under
every backend this torch offers, against kernels.mqa_attention as FastPi0 runs it. With the
padding at the end of the keys, the mask can be dropped by attending over the valid keys alone:
a slice for SDPA (one graph per key count) or `seqused_k` for FlashAttention's varlen kernel
(the count read on the device, one graph for any count). Prints us per call (CUDA-graph replays,
scripts/attn_tune._time_us) and the max |diff| against float32 math with the mask.

    PYTHONPATH=src:scripts python3 scripts/attn_backends.py [rows:valid ...]   # default 560:544 672:620
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from attn_tune import _time_us
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvreuse.model.kernels import mqa_attention

H, D = 8, 256


def _sdpa(backend, q, k, v, mask=None, gqa=False):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def cases(q, k, v, valid: int):
    """name -> fn returning (B, R, H*D). q (1, R, H, D), k / v (1, T, 1, D) strided views."""
    r, t = q.shape[1], k.shape[1]
    bias = torch.zeros(1, r, t, device=q.device)
    bias[..., valid:] = -2.3819763e38
    qh = q.transpose(1, 2)  # (1, H, R, D)
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # (1, 1, T, D)
    kv_ = kh[:, :, :valid], vh[:, :, :valid]
    kx, vx = (x.expand(1, H, valid, D) for x in kv_)
    kc, vc = kx.contiguous(), vx.contiguous()
    qf = q.reshape(1, r * H, 1, D).transpose(1, 2)  # heads folded into the rows: (1, 1, R*H, D)
    dense = bias[:, None].to(q.dtype)

    def heads(o):  # (1, H, R, D) -> (1, R, H*D)
        return o.transpose(1, 2).reshape(1, r, H * D)

    out = {
        "triton, dense mask (FastPi0 to round 13)": lambda: mqa_attention(q, k, v, bias),
        "triton, per-key mask (stride 0, FastPi0 now)": lambda: mqa_attention(q, k, v, bias[:, :1].expand(1, r, t)),
        "triton, valid keys only": lambda: mqa_attention(q, k[:, :valid], v[:, :valid], None),
        "cudnn, dense mask": lambda: heads(_sdpa(SDPBackend.CUDNN_ATTENTION, qh, kx, vx, dense[:, :, :, :valid]
                                                 .expand(1, H, r, valid))),
    }
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        out[f"{name}, valid keys, K/V expanded"] = lambda be=be: heads(_sdpa(be, qh, kx, vx))
        out[f"{name}, valid keys, K/V copied per head"] = lambda be=be: heads(_sdpa(be, qh, kc, vc))
        out[f"{name}, valid keys, enable_gqa"] = lambda be=be: heads(_sdpa(be, qh, *kv_, gqa=True))
        out[f"{name}, valid keys, heads folded into rows"] = (
            lambda be=be: _sdpa(be, qf, *kv_).reshape(1, r, H * D))
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return out
    cu_q = torch.tensor([0, r], device=q.device, dtype=torch.int32)
    cu_k = torch.tensor([0, t], device=q.device, dtype=torch.int32)
    used = torch.tensor([valid], device=q.device, dtype=torch.int32)
    q3, k3, v3 = q[0], k[0], v[0]  # (R, H, D), (T, 1, D)
    out["varlen, seqused_k"] = lambda: varlen_attn(q3, k3, v3, cu_q, cu_k, r, t, enable_gqa=True,
                                                  seqused_k=used).reshape(1, r, H * D)
    out["varlen, valid keys"] = lambda: varlen_attn(q3, k3[:valid].contiguous(), v3[:valid].contiguous(), cu_q,
                                                    cu_k.clamp(max=valid), r, valid,
                                                    enable_gqa=True).reshape(1, r, H * D)
    return out


def main() -> None:
    shapes = [tuple(int(x) for x in a.split(":")) for a in sys.argv[1:]] or [(560, 544), (672, 620)]
    dev, dt = "cuda", torch.bfloat16
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  heads {H} x {D}, one KV head, bf16")
    for r, valid in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, r, H, D, device=dev, dtype=dt, generator=g)
        buf = torch.randn(2, 1, r, 1, D, device=dev, dtype=dt, generator=g)
        k, v = buf[0], buf[1]
        ref = (torch.softmax(q.float().transpose(1, 2) @ k.float()[:, :valid, 0, None].transpose(1, 2).mT / D**0.5, -1)
               @ v.float()[:, :valid, 0, None].transpose(1, 2)).transpose(1, 2).reshape(1, r, H * D)
        print(f"\n{r} queries x {r} keys, {valid} valid\n| kernel | us / call | max abs diff vs fp32 |\n|---|---|---|")
        for name, fn in cases(q, k, v, valid).items():
            try:
                err = (fn().float() - ref).abs().max().item()
                print(f"| {name} | {_time_us(fn):.1f} | {err:.2e} |", flush=True)
            except Exception as exc:  # a backend can refuse the shape or the layout
                print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:90]} | |", flush=True)


if __name__ == "__main__":
    main()
