"""Triton GEMM for skinny inputs: x (M <= 256 rows) @ w (K, N), streaming w once.

The action expert multiplies only M = 51 rows (B = 1 x 51 tokens) by each of its weights, so its
products are weight-bandwidth bound, and cuBLAS's tilings for them leave most of the bandwidth
unused. Here every program owns a BLOCK_N slice of the output columns for ALL rows (BLOCK_M >= M)
and reads its slice of w over its K range exactly once; where N / BLOCK_N gives too few programs
to keep every SM streaming, K is split as well:

1. `_gemm_kernel`, grid (cdiv(N_out, BLOCK_N), splits): fp32 accumulation over the program's K
   range; with one split the epilogue (bias, gated GELU, residual, cast) runs here and the output
   is written directly, otherwise the fp32 partial sums go to a (splits, M, N) buffer;
2. `_reduce_kernel` (splits > 1 only) sums the partials in split order (deterministic, no atomics
   and no zeroed buffer) and runs the same epilogue.

gated_gelu: w holds [gate | up] columns (2F of them); a program loads the matching gate and up
tiles (columns n and F + n) and writes gelu_tanh(gate) * up, so the (M, 2F) product never
reaches memory.

`fused_qkv` (`_qkv_kernel`) is the attention block's input side in one kernel: the fused [q | k | v]
product, rotate-half rotary on q and k (a program owns column pairs i, i + D/2 of one head, loaded as
two weight tiles like gate / up) and the K/V write into the runtime's cache buffer. Both kernels share
the K loop (`_mainloop`). FastPi0(expert_gemm=...) uses them for the action expert
(docs/PERFORMANCE.md, round 3).

`skinny_linear(norm=RowNorm(...))` also returns the RMS norm of each output row, computed by the
reduce kernel (programs then own whole rows), so the expert's norms cost no kernel of their own.
`pdl=True` (sm_90, see kernels.pdl_supported) launches the kernels with programmatic dependent
launch: each waits for its predecessor on the GPU, so in a CUDA graph a launch overlaps the previous
kernel's tail; fused_qkv also prefetches its weights into L2 before waiting (round 4).

No host syncs (CUDA-graph capturable); only basic `tl` ops so older Tritons (3.x) compile it (PDL
and the prefetch, which use gdc / inline PTX, only when asked).
Triton is imported on the first call, as in kernels.py, so importing this module never loads it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kvreuse.model import kernels
from kvreuse.model.kernels import HAVE_TRITON, _dot_f32, _sm_count, pdl_kwargs

triton = None  # set by _build(); the kernel bodies look `tl` up in these module globals
tl = None
_KERNELS: tuple | None = None

__all__ = [
    "HAVE_TRITON", "RowNorm", "SkinnyConfig", "default_config", "expert_shapes", "fused_qkv", "skinny_linear", "split_plan",
]

MAX_M = 256  # rows a program holds at once (batch 1-4 of the experts' 50-51 suffix rows)
# Rows FastPi0 sends through these kernels by default: batch 1 and 2. H100 A/Bs against cuBLAS
# (scripts/fast_ab.py --batch, docs/PERFORMANCE.md round 18): at batch 2 the hit 11.4-11.9 ->
# 9.3-9.6 ms (Pi0 and Pi0.5); at batch 4 (200-204 rows) Pi0's hit 0.6 ms faster, Pi0.5's
# 0.6-0.9 ms slower, so 256-row tiles stay opt-in (FastPi0(skinny_rows=256)).
SKINNY_ROWS = 128
# Shared memory the main loop's stages may take: the x tile grows with the rows, so stages drop
# as they grow (64 rows: 8 stages, as tuned; 128: 8 / 6 gated; 256: 4).
_STAGE_BYTES = 160 * 1024


def block_rows(m: int) -> int:
    """BLOCK_M for m rows: the next power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, 1 << (m - 1).bit_length())


