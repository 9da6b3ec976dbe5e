"""Triton split-K ("flash-decoding") attention for few KV heads shared by many query heads.

The action expert attends with R = 51 suffix tokens x H = 8 query heads over T ~ 850 keys of a
single KV head. Fused attention kernels parallelise over (batch, head, query block), which is a
handful of thread blocks here; the fp32 matmul route needs 5-6 kernels and fp32 copies of K/V.
This module folds the query heads of a KV head into the query axis (rows in (token, head) order,
so a row's token is row // G and the mask is shared by the heads of a token) and splits the keys
over `num_splits` programs:

1. `_split_kernel`, grid (B * Hkv, cdiv(R * G, BLOCK_M), splits): each program runs the online
   softmax over its key range and writes unnormalised fp32 partial outputs with their running
   max and sum (or, with one split, the normalised output directly);
2. `_combine_kernel` rescales the splits to a common max and writes the output in q's dtype,
   laid out (B, R, H * D) as the output projection wants it.

Only basic `tl` ops are used so that older Tritons (3.x as bundled with torch) compile it.
Triton is imported on the first call, not with this module: importing kvreuse never loads it
(machines without triton, the eager model), and TRITON_INTERPRET, which triton reads when it is
imported, can still be set by the CPU tests.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
triton = None  # set by _build(); the kernel bodies look `tl` up in these module globals
tl = None
_KERNELS: tuple | None = None

__all__ = ["HAVE_TRITON", "default_num_splits", "mqa_attention", "pdl_supported"]

_LOG2E = 1.4426950408889634


def _build() -> tuple:
    """Import triton and define the two kernels (and the helpers skinny_gemm shares), once."""
    global triton, tl, _KERNELS, _rows, _prefetch_l2, _pdl_enter  # kernels find helpers among the module globals
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _pdl_enter(PDL: tl.constexpr):
        """Programmatic dependent launch (sm_90+, kernels launched with launch_pdl=True): wait
        for the previous kernel to finish (its writes visible), then let the next one launch.
        Signalling only after the wait keeps every earlier kernel finished before a later one
        passes its own wait, so reading outputs of kernels further back stays safe; a kernel
        may only prefetch read-only data (weights) before calling this."""
        if PDL:  # (signalling before the wait: 8.6 vs 8.1 ms per 180 layers, later a tie)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _prefetch_l2(ptrs, mask, safe_ptr):
        """Ask L2 for the lines holding ptrs (masked lanes name safe_ptr): no registers, no wait."""
        p = tl.where(mask, ptrs, safe_ptr)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _rows(pid_bh, pid_r, M, G, HKV, BLOCK: tl.constexpr):
        """Query rows of this program: rows are (token, head-in-group) pairs of KV head pid_bh % HKV
        of batch row pid_bh // HKV."""
        rows = pid_r * BLOCK + tl.arange(0, BLOCK)
        return pid_bh // HKV, rows, rows < M, rows // G, (pid_bh % HKV) * G + rows % G

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, part_ptr, stat_ptr, out_ptr,
        R, T, M, G, HKV, S, keys_per_split,
        sq_b, sq_r, sq_h,
        sk_b, sk_t, sk_h,
        sv_b, sv_t, sv_h,
        sb_b, sb_r, sb_t,
        HAS_BIAS: tl.constexpr, KEY_BIAS: tl.constexpr, DIRECT: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, SCALE_LOG2: tl.constexpr,
    ):
        _pdl_enter(PDL)
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(2)
        b, rows, row_ok, tok, head = _rows(pid_bh, tl.program_id(1), M, G, HKV, BLOCK_M)
        kvh = pid_bh % HKV
        d = tl.arange(0, D)
        q = tl.load(
            q_ptr + b * sq_b + tok[:, None] * sq_r + head[:, None] * sq_h + d[None, :],
            mask=row_ok[:, None], other=0.0,
        )

        lo = pid_s * keys_per_split
        hi = tl.minimum(lo + keys_per_split, T)
        k_base = k_ptr + b * sk_b + kvh * sk_h
        v_base = v_ptr + b * sv_b + kvh * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            k = tl.load(k_base + n[:, None] * sk_t + d[None, :], mask=n_ok[:, None], other=0.0)
            if DOT_F32:  # interpreter only (see _dot_f32): same products, exact in fp32
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * SCALE_LOG2  # log2 units: exp2 below
            if HAS_BIAS:
                if KEY_BIAS:  # one bias per key, shared by every row: a vector, not a tile
                    bias = tl.load(bias_ptr + b * sb_b + n * sb_t, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                else:
                    bias = tl.load(
                        bias_ptr + b * sb_b + tok[:, None] * sb_r + n[None, :] * sb_t,
                        mask=row_ok[:, None] & n_ok[None, :], other=0.0,
                    ).to(tl.float32)
                # Clamp first: -2.38e38 * log2(e) overflows to -inf. -1e30 still underflows
                # exp2 to exactly 0 next to any unmasked key.
                s += tl.maximum(bias, -1.0e30) * 1.4426950408889634
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no key so far keeps m = -inf; exp2(-inf - 0) = 0 instead of NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * sv_t + d[None, :], mask=n_ok[:, None], other=0.0)
            p = p.to(v.dtype)  # P is rounded to v's dtype on either path
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new

        if DIRECT:
            # One split: normalise here and skip the combine kernel. Output (B, R, H*D) contiguous.
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            o = acc / l_safe[:, None]
            o_off = (b * R + tok[:, None]) * (HKV * G * D) + head[:, None] * D + d[None, :]
            tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            # Partials: part (B*Hkv, S, M, D), stat (2, B*Hkv, S, M) = (max, sum) in log2 units.
            slot = pid_bh * S + pid_s
            tl.store(part_ptr + (slot * M + rows[:, None]) * D + d[None, :], acc, mask=row_ok[:, None])
            tl.store(stat_ptr + slot * M + rows, m_i, mask=row_ok)
            tl.store(stat_ptr + tl.num_programs(0) * S * M + slot * M + rows, l_i, mask=row_ok)

    @triton.jit
    def _combine_kernel(
        part_ptr, stat_ptr, out_ptr,
        R, M, G, HKV,
        S: tl.constexpr, PDL: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr,
    ):
        _pdl_enter(PDL)
        pid_bh = tl.program_id(0)
        b, rows, row_ok, tok, head = _rows(pid_bh, tl.program_id(1), M, G, HKV, BLOCK_R)
        d = tl.arange(0, D)
        l_off = tl.num_programs(0) * S * M  # the sums follow the maxima in `stat`

        m_g = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for s in tl.static_range(S):  # unrolled (S is a constexpr): all splits' loads in flight at once
            m_s = tl.load(stat_ptr + (pid_bh * S + s) * M + rows, mask=row_ok, other=float("-inf"))
            m_g = tl.maximum(m_g, m_s)
        # A split whose keys were all masked has max -inf (or ~ -1.4e30): weight exactly 0.
        m_g = tl.where(m_g == float("-inf"), 0.0, m_g)
        l_g = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        for s in tl.static_range(S):
            slot = pid_bh * S + s
            m_s = tl.load(stat_ptr + slot * M + rows, mask=row_ok, other=float("-inf"))
            l_s = tl.load(stat_ptr + l_off + slot * M + rows, mask=row_ok, other=0.0)
            w = tl.exp2(m_s - m_g)
            l_g += w * l_s
            a = tl.load(part_ptr + (slot * M + rows[:, None]) * D + d[None, :], mask=row_ok[:, None], other=0.0)
            acc += a * w[:, None]
        l_g = tl.where(l_g > 0.0, l_g, 1.0)
        o = acc / l_g[:, None]
        o_off = (b * R + tok[:, None]) * (HKV * G * D) + head[:, None] * D + d[None, :]
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    _KERNELS = (_split_kernel, _combine_kernel)
    return _KERNELS


