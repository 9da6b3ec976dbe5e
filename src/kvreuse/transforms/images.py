"""Image preprocessing: any of (H, W, 3) / (B, H, W, 3) / (3, H, W) / (B, 3, H, W), uint8 in
[0, 255] or float in [0, 1] -> (B, 3, size, size) float32 in [-1, 1], aspect kept, black pad."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


_PIXELS = (torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NP_PIXELS = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
# Float pixels a little outside [0, 1] (rounding in the client's conversion) are accepted, clamped.
_FLOAT_TOL = 1e-3


def _batched(img, name: str) -> torch.Tensor:
    """img checked, as a (B, H, W, 3) or (B, 3, H, W) tensor of its own dtype (no copy of a
    contiguous native-order array)."""
    if isinstance(img, torch.Tensor):
        t = img
        if t.dtype not in _PIXELS:
            raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {t.dtype}")
    else:
        try:
            a = np.asarray(img)
        except ValueError:  # ragged nested lists
            raise ValueError(f"{name}: expected an array of pixels, got a ragged {type(img).__name__}") from None
        # Checked before torch sees it: torch fails on strings, dates and big-endian data with
        # messages that do not name the key.
        native = a.dtype.newbyteorder("=")
        if native not in _NP_PIXELS:
            got = f"dtype {a.dtype}" if isinstance(img, np.ndarray) else f"{type(img).__name__} (dtype {a.dtype})"
            raise ValueError(f"{name}: expected uint8 or float pixels, got {got}")
        t = torch.as_tensor(np.ascontiguousarray(a, dtype=native))
    given = tuple(t.shape)  # as the caller sent it, for the messages
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"{name}: expected (H, W, 3) or (B, H, W, 3) (or channels-first), got shape {given}")
    if t.shape[-1] != 3 and t.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 color channels, got shape {given}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty image, got shape {given}")
    if t.dtype != torch.uint8:
        # One pass on the host, before any device copy: NaN propagates into min and max.
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (-_FLOAT_TOL <= lo and hi <= 1 + _FLOAT_TOL):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: contains NaN or inf")
            raise ValueError(f"{name}: float pixels must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                             "send uint8 for 0-255 data")
    return t


def _chw_unit_range(t: torch.Tensor) -> torch.Tensor:
    """A _batched tensor -> (B, 3, H, W) float32 in [-1, 1]."""
    if t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.dtype != torch.uint8:
        # clamp_: the tolerance of _batched; resize_with_pad does not clamp at the model's size.
        return (t.float() * 2.0 - 1.0).clamp_(-1.0, 1.0)
    # A 0-d divisor on the tensor's device: CUDA divides by a host scalar as a product with its
    # reciprocal, which rounds 126 of the 256 values differently from the CPU's true division.
    return t.float() / torch.full((), 127.5, device=t.device) - 1.0


def resize_with_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, size, size); keeps aspect ratio, pads with black (-1)."""
    b, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    ratio = max(h, w) / size  # openpi's and lerobot's sizes: int(h / ratio), truncated, not rounded
    nh, nw = max(1, int(h / ratio)), max(1, int(w / ratio))
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
