"""Times the action expert's attention at Pi0's full-size shape on one CUDA GPU: the fp32 batched
matmul path and SDPA (what FastPi0 offers) against kernels.mqa_attention over a grid of block
sizes / splits / warps. CUDA-graph replays of 20 calls each, so launch overhead is excluded as it
is in the runtime. Prints one row per configuration (median us per call, max |diff| vs fp32 math).

    python scripts/attn_tune.py [--keys 611] [--queries 51]
    python scripts/attn_tune.py --prefix     # the prefix LM's shape (560 x 560) and a grid for it
    python scripts/attn_tune.py --siglip     # SigLIP's attention (2 images x 16 heads x 256 x 72) per SDPA backend
    python scripts/attn_tune.py --update 100 # a prefix update: 100 recomputed tokens over the prefix's 560 keys
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from kvreuse.model.fast import _mqa
from kvreuse.model.kernels import default_block_m, mqa_attention


def _time_us(fn, reps: int = 20, trials: int = 15, return_out: bool = False):
    """Median us per call of `reps` calls of fn captured in one CUDA graph (after a warm-up call,
    which also compiles); with return_out, also the last captured call's output (valid after a
    replay). The other tuning scripts import this."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            res = fn()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    us = statistics.median(times)
    return (us, res) if return_out else us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=611)  # Pi0, 2 cameras: 560 prefix + 51 suffix
    ap.add_argument("--queries", type=int, default=51)
    ap.add_argument("--prefix", action="store_true", help="560 queries x 560 keys, bigger row tiles")
    ap.add_argument("--prefix-rows", type=int, default=560, help="the prefix shape's rows (Pi0.5's bench: 672)")
    ap.add_argument("--prefix-small", action="store_true",
                    help="the prefix shape with 16 / 32-row tiles, one split (round 6: 64-row tiles fill only 70 SMs)")
    ap.add_argument("--mask-bound", action="store_true",
                    help="only the default tiling with its per-row mask, a stride-0 (per-key) mask and none (a bound)")
    ap.add_argument("--siglip", action="store_true", help="SigLIP's attention under each SDPA backend")
    ap.add_argument("--update", type=int, default=0,
                    help="this many queries over the prefix's keys (--prefix-rows) with its per-key mask, as a "
                         "partial prefix update runs it; the expert's grid")
    a = ap.parse_args()
    if a.siglip:
        return siglip()
    if a.prefix or a.prefix_small:
        a.keys = a.queries = a.prefix_rows
    if a.update:
        a.keys, a.queries = a.prefix_rows, a.update
    dev, dt = "cuda", torch.bfloat16
    h, d, r, t = 8, 256, a.queries, a.keys
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, r, h, d, device=dev, dtype=dt, generator=g)
    buf = torch.randn(2, 1, t + 64, 1, d, device=dev, dtype=dt, generator=g)
    k, v = buf[0, :, :t], buf[1, :, :t]  # strided views, as the runtime's cache buffer
    bias = torch.zeros(1, r, t, device=dev)
    bias[:, :, t - r - 20 : t - r] = -2.3819763e38  # prompt padding
    bias[:, 0, t - r + 1 :] = -2.3819763e38  # Pi0: the state token does not see the actions
    if a.prefix or a.prefix_small or a.update:  # since round 14: the prefix's padding mask, one value per key
        bias = torch.zeros(1, 1, t, device=dev)
        bias[..., t - 16 :] = -2.3819763e38
        bias = bias.expand(1, r, t)
    folded = bias[:, None, :, None, :].expand(1, 1, r, h, t).reshape(1, 1, r * h, t)
    ref = _mqa(q.float(), k.float(), v.float(), folded, "math")
    print(f"{torch.cuda.get_device_name()}  q {tuple(q.shape)}  k/v {tuple(k.shape)}  bf16")
    if a.mask_bound:  # round 5: what the mask costs the Triton kernel (no PDL here)
        for name, b in (("per-row mask", bias), ("per-key mask, stride 0", bias[:, :1].expand_as(bias)),
                        ("no mask (bound, wrong numbers)", None)):
            print(f"| default tiling, {name} | {_time_us(lambda b=b: mqa_attention(q, k, v, b)):.1f} |")
        return
    print("| config | us / call | max abs diff vs fp32 math |\n|---|---|---|")
    bm = default_block_m(1, r * h, torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"| triton default (block_m {bm}) | {_time_us(lambda: mqa_attention(q, k, v, bias)):.1f} | |")
    for kind in ("fp32", "sdpa", "efficient", "cudnn"):
        try:
            fn = lambda kind=kind: _mqa(q, k, v, folded if kind == "fp32" else folded.to(dt), kind)
            print(f"| {kind} | {_time_us(fn):.1f} | {(fn().float() - ref).abs().max():.2e} |")
        except Exception as exc:  # a backend can refuse the shape
            print(f"| {kind} | failed: {type(exc).__name__} | |")
    # Round 3: smaller row tiles and fewer splits (the combine kernel cost 4.8 us of 10.8 in the
    # round-2 profile), and the combine kernel's rows per program.
    grid = itertools.product((16, 32), (32, 64), (None, 1, 2, 3, 4, 6, 10), (4, 8), (2,), (8, 32))
    if a.prefix:  # round 4: thousands of query rows, so bigger row tiles and few splits
        grid = itertools.product((64, 128), (32, 64), (1, 2, 3), (4, 8), (2, 3), (4, 8))
    if a.prefix_small:
        grid = [(64, 64, 1, 4, 2, 8), *itertools.product((16, 32), (32, 64), (1,), (4, 8), (2, 3), (8,))]
    for bm, bn, splits, warps, stages, crows in grid:
        if splits == 1 and crows != 8:
            continue  # no combine kernel with one split
        fn = lambda bm=bm, bn=bn, splits=splits, warps=warps, stages=stages, crows=crows: mqa_attention(
            q, k, v, bias, splits, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, combine_rows=crows)
        name = f"triton m{bm} n{bn} splits {splits or 'auto'} w{warps} s{stages} c{crows}"
        try:
            print(f"| {name} | {_time_us(fn):.1f} | {(fn().float() - ref).abs().max():.2e} |")
        except Exception as exc:  # out of shared memory / registers for some tiles
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | |")


def siglip(n: int = 2, p: int = 256, heads: int = 16, d: int = 72) -> None:
    """SigLIP's attention as FastPi0's `_siglip_layer` calls it (views of one fused QKV output,
    no mask), under each SDPA backend; PyTorch's own pick is "sdpa"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = torch.randn(n, p, 3, heads, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    print(f"{torch.cuda.get_device_name()}  SigLIP attention q {tuple(q.shape)} bf16")
    print("| backend | us / call | max abs diff vs fp32 |\n|---|---|---|")
    backends = {"sdpa": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    for name, backend in backends.items():
        def fn(backend=backend):
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        try:
            print(f"| {name} | {_time_us(fn):.1f} | {(fn().float() - ref).abs().max():.2e} |")
        except Exception as exc:  # a backend can refuse the shape
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | |")


if __name__ == "__main__":
    main()
