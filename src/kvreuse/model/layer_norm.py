"""Residual add + LayerNorm in one Triton kernel, for the SigLIP vision tower.

Each SigLIP layer adds a product to its residual stream and layer-normalises the sum (twice per
layer, 27 layers). Under torch.compile inductor splits LayerNorm at width 1152 into a looped
reduction kernel plus a pointwise one, next to a separate residual add: three passes over the
activations. `add_layer_norm` is one pass: a program owns whole rows, rounds x + y to the
activations' dtype (as the eager model's add does), stores it, and normalises the rounded sum in
fp32 (docs/PERFORMANCE.md, round 4).

Triton is imported on the first call, as in kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvreuse.model.kernels import HAVE_TRITON

triton = None  # set by _build(); the kernel body looks `tl` up in these module globals
tl = None
_KERNEL = None

__all__ = ["add_layer_norm", "add_layer_norm_reference"]

ROWS = 2  # rows per program (512 rows: 256 programs)


def _build():
    global triton, tl, _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _add_ln_kernel(x_ptr, y_ptr, w_ptr, b_ptr, s_ptr, h_ptr, M, N, stride_x, stride_y, stride_s, stride_h,
                       HAS_Y: tl.constexpr, EPS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_Y:
            y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + y.to(tl.float32)).to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
        s = x.to(tl.float32)
        mean = tl.sum(s, 1) / N
        d = tl.where(mask, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + EPS)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        h = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)

    _KERNEL = _add_ln_kernel
    return _KERNEL


def add_layer_norm_reference(x: torch.Tensor, y: torch.Tensor | None, weight, bias, eps: float):
    """What add_layer_norm computes, in torch ops: (s, LayerNorm(s)) with s = x + y (or x)."""
    s = x if y is None else x + y
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LayerNorm(s) * weight + bias) with s = x + y rounded to x's dtype (y None: s = x, not
    copied). x, y (..., N) with a unit last stride, same shape and dtype; weight, bias (N,).
    One kernel, no host sync (CUDA-graph capturable)."""
    if not HAVE_TRITON:
        raise RuntimeError("add_layer_norm needs triton (pip install triton); use add_layer_norm_reference")
    n = x.shape[-1]
    if y is not None and (y.shape != x.shape or y.dtype != x.dtype):
        raise ValueError(f"y must match x: {tuple(x.shape)} {x.dtype}; got {tuple(y.shape)} {y.dtype}")
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"weight and bias must be ({n},); got {tuple(weight.shape)}, {tuple(bias.shape)}")
    kernel = _build()
    x2 = x.reshape(-1, n)
    y2 = y.reshape(-1, n) if y is not None else x2
    if x2.stride(-1) != 1 or y2.stride(-1) != 1:
        raise ValueError("x and y need a unit stride on their last dim")
    m = x2.shape[0]
    s = x.new_empty(x.shape) if y is not None else x  # contiguous, whatever x's layout
    h = x.new_empty(x.shape)
    s2, h2 = s.view(-1, n) if y is not None else x2, h.view(-1, n)  # (s2 unused without y)
    kernel[(triton.cdiv(m, ROWS),)](
        x2, y2, weight, bias, s2, h2, m, n, x2.stride(0), y2.stride(0), s2.stride(0), h2.stride(0),
        HAS_Y=y is not None, EPS=eps, ROWS=ROWS, BLOCK=triton.next_power_of_2(n), num_warps=4,
    )
    return s, h
