"""Could the prefix LM's gate/up product carry its gated GELU in the epilogue? Times a Triton GEMM
act = gelu_tanh(x Wg^T) * (x Wu^T) (a program computes the gate and up tiles of the same output
columns and writes only their product, so the (M, 2F) product never reaches memory) over a grid
of tilings, with pointer loads and with TMA descriptors, against what FastPi0 runs: cuBLAS's
product over the fused [gate | up] weight, then inductor's gelu * up kernel (here torch's
eager ops, which the bench's compile fuses into one kernel). CUDA-graph replays
(scripts/attn_tune._time_us); max |diff| against the float32 product rounded once.

    PYTHONPATH=src:scripts python3 scripts/gated_gemm_tune.py [rows ...] [--grid2]    # default 560 672
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from attn_tune import _time_us

K, FF = 2048, 16384  # Gemma 2B: width, MLP width


@triton.jit
def _gelu_tanh(g):
    # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh through exp2 (no tl.tanh in 3.x)
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    t = 2.0 / (1.0 + tl.exp2(-2.8853900817779268 * u)) - 1.0
    return 0.5 * g * (1.0 + t)


@triton.jit
def _ptr_kernel(x_ptr, w_ptr, out_ptr, M, N, KD, F_OFF,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, M_TILES: tl.constexpr):
    pid = tl.program_id(0)
    pid_n, pid_m = pid // M_TILES, pid % M_TILES  # the M tiles of one weight tile run together
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    xp = x_ptr + rm[:, None] * KD + rk[None, :]
    gp = w_ptr + rn[:, None] * KD + rk[None, :]
    up = gp + F_OFF * KD
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    m_ok = rm[:, None] < M
    for _ in range(0, KD, BK):
        a = tl.load(xp, mask=m_ok, other=0.0)
        acc_g = tl.dot(a, tl.trans(tl.load(gp)), acc_g)
        acc_u = tl.dot(a, tl.trans(tl.load(up)), acc_u)
        xp += BK
        gp += BK
        up += BK
    o = (_gelu_tanh(acc_g) * acc_u).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], o, mask=m_ok)


@triton.jit
def _tma_kernel(x_desc, w_desc, o_desc, F_OFF, KD,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, M_TILES: tl.constexpr):
    pid = tl.program_id(0)
    pid_n, pid_m = pid // M_TILES, pid % M_TILES
    om, on = pid_m * BM, pid_n * BN
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, KD, BK):
        a = x_desc.load([om, k])
        acc_g = tl.dot(a, w_desc.load([on, k]).T, acc_g)
        acc_u = tl.dot(a, w_desc.load([F_OFF + on, k]).T, acc_u)
    o_desc.store([om, on], (_gelu_tanh(acc_g) * acc_u).to(o_desc.dtype))


def gated_ptr(x, w, out, bm, bn, bk, warps, stages):
    m = x.shape[0]
    mt = triton.cdiv(m, bm)
    _ptr_kernel[(mt * (FF // bn),)](x, w, out, m, FF, K, FF, BM=bm, BN=bn, BK=bk, M_TILES=mt,
                                    num_warps=warps, num_stages=stages)
    return out


def gated_tma(x, w, out, bm, bn, bk, warps, stages):
    from triton.tools.tensor_descriptor import TensorDescriptor

    m = x.shape[0]
    mt = triton.cdiv(m, bm)
    xd = TensorDescriptor.from_tensor(x, [bm, bk])
    wd = TensorDescriptor.from_tensor(w, [bn, bk])
    od = TensorDescriptor.from_tensor(out, [bm, bn])
    _tma_kernel[(mt * (FF // bn),)](xd, wd, od, FF, K, BM=bm, BN=bn, BK=bk, M_TILES=mt,
                                    num_warps=warps, num_stages=stages)
    return out


# Round 14's first grid (h100_r14_gated_gemm_tune.log), then one around its best (64 x 128, TMA).
GRID = {"ptr": ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4),
                (64, 128, 64, 4, 4), (128, 128, 32, 8, 5), (128, 256, 64, 8, 3), (64, 64, 64, 4, 5)),
        "tma": ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4),
                (64, 128, 64, 4, 4), (128, 128, 32, 8, 5), (128, 256, 64, 8, 3), (64, 64, 64, 4, 5))}
GRID2 = {"ptr": ((64, 128, 64, 4, 3), (64, 128, 64, 4, 5), (64, 128, 128, 4, 3)),
         "tma": ((64, 128, 64, 4, 3), (64, 128, 64, 4, 5), (64, 128, 64, 4, 6), (64, 128, 128, 4, 2),
                 (64, 128, 128, 4, 3), (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (64, 256, 64, 8, 4),
                 (64, 256, 32, 8, 6), (128, 128, 64, 8, 2))}


def main() -> None:
    global GRID
    if "--grid2" in sys.argv:
        sys.argv.remove("--grid2")
        GRID = GRID2
    rows = [int(a) for a in sys.argv[1:]] or [560, 672]
    dev, dt = "cuda", torch.bfloat16
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(2 * FF, K, device=dev, generator=g) * 0.02).to(dt)  # nn.Linear layout [gate | up]
    for m in rows:
        x = torch.randn(m, K, device=dev, generator=g).to(dt)
        gu = x.float() @ w.float().t()
        ref = F.gelu(gu[:, :FF], approximate="tanh") * gu[:, FF:]
        out = torch.empty(m, FF, device=dev, dtype=dt)

        def cublas(x=x):
            y = F.linear(x, w)
            return F.gelu(y[:, :FF], approximate="tanh") * y[:, FF:]

        def cublas_only(x=x):
            return F.linear(x, w)

        print(f"\n{m} rows x {K} -> 2 x {FF}\n| route | us / call | max abs diff vs fp32 |\n|---|---|---|")
        for name, fn in (("cuBLAS product + torch gelu * up", cublas), ("cuBLAS product alone (bound)", cublas_only)):
            err = (fn().float() - ref).abs().max().item() if fn is cublas else float("nan")
            print(f"| {name} | {_time_us(fn):.1f} | {err:.2e} |", flush=True)
        for kind, fn in (("ptr", gated_ptr), ("tma", gated_tma)):
            for bm, bn, bk, warps, stages in GRID[kind]:
                name = f"triton {kind} {bm}x{bn}x{bk} w{warps} s{stages}"
                try:
                    call = lambda fn=fn, c=(bm, bn, bk, warps, stages), x=x, out=out: fn(x, w, out, *c)
                    err = (call().float() - ref).abs().max().item()
                    print(f"| {name} | {_time_us(call):.1f} | {err:.2e} |", flush=True)
                except Exception as exc:  # shared memory / registers, or no TMA support
                    print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | |", flush=True)


if __name__ == "__main__":
    main()
