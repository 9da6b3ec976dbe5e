"""Triton: rotary on the q and k heads of a fused QKV product and the K/V cache write, in one kernel.

After the prefix LM's QKV product (cuBLAS, M = prefix rows), torch.compile's code ran three
kernels over its output: q rotated into its own tensor, k rotated again and copied into the cache
buffer, v copied into it (3.6 + 2.0 + 1.3 us a layer on an H100, plus two launch gaps in the
graph; scripts/part_kernels.py, docs/PERFORMANCE.md round 14). Here one program takes BLOCK_M rows
of one head: the two halves i and i + D/2 that rotate-half rotary pairs, rotated in fp32 and
rounded once (as the eager `rope`), to q (heads < H), the K buffer (the next Hkv) or, unrotated,
the V buffer (the last Hkv). Cache rows are start + token, or idx[token] for a partial update.

Triton is imported on the first call (as in kernels.py), so importing this module never loads it.
"""

from __future__ import annotations

import torch

from kvreuse.model.kernels import HAVE_TRITON

triton = None  # set by _build(); the kernel body looks `tl` up in these module globals
tl = None
_KERNEL = None

__all__ = ["HAVE_TRITON", "rope_scatter"]


def _build():
    global triton, tl, _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_scatter_kernel(
        qkv_ptr, cos_ptr, sin_ptr, idx_ptr, q_ptr, k_ptr, v_ptr,
        M, R, start, H, HKV,
        s_qkv, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
        HAS_IDX: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        HALF: tl.constexpr = D // 2
        head = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        i = tl.arange(0, HALF)
        ok = (rows < M)[:, None]
        src = qkv_ptr + rows[:, None] * s_qkv + head * D + i[None, :]
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        b = rows // R
        t = rows % R
        if HAS_IDX:
            t = tl.load(idx_ptr + t, mask=rows < M, other=0)
        else:
            t = start + t
        if head < H + HKV:  # q or k: rotate; tables (M, D/2) fp32, sin with its sign for i < D/2
            c = tl.load(cos_ptr + rows[:, None] * HALF + i[None, :], mask=ok, other=1.0)
            s = tl.load(sin_ptr + rows[:, None] * HALF + i[None, :], mask=ok, other=0.0)
            o1 = x1 * c - x2 * s
            o2 = x2 * c + x1 * s
            if head < H:
                dst = q_ptr + (rows[:, None] * H + head) * D + i[None, :]
            else:
                dst = k_ptr + b[:, None] * sk_b + t[:, None] * sk_t + (head - H) * sk_h + i[None, :]
        else:
            o1, o2 = x1, x2
            dst = v_ptr + b[:, None] * sv_b + t[:, None] * sv_t + (head - H - HKV) * sv_h + i[None, :]
        tl.store(dst, o1.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, o2.to(q_ptr.dtype.element_ty), mask=ok)

    _KERNEL = _rope_scatter_kernel
    return _KERNEL


def rope_scatter(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: int,
    idx: torch.Tensor | None,
    heads: int,
    kv_heads: int,
    block_m: int = 32,
) -> torch.Tensor:
    """qkv (B, R, (heads + 2 kv_heads) D), unit last stride: [q | k | v] as the fused product
    gives them. cos / sin: contiguous (B * R, D / 2) float32 half tables (cos and sin of position
    x inverse frequency, the runtime's `cos[..., :D/2]` and signed `sin[..., D/2:]`). Writes k and v
    into k_buf / v_buf (B, T, kv_heads, D), unit last stride, at rows [start, start + R) or, with
    idx (R,) int64, at rows idx; returns rotated q (B, R, heads, D). Same numbers as the eager
    rope (x cos + rotate_half(x) sin in fp32, rounded once to qkv's dtype)."""
    if not HAVE_TRITON:
        raise RuntimeError("rope_scatter needs triton (pip install triton)")
    kernel = _build()
    b, r, n = qkv.shape
    d = k_buf.shape[-1]
    m = b * r
    if n != (heads + 2 * kv_heads) * d or d % 2 or d & (d - 1):
        raise ValueError(f"qkv has {n} columns for heads {heads} + 2 x {kv_heads} of a power-of-two dim {d}")
    if qkv.stride(-1) != 1 or qkv.stride(0) != r * qkv.stride(1):
        raise ValueError("qkv must have a unit last stride and rows of one stride")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (m, d // 2) or not t.is_contiguous() or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a contiguous float32 ({m}, {d // 2}) table; got {tuple(t.shape)}")
    for name, buf in (("k_buf", k_buf), ("v_buf", v_buf)):
        if buf.dim() != 4 or buf.shape[0] != b or buf.shape[2:] != (kv_heads, d) or buf.stride(-1) != 1:
            raise ValueError(f"{name} must be (B={b}, T, {kv_heads}, {d}) with a unit last stride")
        if idx is None and not 0 <= start <= buf.shape[1] - r:
            raise ValueError(f"rows [{start}, {start + r}) do not fit {name}'s {buf.shape[1]} rows")
    q = torch.empty(b, r, heads, d, device=qkv.device, dtype=qkv.dtype)
    if m == 0:
        return q
    kernel[(triton.cdiv(m, block_m), heads + 2 * kv_heads)](
        qkv, cos, sin, idx if idx is not None else q, q, k_buf, v_buf,
        m, r, start, heads, kv_heads,
        qkv.stride(1), k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), v_buf.stride(0), v_buf.stride(1),
        v_buf.stride(2),
        HAS_IDX=idx is not None, D=d, BLOCK_M=block_m, num_warps=4,
    )
    return q
