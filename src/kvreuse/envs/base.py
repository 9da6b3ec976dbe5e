"""The episode protocol every simulator adapter follows (Meta-World, LIBERO).

Observations are openpi-style flat dicts (`observation/image`, `observation/wrist_image`,
`observation/state`, `prompt`) so that the same RobotTransform serves rollouts and the server.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class EpisodeEnv(Protocol):
    robot: str  # key into kvreuse.transforms.robot.ROBOTS
    tasks: tuple[str, ...]

    def max_steps(self, task: str) -> int: ...

    def num_inits(self, task: str) -> int: ...

    def reset(self, task: str, init_id: int, seed: int) -> dict:
        """Start an episode of `task` from init state `init_id`; returns the first observation."""
        ...

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        """Apply one action; returns (observation, success, done). Success is the env's own signal."""
        ...

    def render(self) -> np.ndarray:
        """An RGB frame for videos."""
        ...

    def close(self) -> None: ...
