"""Optional TensorRT path for the vision tower (SigLIP + projector): `FastPi0(vision_trt=True)`.

Used only when torch_tensorrt is installed. UNTESTED on a GPU: neither the device image nor the
CI machine has TensorRT, and its wheels are far larger than what a device call can carry
(docs/PERFORMANCE.md, round 8). The CPU tests check the wiring with a stand-in module.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def load_torch_tensorrt():
    """The torch_tensorrt module, or one clear error saying it is missing."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise ValueError(
            "vision_trt=True needs torch_tensorrt, which is not installed "
            "(pip install torch-tensorrt built for your torch and CUDA); or use vision_trt=False"
        ) from e
    return torch_tensorrt


class _Tower(nn.Module):
    """The eager model's `embed_image`: (N, 3, H, W) images -> (N, patches, llm width)."""

    def __init__(self, vision: nn.Module, projector: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.vision, self.projector, self.dtype = vision, projector, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(images.to(self.dtype)))


class TrtVision:
    """One TensorRT engine per image-batch shape, built on first use (static shapes, as the
    CUDA graphs of the rest of FastPi0). Engines run outside FastPi0's CUDA graphs: whether
    TensorRT's enqueue can be captured depends on the engine, and one engine is one launch."""

    def __init__(self, vision: nn.Module, projector: nn.Module, dtype: torch.dtype):
        self.trt = load_torch_tensorrt()
        self.tower = _Tower(vision, projector, dtype).eval()
        self.engines: dict[tuple[int, ...], object] = {}
        self.build_s = 0.0  # engine build time, part of the warm-up

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        key = tuple(images.shape)
        engine = self.engines.get(key)
        if engine is None:
            t0 = time.perf_counter()
            engine = self.engines[key] = self.trt.compile(
                self.tower, ir="dynamo", inputs=[images.clone()], enabled_precisions={self.tower.dtype}
            )
            self.build_s += time.perf_counter() - t0
        return engine(images)
