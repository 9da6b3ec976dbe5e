"""A robot observation's tensors to a GPU in one CUDA graph.

Sent tensor by tensor, a call's inputs cost ~20 host-side torch ops (pageable copies of the pixels,
state, tokens and masks, then the image conversion's kernels), each ~20-35 us of host time on the
GPU machines while the GPU waits for them (docs/PERFORMANCE.md, rounds 15 and 20). Here the
checked host tensors are copied into pinned buffers kept for the input's shapes, and one graph
copies them to the device and converts the images (`images.device_image`) into one flat device
buffer. A call returns views of a fresh clone of that buffer, so every Observation owns its
tensors, as the unstaged path's do: the reuse layer keeps references to earlier observations.

On a CPU device (the tests) the same code runs as plain calls, without pinned memory or graph.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..model.graphs import Graphs
from .images import device_image

_ALIGN = 256  # bytes: every field starts aligned for any dtype's view


@dataclass(frozen=True)
class Field:
    """One tensor of the staged input: its host source (None: a camera the robot lacks, filled
    black on the device) and the image conversion to apply (size > 0: an image)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    size: int = 0  # model image size; 0 = copied as is
    flip180: bool = False
    absent: bool = False


class Staging:
    """Pinned host buffers, device buffers and the graph for one input signature (name -> Field)."""

    def __init__(self, fields: dict[str, Field], device: torch.device):
        self.fields, self.device = fields, torch.device(device)
        cuda = self.device.type == "cuda"
        self.host = {n: torch.empty(f.shape, dtype=f.dtype, pin_memory=cuda) for n, f in fields.items() if not f.absent}
        self.raw = {n: torch.empty(f.shape, dtype=f.dtype, device=self.device) for n, f in fields.items() if not f.absent}
        self.offsets, end = {}, 0
        for n, f in fields.items():
            self.offsets[n] = end
            end += -(-_nbytes(f.out_shape, f.out_dtype) // _ALIGN) * _ALIGN
        self.flat = torch.empty(end, dtype=torch.uint8, device=self.device)
        self.graphs = Graphs(cuda)
        self.lock = threading.Lock()
        self.done: torch.cuda.Event | None = None  # the last replay's copies out of the pinned buffers

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat[o: o + _nbytes(f.out_shape, f.out_dtype)].view(f.out_dtype).view(f.out_shape)
                for (n, f), o in zip(self.fields.items(), self.offsets.values())}

    def _device_work(self) -> None:
        out = self._views(self.flat)
        for n, f in self.fields.items():
            if f.absent:
                out[n].fill_(-1.0)
                continue
            x = self.raw[n]
            x.copy_(self.host[n], non_blocking=True)
            out[n].copy_(device_image(x, f.size, f.flip180) if f.size else x)

    def __call__(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """sources: name -> host tensor of its Field's shape and dtype. Returns name -> device
        tensor (its out_shape / out_dtype), views of one buffer no other call writes."""
        with self.lock:
            if self.done is not None:  # the previous call's copies may still read the pinned buffers
                self.done.synchronize()
            for n, t in sources.items():
                self.host[n].copy_(t)
            self.graphs.run("inputs", self._device_work)
            if self.device.type == "cuda":
                self.done = torch.cuda.Event()
                self.done.record()
            return self._views(self.flat.clone())


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
