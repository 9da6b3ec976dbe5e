"""Times the action expert's four products per layer-step (51 rows, bf16) on one CUDA GPU:
torch (cuBLAS, as FastPi0 runs them by default, epilogues as separate kernels) against
skinny_gemm.skinny_linear over a grid of tiles / split-K, with CUDA-graph replays of 20 calls
each. Prints us per call and the achieved weight-streaming rate (weights dominate the bytes).

    python scripts/gemm_tune.py
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from attn_tune import _time_us  # same CUDA-graph timing

from kvreuse.model.skinny_gemm import expert_shapes, skinny_linear


def _torch_ref(kind: str, x, w, res):
    if kind == "gated_gelu":
        gu = x @ w
        f = w.shape[1] // 2
        return F.gelu(gu[:, :f], approximate="tanh") * gu[:, f:]
    if kind == "residual":
        return torch.addmm(res, x, w)
    return x @ w


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    print(torch.cuda.get_device_name())
    print("| product | variant | us / call | weight TB/s | max abs diff vs torch |\n|---|---|---|---|---|")
    for m, k, n, kind in expert_shapes():
        x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
        w = torch.randn(k, n, device=dev, dtype=dt, generator=g) / k**0.5
        out_n = n // 2 if kind == "gated_gelu" else n
        res = torch.randn(m, out_n, device=dev, dtype=dt, generator=g)
        ref = _torch_ref(kind, x, w, res)
        tb = lambda us, w=w: w.numel() * w.element_size() / (us * 1e-6) / 1e12
        name = f"{m}x{k} @ {k}x{n} {kind}"
        us = _time_us(lambda x=x, w=w, res=res, kind=kind: _torch_ref(kind, x, w, res))
        print(f"| {name} | torch | {us:.1f} | {tb(us):.2f} | 0 |")
        kw = {"residual": res} if kind == "residual" else {"gated_gelu": kind == "gated_gelu"}
        for bn, bk, sk, warps in itertools.product((32, 64, 128), (64, 128), (None, 1, 2, 4), (4, 8)):
            try:
                fn = lambda x=x, w=w, kw=kw, bn=bn, bk=bk, sk=sk, warps=warps: skinny_linear(
                    x, w, split_k=sk, block_n=bn, block_k=bk, num_warps=warps, **kw)
                diff = (fn().float() - ref.float()).abs().max().item()
                us = _time_us(fn)
                print(f"| {name} | n{bn} k{bk} split {sk or 'auto'} w{warps} | {us:.1f} | {tb(us):.2f} | {diff:.2e} |")
            except Exception as exc:  # noqa: BLE001 — some tiles exceed shared memory / registers
                print(f"| {name} | n{bn} k{bk} split {sk or 'auto'} w{warps} | failed: {type(exc).__name__} | | |")


if __name__ == "__main__":
    main()
