"""Policy: checkpoint + robot transform + inference, what rollouts and the server call.

`infer(raw)` takes an openpi-style observation dict and returns the robot's action chunk
(chunk, action_dim) and a record of what was done. Reuse is added by kvreuse.reuse (the same
class with reuse off is the baseline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .model.pi0 import Pi0Model
from .transforms.robot import RobotTransform


@dataclass
class StepRecord:
    decision: str = "refresh"  # "refresh" | "reuse" (with a mode)
    mode: str = "none"
    reason: str = "no reuse"
    signals: dict = field(default_factory=dict)
    snapshots: tuple[int, ...] = ()
    mixed: bool = False
    timings: dict = field(default_factory=dict)  # ms: vision, prefix, denoise, total


class Policy:
    def __init__(self, model: Pi0Model, transform: RobotTransform, seed: int = 0):
        self.model = model.eval()
        self.transform = transform
        self.generator = torch.Generator(device=model.device)
        self.seed = seed
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.generator.manual_seed(self.seed if seed is None else seed)

    @torch.no_grad()
    def infer(self, raw: dict, noise: torch.Tensor | None = None) -> tuple[np.ndarray, StepRecord]:
        t0 = time.perf_counter()
        obs = self.transform(raw, device=self.model.device)
        if noise is None:
            noise = self.model.make_noise(obs.batch_size, self.generator)
        out = self.model.sample_actions(obs, noise)
        actions = self.transform.actions(out)
        rec = StepRecord(timings={"total": (time.perf_counter() - t0) * 1e3})
        return (actions[0] if actions.shape[0] == 1 else actions), rec