def _dot_f32(kernel, dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter multiplies bfloat16 dot operands as their raw uint16 bits (seen in
    3.9), so there the operands are widened first; bf16 x bf16 products are exact in fp32, so this
    computes what the GPU's bf16 tl.dot with fp32 accumulation computes."""
    return dtype == torch.bfloat16 and type(kernel).__name__ == "InterpretedFunction"


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs an sm_90+ GPU and a Triton with launch_pdl and the
    gdc intrinsics (3.4+); never under the CPU interpreter."""
    if device.type != "cuda" or not HAVE_TRITON or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        import triton.language.extra.cuda as tlc
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return hasattr(tlc, "gdc_wait") and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def pdl_kwargs(pdl: bool) -> dict:
    """Launch options for a kernel that calls _pdl_enter(PDL=pdl)."""
    return {"launch_pdl": True} if pdl else {}


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter / CPU: pretend an H100 so tests exercise the same split choice


def default_block_m(heads: int, m: int, sm_count: int) -> int:
    """Query rows per program for m rows per KV head: 64 from 1024 rows (the prefix LM); below, 16,
    or 32 once 16-row tiles over all `heads` (batch x KV heads) would number more than a quarter
    of the SMs. Pi0's expert at batch 1
    (26 tiles of 16) keeps 16; at batch 2, 32-row tiles (26 of them, 5 key splits) ran the
    attention in 12.9-13.3 us against 17.4 for 16-row tiles (2 splits) or 14.5 (4 splits) on an
    H100 (chain_micro.py BATCH=2 SWEEP=asplits2, round 18)."""
    if m >= 1024:
        return 64
    return 16 if heads * -(-m // 16) <= sm_count // 4 else 32


def default_num_splits(tiles: int, n_key_blocks: int, target_programs: int) -> int:
    """Splits so that tiles * splits ~ target_programs, at most one split per key block."""
    return max(1, min(n_key_blocks, target_programs // max(tiles, 1)))


def mqa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    num_splits: int | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
    combine_rows: int = 4,
    combine_warps: int = 4,
    scale: float | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v with fp32 softmax and accumulation (P is cast to v's dtype
    for the second matmul, as in flash attention).

    q (B, R, H, D); k, v (B, T, Hkv, D) with H % Hkv == 0 (Pi0: Hkv = 1); any strides as long as
    the last dim is contiguous (views of a bigger K/V buffer are fine). D: a power of two >= 16.
    bias: (B, R, T) additive (anything broadcastable to it, e.g. stride-0 expands; any float dtype),
    shared by the heads of a token; masked keys get a large negative (-2.38e38, -1e30, -inf) and
    contribute exactly 0 as long as the row has an unmasked key. None: no mask. A bias whose row
    stride is 0 (one value per key, as the prefix LM's padding mask) is read as a vector per key
    block instead of a rows x keys tile.
    Returns (B, R, H*D) in q.dtype. scale defaults to 1/sqrt(D). (float32 inputs: tl.dot's
    default precision on the GPU is TF32.)

    num_splits: key splits per query tile (None: enough for ~1 program per SM). block_m (query
    rows per program, >= 16; None: default_block_m),
    block_n (keys per step, >= 16), num_warps / num_stages (split kernel), combine_rows /
    combine_warps (combine kernel) are tuning knobs. Defaults: the H200 tunes
    (scripts/attn_tune.py). Pi0's expert shape at batch 1 (R*H = 408, T = 611, D = 256): 16-row x
    64-key tiles, 8 warps, 26 row tiles x 5 splits = 130 programs, 9.9 us (32-row tiles: 10.9);
    round 5 (combine's split loop unrolled, 4 rows per combine program): 9.2 us with PDL.
    From 1024 query rows on (the prefix LM: R*H = 4480, T = 560): 64-row tiles, 4 warps, one
    split (70 programs, no combine): 20.7 us, vs 50 us for SDPA (cuDNN) on the same shape
    (2 or 3 splits: 22-24 us).
    Offline sm_90 compiles (Triton 3.5.1 and 3.9, not timed): 64/32/8 warps/2 stages uses wgmma,
    ~180 registers, no spills, 104 KiB shared memory; 64/64 spills, and 64/64 with 3 stages
    needs 256 KiB of shared memory (more than an H100 has).

    pdl: launch both kernels with programmatic dependent launch (see pdl_supported; sm_90+).
    """
    if not HAVE_TRITON:
        raise RuntimeError("mqa_attention needs triton (pip install triton); use the PyTorch attention path instead")
    try:
        split_kernel, combine_kernel = _build()
    except ImportError as e:
        raise RuntimeError(f"mqa_attention needs a working triton: {e}") from e
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-d q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, r, h, d = q.shape
    _, t, hkv, _ = k.shape
    if k.shape != (b, t, hkv, d) or v.shape != k.shape:
        raise ValueError(f"k, v must be (B, T, Hkv, D) = {(b, t, hkv, d)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if h % hkv:
        raise ValueError(f"query heads {h} not a multiple of KV heads {hkv}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    g = h // hkv
    m = r * g  # query rows per KV head
    big = m >= 1024
    if block_m is None:
        block_m = default_block_m(b * hkv, m, _sm_count(q.device))
    for name, x in (("block_m", block_m), ("block_n", block_n), ("combine_rows", combine_rows)):
        if x < 1 or x & (x - 1) or (name != "combine_rows" and x < 16):
            raise ValueError(f"{name}={x} must be a power of two (>= 16 for the tl.dot blocks)")
    # Kernels assume a unit stride on the last dim; anything else is copied once.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))

    tiles = triton.cdiv(m, block_m)
    n_blocks = triton.cdiv(t, block_n)
    if num_splits is None:  # many query rows: enough row tiles already, and no combine kernel
        num_splits = 1 if big else default_num_splits(b * hkv * tiles, n_blocks, _sm_count(q.device))
    # Whole key blocks per split; recount so that no split is empty.
    blocks_per_split = triton.cdiv(n_blocks, max(1, min(num_splits, n_blocks)))
    keys_per_split = blocks_per_split * block_n
    splits = triton.cdiv(t, keys_per_split)

    if bias is None:
        bias_t, sb = q, (0, 0, 0)  # never read (HAS_BIAS is False)
    else:
        bias_t = bias.expand(b, r, t)
        sb = bias_t.stride()
    out = torch.empty(b, r, h * d, device=q.device, dtype=q.dtype)
    direct = splits == 1
    if direct:
        part = stat = out  # unused
    else:
        part = torch.empty(b * hkv, splits, m, d, device=q.device, dtype=torch.float32)
        stat = torch.empty(2, b * hkv, splits, m, device=q.device, dtype=torch.float32)
    if num_warps is None:
        # A BLOCK_M x D fp32 accumulator of 8192+ elements spills with 4 warps (sm_90 cubins);
        # 16 x 256 tiles also ran faster with 8 (H200 tune; Pi0's 611 keys, two key blocks per
        # split), but with 4 over three (Pi0.5's 722 and 762 keys on an H100: 9.7 vs 10.7 and 9.9
        # vs 10.6 us; attn_tune.py, round 14). (Pi0.5's 626 keys, two blocks per split, also
        # preferred 4 there, 8.7 vs 9.2 us: the split is not the whole story.)
        wide = d * block_m >= 4096 and blocks_per_split <= 2
        num_warps = 4 if big and block_m <= 64 else 8 if wide else 4
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    split_kernel[(b * hkv, tiles, splits)](
        q, k, v, bias_t, part, stat, out,
        r, t, m, g, hkv, splits, keys_per_split,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        sb[0], sb[1], sb[2],
        HAS_BIAS=bias is not None, KEY_BIAS=sb[1] == 0, DIRECT=direct, DOT_F32=_dot_f32(split_kernel, q.dtype), PDL=pdl,
        BLOCK_M=block_m, BLOCK_N=block_n, D=d,
        SCALE_LOG2=scale * _LOG2E,  # constexpr: a float argument becomes fp64 under inductor
        num_warps=num_warps, num_stages=num_stages, **pdl_kwargs(pdl),
    )
    if not direct:
        combine_kernel[(b * hkv, triton.cdiv(m, combine_rows))](
            part, stat, out, r, m, g, hkv,
            S=splits, PDL=pdl, BLOCK_R=combine_rows, D=d, num_warps=combine_warps, **pdl_kwargs(pdl),
        )
    return out
