"""Image preprocessing: any of (H, W, 3) / (B, H, W, 3) / (3, H, W) / (B, 3, H, W), uint8 in
[0, 255] or float in [0, 1] -> (B, 3, size, size) float32 in [-1, 1], aspect kept, black pad."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _batched(img, name: str) -> torch.Tensor:
    """img checked, as a (B, H, W, 3) or (B, 3, H, W) tensor of its own dtype (no copy of a
    contiguous array)."""
    t = torch.as_tensor(np.ascontiguousarray(img)) if not isinstance(img, torch.Tensor) else img
    if t.dtype not in (torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {t.dtype}")
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"{name}: expected (H, W, 3) or (B, H, W, 3) (or channels-first), got shape {tuple(t.shape)}")
    if t.shape[-1] != 3 and t.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 color channels, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def _chw_unit_range(t: torch.Tensor) -> torch.Tensor:
    """A _batched tensor -> (B, 3, H, W) float32 in [-1, 1]."""
    if t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.dtype != torch.uint8:
        return t.float() * 2.0 - 1.0
    # A 0-d divisor on the tensor's device: CUDA divides by a host scalar as a product with its
    # reciprocal, which rounds 126 of the 256 values differently from the CPU's true division.
    return t.float() / torch.full((), 127.5, device=t.device) - 1.0


def to_batched_chw(img, name: str = "image") -> torch.Tensor:
    return _chw_unit_range(_batched(img, name))


def resize_with_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, size, size); keeps aspect ratio, pads with black (-1)."""
    b, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(x, (left, size - nw - left, top, size - nh - top), value=-1.0)


def preprocess_image(img, size: int, flip180: bool = False, name: str = "image", device=None) -> torch.Tensor:
    """device: where the image is converted. The pixels travel as given (uint8: a quarter of
    float32's bytes) and the conversion, flip and resize run there (on a GPU: a few small kernels
    instead of ~0.1 ms of host work per camera; the same values, the resize up to float rounding)."""
    t = _batched(img, name)
    x = _chw_unit_range(t if device is None else t.to(device))
    if flip180:
        x = x.flip(-1, -2)
    return resize_with_pad(x, size)