def _stages(block_m: int, block_k: int, w_cols: int, most: int, x_bytes: int = 2, w_bytes: int = 2) -> int:
    """Pipeline stages whose x tile + w tiles (w_cols columns in all) fit _STAGE_BYTES."""
    return max(2, min(most, _STAGE_BYTES // (block_k * (block_m * x_bytes + w_cols * w_bytes))))


def _warps(block_m: int) -> int:
    """One warpgroup up to 128 rows; two above, so the accumulators fit the registers."""
    return 4 if block_m <= 128 else 8


def _build() -> tuple:
    """Import triton and define the kernels, once."""
    global triton, tl, _KERNELS, _mainloop, _epilogue, _prefetch_w, _pdl_enter, _prefetch_l2, _load_w, _mma  # helpers
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    kernels._build()
    _pdl_enter, _prefetch_l2 = kernels._pdl_enter, kernels._prefetch_l2

    @triton.jit
    def _prefetch_w(w_ptr, cols, col_ok, k_lo, k_hi, stride_wn, LINE: tl.constexpr):
        """L2 prefetch of w[k_lo:k_hi, cols] for a w whose K dim has unit stride (W.t() of an
        nn.Linear weight): each column's range is one contiguous run, touched once per LINE
        elements (128 bytes). Runs before _pdl_enter, while the previous kernel still works."""
        for k0 in range(k_lo, k_hi, 16 * LINE):
            k = k0 + tl.arange(0, 16) * LINE
            _prefetch_l2(w_ptr + cols[:, None] * stride_wn + k[None, :], col_ok[:, None] & (k < k_hi)[None, :], w_ptr)

    @triton.jit
    def _mainloop(
        x_ptr, w_ptr, rows, row_ok, cols, cols2, col_ok, k_lo, k_hi, K,
        stride_xm, stride_xk, stride_wk, stride_wn,
        DUAL: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """fp32 sums x[:, k_lo:k_hi] @ w[k_lo:k_hi, cols] (and @ w[.., cols2] when DUAL). The x
        tile feeds the dot and nothing else: a variant that also summed its squares (a fused RMS
        norm) was miscompiled for some tilings on an H200 with Triton 3.6 (wrong sums), and one
        that scaled it first ran at half speed (docs/PERFORMANCE.md, round 3)."""
        kk = tl.arange(0, BLOCK_K)
        x_base = x_ptr + rows[:, None] * stride_xm
        w_base = w_ptr + cols[None, :] * stride_wn
        u_base = w_ptr + cols2[None, :] * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + kk
            if EVEN_K:
                xt = tl.load(x_base + k[None, :] * stride_xk, mask=row_ok[:, None], other=0.0)
            else:
                xt = tl.load(x_base + k[None, :] * stride_xk, mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
            xt = xt.to(w_ptr.dtype.element_ty)  # float32 x with bf16 w: rounded as F.linear(x.to(w.dtype))
            acc = _mma(acc, xt, _load_w(w_base, k, K, col_ok, stride_wk, EVEN_K and EVEN_N), DOT_F32)
            if DUAL:
                acc2 = _mma(acc2, xt, _load_w(u_base, k, K, col_ok, stride_wk, EVEN_K and EVEN_N), DOT_F32)
        return acc, acc2

    @triton.jit
    def _load_w(base, k, K, col_ok, stride_wk, EVEN: tl.constexpr):
        """The (BLOCK_K, BLOCK_N) weight tile of rows k of the columns at base."""
        if EVEN:
            t = tl.load(base + k[:, None] * stride_wk)
        else:
            t = tl.load(base + k[:, None] * stride_wk, mask=(k < K)[:, None] & col_ok[None, :], other=0.0)
        return t

    @triton.jit
    def _mma(acc, xt, wt, DOT_F32: tl.constexpr):
        if DOT_F32:  # interpreter only (see kernels._dot_f32)
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32))
        else:
            acc += tl.dot(xt, wt)
        return acc

    @triton.jit
    def _epilogue(
        acc, acc_up, rows, cols, row_ok, col_ok, F,
        bias_ptr, stride_b, gate_ptr, stride_g, res_ptr, stride_rm, stride_rn, out_ptr, R_OUT, stride_ob, stride_om,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr, HAS_GATE: tl.constexpr,
        SILU: tl.constexpr,
    ):
        """bias, gelu_tanh(gate) * up or silu, column gate, residual, all in fp32; store in out's
        dtype and return the fp32 values. For GATED, acc / acc_up are the gate / up columns `cols` /
        F + `cols` (acc_up is unused otherwise). Output row r sits at (r // R_OUT) * stride_ob +
        (r % R_OUT) * stride_om (_out_rows)."""
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            if HAS_BIAS:
                b_up = tl.load(bias_ptr + (F + cols) * stride_b, mask=col_ok, other=0.0).to(tl.float32)
                acc_up += b_up[None, :]
            # gelu_tanh(g) = g * (1 + tanh(z)) / 2 = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3);
            # The clamp keeps exp finite (g * ~0 either way for very negative g).
            z2 = 1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)
            acc = acc / (1.0 + tl.exp(tl.minimum(-z2, 80.0))) * acc_up
        if SILU:
            acc = acc / (1.0 + tl.exp(tl.minimum(-acc, 80.0)))
        if HAS_GATE:  # Pi0.5's gated residual: x + gate * (a @ w)
            acc *= tl.load(gate_ptr + cols * stride_g, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_RES:
            res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
            acc += res.to(tl.float32)
        o = out_ptr + ((rows // R_OUT) * stride_ob + (rows % R_OUT) * stride_om)[:, None] + cols[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask)
        return acc

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, gate_ptr,
        M, K, N_OUT, N_W, k_per_split,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_b, stride_g, stride_rm, stride_rn,
        R_OUT, stride_ob, stride_om,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr, HAS_GATE: tl.constexpr,
        SILU: tl.constexpr, DIRECT: tl.constexpr,
        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
        LINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < M
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        k_lo = pid_k * k_per_split  # a multiple of BLOCK_K
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if PREFETCH:
            _prefetch_w(w_ptr, cols, col_ok, k_lo, k_hi, stride_wn, LINE)
            if GATED:
                _prefetch_w(w_ptr, cols + N_OUT, col_ok, k_lo, k_hi, stride_wn, LINE)
        _pdl_enter(PDL)
        # Up columns: F = N_OUT further (only read when GATED).
        acc, acc_up = _mainloop(
            x_ptr, w_ptr, rows, row_ok, cols, cols + N_OUT, col_ok, k_lo, k_hi, K,
            stride_xm, stride_xk, stride_wk, stride_wn,
            GATED, EVEN_K, EVEN_N, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K,
        )

        if DIRECT:
            _epilogue(
                acc, acc_up, rows, cols, row_ok, col_ok, N_OUT,
                bias_ptr, stride_b, gate_ptr, stride_g, res_ptr, stride_rm, stride_rn,
                out_ptr, R_OUT, stride_ob, stride_om, HAS_BIAS, HAS_RES, GATED, HAS_GATE, SILU,
            )
        else:
            # part: (splits, M, N_W) fp32, contiguous; gated up columns at F + n.
            p = part_ptr + (pid_k * M + rows[:, None]) * N_W + cols[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            tl.store(p, acc, mask=mask)
            if GATED:
                tl.store(p + N_OUT, acc_up, mask=mask)

    @triton.jit
    def _reduce_kernel(
        part_ptr, bias_ptr, res_ptr, out_ptr, gate_ptr, nw_ptr, ns_ptr, nb_ptr, normed_ptr,
        M, N_OUT, N_W, ROWS_PER_TABLE,
        stride_b, stride_g, stride_rm, stride_rn, R_OUT, stride_ob, stride_om, stride_nb, stride_nm,
        S: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr, HAS_GATE: tl.constexpr,
        SILU: tl.constexpr, NORM: tl.constexpr, NORM_W: tl.constexpr, ADA: tl.constexpr, EPS: tl.constexpr,
        PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Sums the split partials, runs the epilogue; NORM (programs own whole rows): also
        writes RMSNorm(out) of the rounded output, times weight (NORM_W) or Pi0.5's adaptive
        scale1p / shift tables (ADA; row r uses table row r // ROWS_PER_TABLE)."""
        _pdl_enter(PDL)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N_OUT
        mask = row_ok[:, None] & col_ok[None, :]
        p = part_ptr + rows[:, None] * N_W + cols[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(S):  # unrolled: every split's partial is in flight at once
            acc += tl.load(p + s * M * N_W, mask=mask, other=0.0)
            if GATED:
                acc_up += tl.load(p + s * M * N_W + N_OUT, mask=mask, other=0.0)
        y = _epilogue(
            acc, acc_up, rows, cols, row_ok, col_ok, N_OUT,
            bias_ptr, stride_b, gate_ptr, stride_g, res_ptr, stride_rm, stride_rn, out_ptr, R_OUT, stride_ob, stride_om,
            HAS_BIAS, HAS_RES, GATED, HAS_GATE, SILU,
        )
        if NORM:  # the norm of what was stored (rounded to out's dtype), as the next op would see it
            y = tl.where(mask, y.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(y * y, 1) / N_OUT + EPS)
            h = y * rstd[:, None]
            if NORM_W:
                h *= tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if ADA:
                t = (rows // ROWS_PER_TABLE)[:, None] * N_OUT + cols[None, :]
                h = h * tl.load(ns_ptr + t, mask=mask, other=0.0).to(tl.float32)
                h += tl.load(nb_ptr + t, mask=mask, other=0.0).to(tl.float32)
            nrow = (rows // R_OUT) * stride_nb + (rows % R_OUT) * stride_nm
            tl.store(normed_ptr + nrow[:, None] + cols[None, :], h.to(normed_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qkv_kernel(
        x_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
        M, K, R, start, H, HKV, N_HALF,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_b,
        sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_F32: tl.constexpr, D: tl.constexpr,
        PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Fused QKV product + rotary + K/V cache write. Programs own BLOCK_N "half
        columns" j over the (H + 2 Hkv) heads: dims i and i + D/2 of head j // (D/2), i = j % (D/2),
        i.e. the two halves that rotate-half rotary pairs, loaded as two weight tiles."""
        HALF: tl.constexpr = D // 2
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < M
        j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = j < N_HALF
        head = j // HALF
        i = j % HALF
        cols = head * D + i
        if PREFETCH:
            _prefetch_w(w_ptr, cols, col_ok, 0, K, stride_wn, LINE)
            _prefetch_w(w_ptr, cols + HALF, col_ok, 0, K, stride_wn, LINE)
        _pdl_enter(PDL)
        acc, acc2 = _mainloop(
            x_ptr, w_ptr, rows, row_ok, cols, cols + HALF, col_ok, 0, K, K,
            stride_xm, stride_xk, stride_wk, stride_wn,
            True, EVEN_K, EVEN_N, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc2 += tl.load(bias_ptr + (cols + HALF) * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        # Rotary on q and k heads (tables (M, D/2) fp32: row = batch * R + token), none on v.
        c = tl.load(cos_ptr + rows[:, None] * HALF + i[None, :], mask=mask, other=1.0)
        s = tl.load(sin_ptr + rows[:, None] * HALF + i[None, :], mask=mask, other=0.0)
        rot = (head < H + HKV)[None, :]
        o1 = tl.where(rot, acc * c - acc2 * s, acc)
        o2 = tl.where(rot, acc2 * c + acc * s, acc2)
        # Destinations: q (M, H * D); k / v buffer rows start + token of the row's batch entry.
        bt = rows // R
        tk = start + rows % R
        qp = q_ptr + rows[:, None] * (H * D) + cols[None, :]
        kp = k_ptr + bt[:, None] * sk_b + tk[:, None] * sk_t + (head - H)[None, :] * sk_h + i[None, :]
        vp = v_ptr + bt[:, None] * sv_b + tk[:, None] * sv_t + (head - H - HKV)[None, :] * sv_h + i[None, :]
        p = tl.where((head < H)[None, :], qp, tl.where(rot, kp, vp))
        tl.store(p, o1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(p + HALF, o2.to(q_ptr.dtype.element_ty), mask=mask)

    _KERNELS = (_gemm_kernel, _reduce_kernel, _qkv_kernel)
    return _KERNELS


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


class RowNorm(NamedTuple):
    """An RMS norm of each output row that skinny_linear(norm=...) also returns: y / rms(y) times
    `weight` (N,) (Gemma's 1 + w, already added), or Pi0.5's adaptive y / rms(y) * scale1p + shift
    with (B, N) tables (or anything reshaping to that; table b serves rows b * M / B onwards), or
    neither."""

    eps: float
    weight: torch.Tensor | None = None
    scale1p: torch.Tensor | None = None
    shift: torch.Tensor | None = None


def _line(t: torch.Tensor) -> int:
    """Elements per 128-byte cache line."""
    return max(1, 128 // t.element_size())


def _prefetches(w: torch.Tensor, pdl: bool, prefetch: bool) -> bool:
    """Weights are prefetched to L2 ahead of the PDL wait when asked and each column is one
    contiguous run."""
    return pdl and prefetch and w.stride(0) == 1


NORM_ROWS = 1  # rows per program of the reduce kernel when it normalises (1: 6.4 us, 2: 8.1, 4: 8.9 for Wo)


class SkinnyConfig(NamedTuple):
    """What default_config picks."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def default_config(
    m: int, k: int, n_out: int, gated: bool, sm_count: int,
    block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
    x_bytes: int = 2, w_bytes: int = 2,
) -> SkinnyConfig:
    """Tiling for an (m x k) @ (k x n_out [x 2 if gated]) product; given values are kept.

    block_n 32, block_k 64, 4 warps, 8 stages (fewer where the tiles would not fit the shared
    memory, x_bytes / w_bytes per element, and 8 warps over 128 rows: _stages, _warps), and
    split_k = round(sm_count / column tiles), at most one split per K block, so that ~1 program
    per SM streams its slice of w. For the expert on 132 SMs: Wo and down 32 tiles x 4 splits,
    gate/up 128 x 1. The 8 stages keep most of a program's weight slice in flight at once, which
    is what these latency-bound products need (round 5; scripts/barrier_micro.py: 32 KB per
    program streams in 3.2 us loaded at once, 6.1 us in 4 KB steps). H200, 180 calls back to back
    in a CUDA graph (scripts/chain_micro.py SWEEP=stages, docs/PERFORMANCE.md round 5), round 4's
    128-deep steps x 3 (gated 4) stages -> these: Wo + norm 5.72 -> 5.40 us, down + norm 7.56 ->
    6.64, gate/up + GELU 6.54 -> 6.31.
    """
    block_n = 32 if block_n is None else block_n
    block_k = 64 if block_k is None else block_k
    tiles = -(-n_out // block_n)
    k_blocks = max(1, -(-k // block_k))
    if split_k is None:
        split_k = max(1, min(k_blocks, round(sm_count / tiles)))
    # 4 warps (one warpgroup: wgmma on sm_90). Shared memory per stage at 64 rows: a 64 x 64 x
    # tile plus one (two gated) 64 x 32 w tiles, 12 (16) KiB: 96 (128) KiB in all.
    bm = block_rows(m)
    w_cols = block_n * (2 if gated else 1)
    return SkinnyConfig(block_n, block_k, split_k, _warps(bm), _stages(bm, block_k, w_cols, 8, x_bytes, w_bytes))


def split_plan(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K per split, splits actually launched): whole K blocks per split, recounted so that no
    split is empty (4 blocks asked in 3 splits run as 2 splits of 2)."""
    k_blocks = max(1, -(-k // block_k))
    blocks_per_split = -(-k_blocks // min(split_k, k_blocks))
    return blocks_per_split * block_k, -(-k_blocks // blocks_per_split)


def expert_shapes() -> list[tuple[int, int, int, str]]:
    """Pi0 action expert products per layer and Euler step, (M, K, N, kind); kind is "qkv",
    "o" (+ residual), "gate_up" (gated_gelu: N = 2F columns [gate | up]) or "down" (+ residual)."""
    return [
        (51, 1024, 2560, "qkv"),
        (51, 2048, 1024, "o"),
        (51, 1024, 8192, "gate_up"),
        (51, 4096, 1024, "down"),
    ]


def _kernels() -> tuple:
    if not HAVE_TRITON:
        raise RuntimeError("the skinny GEMM kernels need triton (pip install triton); use torch.matmul instead")
    try:
        return _build()
    except ImportError as e:
        raise RuntimeError(f"the skinny GEMM kernels need a working triton: {e}") from e


def _check_vec(name: str, v: torch.Tensor | None, n: int) -> None:
    if v is not None and v.shape != (n,):
        raise ValueError(f"{name} must be ({n},); got {tuple(v.shape)}")


def _rows_of(x: torch.Tensor, w: torch.Tensor, widen_ok: bool = False) -> int:
    """M, after checking x (..., K) against w (K, N); widen_ok: x may also be float32."""
    if x.dim() < 1 or w.dim() != 2:
        raise ValueError(f"expected x (..., K) and w (K, N); got {tuple(x.shape)}, {tuple(w.shape)}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x's last dim {x.shape[-1]} != w's rows {w.shape[0]} (w is (K, N); pass W.t() for nn.Linear)")
    if x.dtype != w.dtype and not (widen_ok and x.dtype == torch.float32):
        raise ValueError(f"x and w dtypes differ: {x.dtype}, {w.dtype}")
    m = math.prod(x.shape[:-1])
    if m > MAX_M:
        raise ValueError(f"skinny kernels take at most {MAX_M} rows; got {m} (use torch.matmul)")
    return m


def _given(name: str, t: torch.Tensor, shape: tuple, x: torch.Tensor) -> torch.Tensor:
    """Check a caller's output buffer: the output's shape and a unit last stride (rows: _out_rows)."""
    if t.shape != shape or t.device != x.device or not t.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape {shape} on {x.device}; got {t.dtype} {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} needs a unit last stride; got strides {t.stride()}")
    return t


def _out_rows(outs: dict[str, torch.Tensor], m: int) -> tuple[int, list[list[int]]]:
    """R_OUT and each output's (batch stride, row stride), outputs (..., R, N) holding m rows: the
    kernels write row r at (r // R_OUT) * batch stride + (r % R_OUT) * row stride. All rows one
    stride apart (R_OUT = m), or else R rows per entry of the leading dims viewed as one (rows 1..
    of every batch entry of a (B, S, N) buffer)."""
    t = next(iter(outs.values()))
    for r in dict.fromkeys((m, t.shape[-2] if t.dim() > 1 else m)):
        try:
            views = [o.view(-1, r, o.shape[-1]) for o in outs.values()]
        except RuntimeError:
            continue
        return r, [[v.stride(0), v.stride(1)] for v in views]
    got = ", ".join(f"{name} {tuple(o.stride())}" for name, o in outs.items())
    raise ValueError(f"output rows must be one stride apart, or one stride apart in each batch entry; got strides "
                     f"{got}")


def skinny_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gated_gelu: bool = False,
    col_scale: torch.Tensor | None = None,
    split_k: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    norm: RowNorm | None = None,
    pdl: bool = False,
    prefetch: bool = False,
    silu: bool = False,
    out: torch.Tensor | None = None,
    normed_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x @ w (+ bias) (+ residual) for few rows, in x.dtype with fp32 accumulation.

    x (..., K) whose leading dims hold M <= MAX_M rows (ValueError above); w (K, N) with any strides
    (a W.t() view of an nn.Linear (N, K) weight, or a (K, N) tensor), same dtype as x. bias (N,),
    residual: the output's shape (any float dtypes, any strides). gated_gelu: w has 2F columns
    [gate | up] (bias 2F entries, if any); returns gelu_tanh(x @ w_gate + b_gate) * (x @ w_up + b_up)
    (+ residual), shape (..., F). The epilogue runs in fp32 on the fp32 sums and rounds once.
    (float32 inputs: tl.dot's default precision on the GPU is TF32.) Speed needs a unit stride
    on x's last dim and on one of w's dims: Triton specialises stride-1 arguments, which is what
    lets it vectorise and pipeline (cp.async) the tile loads; other strides work, slowly.

    col_scale (N_out,): the product is scaled per column before the residual add (Pi0.5's gated
    residual).

    split_k: K splits (None: see default_config); > 1 writes fp32 partials and reduces them in a
    second kernel, in a fixed order. block_n / block_k: powers of two >= 16. num_warps /
    num_stages: for the main kernel. No host sync, so it can be captured in a CUDA graph.

    norm: returns (out, normed): the reduce kernel (always run then, programs owning whole rows)
    also writes the RMS norm of each rounded output row (RowNorm), so the next layer's norm costs
    no kernel. pdl: programmatic dependent launch (kernels.pdl_supported; sm_90+): the kernels
    launch while the previous kernel runs and wait for it on the GPU; with prefetch, the main
    kernel first asks L2 for its weight slice (measured slower for these split-K products on an
    H200, so off by default; fused_qkv keeps it on).

    silu: silu(x @ w + bias) before the column scale and residual. x may be float32 with a bf16 /
    fp16 w: its tiles are rounded to w's dtype in registers (as F.linear(x.to(w.dtype)) would).
    out / normed_out: write the result (the norm) into these (the output's shape, any float dtype,
    unit last stride, rows one stride apart, or one stride apart within each batch entry: e.g.
    buf[:, 1:] of a (B, S, N) buffer) instead of new tensors in x's dtype; out may be the residual
    itself (updated in place: each element is read and written by the same program).
    """
    gemm_kernel, reduce_kernel, _ = _kernels()
    m = _rows_of(x, w, widen_ok=True)
    k, n_w = w.shape
    lead = x.shape[:-1]
    if gated_gelu and n_w % 2:
        raise ValueError(f"gated_gelu needs an even number of columns [gate | up]; got {n_w}")
    if gated_gelu and silu:
        raise ValueError("gated_gelu and silu are two activations; pick one")
    n_out = n_w // 2 if gated_gelu else n_w
    out_shape = (*lead, n_out)
    _check_vec("bias", bias, n_w)
    _check_vec("col_scale", col_scale, n_out)
    if residual is not None and residual.shape != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape}; got {tuple(residual.shape)}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v is not None and (v < 16 or not _is_pow2(v)):
            raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.dot blocks)")
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k={split_k} must be >= 1")
    tables: list[torch.Tensor] = []  # Pi0.5's adaptive-norm (scale1p, shift), as (B, N)
    if norm is not None:
        if gated_gelu:
            raise ValueError("norm= is for plain (residual) products, not gated_gelu")
        _check_vec("norm weight", norm.weight, n_out)
        if (norm.scale1p is None) != (norm.shift is None):
            raise ValueError("norm: give both scale1p and shift, or neither")
        if norm.scale1p is not None:
            tables = [t.reshape(-1, n_out) for t in (norm.scale1p, norm.shift)]
        if tables and (tables[0].shape != tables[1].shape or m % tables[0].shape[0]):
            raise ValueError(f"norm tables must be (B, {n_out}) with B dividing the {m} rows")

    if normed_out is not None and norm is None:
        raise ValueError("normed_out= needs norm=")
    out = _given("out", out, out_shape, x) if out is not None else torch.empty(out_shape, device=x.device, dtype=x.dtype)
    normed = None if norm is None else (
        _given("normed_out", normed_out, out_shape, x) if normed_out is not None else torch.empty_like(out))
    if m == 0 or n_out == 0:
        return out if norm is None else (out, normed)
    r_out, row_strides = _out_rows({"out": out} if norm is None else {"out": out, "normed_out": normed}, m)
    x2 = x.reshape(m, k)  # a view where the strides allow it
    res2 = residual.reshape(m, n_out) if residual is not None else x2  # unused without HAS_RES
    bias_t = bias if bias is not None else x2  # unused without HAS_BIAS
    gate_t = col_scale if col_scale is not None else x2

    cfg = default_config(m, k, n_out, gated_gelu, _sm_count(x.device), block_n, block_k, split_k,
                         x.element_size(), w.element_size())
    num_warps = cfg.num_warps if num_warps is None else num_warps
    num_stages = cfg.num_stages if num_stages is None else num_stages
    bn, bk = cfg.block_n, cfg.block_k
    k_per_split, splits = split_plan(k, bk, cfg.split_k)
    direct = splits == 1 and norm is None
    part = x2 if direct else torch.empty(splits, m, n_w, device=x.device, dtype=torch.float32)
    block_m = block_rows(m)

    common = {"HAS_BIAS": bias is not None, "HAS_RES": residual is not None, "GATED": gated_gelu,
              "HAS_GATE": col_scale is not None, "SILU": silu}
    strides = (
        bias_t.stride(0) if bias is not None else 0,
        gate_t.stride(0) if col_scale is not None else 0,
        res2.stride(0) if residual is not None else 0, res2.stride(1) if residual is not None else 0,
        r_out, *row_strides[0],
    )
    gemm_kernel[(-(-n_out // bn), splits)](
        x2, w, bias_t, res2, out, part, gate_t,
        m, k, n_out, n_w, k_per_split,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), *strides,
        DIRECT=direct, EVEN_K=k % bk == 0, EVEN_N=n_out % bn == 0,
        DOT_F32=_dot_f32(gemm_kernel, w.dtype), PDL=pdl, PREFETCH=_prefetches(w, pdl, prefetch), LINE=_line(w),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=num_warps, num_stages=num_stages, **common, **pdl_kwargs(pdl),
    )
    if direct:
        return out
    # Whole rows per program when normalising (Pi0: 51 programs of 1 x 1024).
    red_m, red_n = (NORM_ROWS, triton.next_power_of_2(n_out)) if norm is not None else (16, 128)
    normed_t, normed_strides = (normed, row_strides[1]) if norm is not None else (out, (0, 0))  # unused without NORM
    nw = norm.weight if norm is not None and norm.weight is not None else None
    ns, nb = tables or (x2, x2)
    reduce_kernel[(-(-m // red_m), -(-n_out // red_n))](
        part, bias_t, res2, out, gate_t, nw if nw is not None else x2, ns, nb, normed_t,
        m, n_out, n_w, m // ns.shape[0] if tables else 1,
        *strides, *normed_strides, S=splits,
        NORM=norm is not None, NORM_W=nw is not None, ADA=bool(tables), EPS=norm.eps if norm is not None else 0.0,
        PDL=pdl, BLOCK_M=red_m, BLOCK_N=red_n, num_warps=4, **common, **pdl_kwargs(pdl),
    )
    return out if norm is None else (out, normed)


def fused_qkv(
    x: torch.Tensor,
    w: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    *,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pdl: bool = False,
    prefetch: bool = True,
) -> torch.Tensor:
    """One kernel for a Gemma attention block's input side after its norm, for few rows: the fused
    [q | k | v] product (+ bias (N,)), rotate-half rotary on q and k, and the K/V write into the
    cache buffers. Returns rotated q (B, R, heads, D).

    x (B, R, K) with B * R <= MAX_M; w (K, (heads + 2 kv_heads) D) (W.t() of the fused nn.Linear
    weight); k_buf / v_buf (B, T, kv_heads, D), unit stride on the last dim: rows
    [start, start + R) are written. cos / sin: (B * R, D / 2) float32 tables of the rows' positions
    (cos and sin of position x inverse frequency). Same numbers as linear -> rope in fp32,
    rounded once. pdl / prefetch: as in skinny_linear (the weight prefetch took this kernel from
    6.2 to 4.7 us on an H200 under PDL).
    """
    _, _, qkv_kernel = _kernels()
    m = _rows_of(x, w)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, R, K); got {tuple(x.shape)}")
    b, r, k = x.shape
    d = k_buf.shape[-1]
    n_w = w.shape[1]
    if n_w != (heads + 2 * kv_heads) * d or d % 2:
        raise ValueError(f"w has {n_w} columns; expected (heads + 2 kv_heads) x head dim = {(heads + 2 * kv_heads) * d}")
    for name, buf in (("k_buf", k_buf), ("v_buf", v_buf)):
        if buf.dim() != 4 or buf.shape[0] != b or buf.shape[2] != kv_heads or buf.shape[3] != d or buf.stride(-1) != 1:
            raise ValueError(f"{name} must be (B={b}, T, {kv_heads}, {d}) with a unit last stride; got {tuple(buf.shape)}")
        if not 0 <= start <= buf.shape[1] - r:
            raise ValueError(f"rows [{start}, {start + r}) do not fit {name}'s {buf.shape[1]} rows")
        if buf.dtype != x.dtype:
            raise ValueError(f"{name} dtype {buf.dtype} != x dtype {x.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (m, d // 2) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({m}, {d // 2}) table; got {tuple(t.shape)}")
    _check_vec("bias", bias, n_w)
    q = torch.empty(b, r, heads, d, device=x.device, dtype=x.dtype)
    if m == 0:
        return q
    n_half = n_w // 2
    bn = block_n or 16  # H200 tunes (rounds 3-5): 16 x 64 tiles, 4 warps, 6 stages (4: 4.63 us), 80 programs
    bk = block_k
    bm = block_rows(m)
    num_warps = _warps(bm) if num_warps is None else num_warps
    if num_stages is None:
        num_stages = _stages(bm, bk, 2 * bn, 6, x.element_size(), w.element_size())
    x2 = x.reshape(m, k)
    qkv_kernel[(-(-n_half // bn),)](
        x2, w, bias if bias is not None else q,
        cos, sin, q, k_buf, v_buf,
        m, k, r, start, heads, kv_heads, n_half,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0,
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        HAS_BIAS=bias is not None, EVEN_K=k % bk == 0, EVEN_N=n_half % bn == 0,
        DOT_F32=_dot_f32(qkv_kernel, x.dtype), D=d, PDL=pdl, PREFETCH=_prefetches(w, pdl, prefetch), LINE=_line(w),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=num_warps, num_stages=num_stages, **pdl_kwargs(pdl),
    )
    return q
