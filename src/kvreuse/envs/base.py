"""The episode protocol every simulator adapter follows (Meta-World, LIBERO).

Observations are openpi-style flat dicts (`observation/image`, `observation/wrist_image`,
`observation/state`, `prompt`) so that the same RobotTransform serves rollouts and the server.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import Protocol

import numpy as np


def prepare_gl() -> None:
    """Call before MuJoCo is imported: it picks its GL backend then (headless EGL unless the user
    chose one). With OSMesa, Triton (the fast GPU runtime's kernels) is loaded first, because
    loading libtriton after OSMesa's own LLVM crashes the process; the other order renders the same."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] != "osmesa" or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    if "mujoco" in sys.modules:  # too late: importing triton now is the crash (a bare segfault)
        warnings.warn("MUJOCO_GL=osmesa: mujoco was imported before kvreuse's envs, so Triton is not loaded "
                      "(loading it after OSMesa crashes the process); import kvreuse.envs first to run the fast "
                      "GPU runtime in this process", stacklevel=2)
        return
    import triton  # noqa: F401


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
