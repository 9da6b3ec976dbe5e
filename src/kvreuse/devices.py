"""The checks every command makes of its --device and --dtype options before any work (DB,
workers, a model build), so a typo or a missing GPU is one line naming the option, not a
traceback from torch."""

from __future__ import annotations

import torch

DTYPES = ("float32", "bfloat16")  # what the policies run in (bf16: the GPU figures of docs/PERFORMANCE.md)


def check_dtype(name: str) -> torch.dtype:
    """-> the torch dtype a --dtype option names."""
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def check_device(device: str, *, auto: bool = False) -> torch.device:
    """-> the torch device `device` names, or ValueError if this machine cannot run on it.
    auto: 'auto' is accepted too and means cuda when available, else cpu (train)."""
    expected = ("auto, " if auto else "") + "cpu, cuda or cuda:N"
    if auto and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):  # the project runs (and is tested) on these only
        raise ValueError(f"--device {device!r}: unknown device; expected {expected}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device!r}: this machine has {n} CUDA device(s): cuda:0 .. cuda:{n - 1}")
    return dev
