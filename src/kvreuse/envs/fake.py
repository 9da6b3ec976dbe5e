"""A tiny simulator-free EpisodeEnv for tests and harness benchmarks.

A point hand moves by 0.1 * action[:3] toward a target drawn from (task, init_id); success when
it is within `radius`. Images are small gradients that shift with the hand position, so
image-similarity gates see real changes. Task "crash" raises inside `step` after a few steps
(an env crash, which the harness must record as an error and carry on). With hard_crash=True,
task "abort" kills the whole process instead (run it in sweep workers only). With
vanish_once=PATH, task "vanish" ends its process quietly (exit 0) the first time (it counts its
attempts in PATH; the first `vanish_times`, with vanish_times), as a worker killed between episodes
may lose the one it had just taken; later it runs as a plain task.
"""

from __future__ import annotations

import time
import zlib

import numpy as np


class FakeEnv:
    robot = "metaworld"
    tasks = ("reach", "reach-far", "crash")
    prompts = {"reach": "reach the target", "reach-far": "reach the far target", "crash": "crash the simulator"}

    def __init__(self, image_size: int = 32, max_steps: int = 30, radius: float = 0.15, step_sleep_s: float = 0.0,
                 hard_crash: bool = False, vanish_once: str | None = None, vanish_times: int = 1):
        self.size, self._max, self.radius, self.sleep = image_size, max_steps, radius, step_sleep_s
        self.tasks, self.prompts = FakeEnv.tasks, dict(FakeEnv.prompts)
        if hard_crash:  # adds task "abort": the process dies in step 3 (a simulator segfault)
            self.tasks, self.prompts["abort"] = (*self.tasks, "abort"), "abort the process"
        self.vanish_once, self.vanish_times = vanish_once, vanish_times
        if vanish_once:
            self.tasks, self.prompts["vanish"] = (*self.tasks, "vanish"), "reach the target"
        self.task = ""
        self.hand = np.zeros(3)
        self.target = np.zeros(3)
        self.t = 0

    def _check(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(self.tasks)}")

    def max_steps(self, task: str) -> int:
        self._check(task)
        return self._max

    def num_inits(self, task: str) -> int:
        self._check(task)
        return 50

    def reset(self, task: str, init_id: int, seed: int) -> dict:
        self._check(task)
        if not 0 <= init_id < self.num_inits(task):
            raise ValueError(f"init_id: expected 0..{self.num_inits(task) - 1}, got {init_id}")
        if task == "vanish" and self.vanish_once:
            import os

            with open(self.vanish_once, "ab") as f:  # one byte per attempt, across processes (O_APPEND)
                f.write(b"x")
                attempt = f.tell()
            if attempt <= self.vanish_times:
                os._exit(0)
        rng = np.random.default_rng(zlib.crc32(f"{task}/{init_id}".encode()))
        scale = 0.4 if task == "reach" else 1.0  # crash/abort: far targets, never reached first
        self.task, self.t = task, 0
        self.hand = np.zeros(3)
        d = rng.normal(size=3)  # target at distance lo..scale from the start
        lo = 0.3 if task.startswith("reach") else 0.8  # crash/abort happen before any success
        self.target = d / np.linalg.norm(d) * rng.uniform(lo, scale)
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        if self.sleep:
            time.sleep(self.sleep)
        if self.task == "crash" and self.t >= 3:
            raise RuntimeError("simulated physics blow-up")
        if self.task == "abort" and self.t >= 3:
            import os

            os._exit(139)
        a = np.clip(np.asarray(action, dtype=np.float64)[:3], -1, 1)
        self.hand = self.hand + 0.1 * a
        self.t += 1
        success = bool(np.linalg.norm(self.hand - self.target) < self.radius)
        return self._obs(), success, self.t >= self._max

    def _obs(self) -> dict:
        s = self.size
        x = np.linspace(0, 1, s)
        img = np.empty((s, s, 3), dtype=np.uint8)
        img[..., 0] = (255 * np.clip(x[None, :] + self.hand[0] * 0.5, 0, 1)).astype(np.uint8)
        img[..., 1] = (255 * np.clip(x[:, None] + self.hand[1] * 0.5, 0, 1)).astype(np.uint8)
        img[..., 2] = np.uint8(255 * np.clip(0.5 + self.target[2] * 0.5, 0, 1))
        state = np.array([*self.hand, 0.0])
        return {
            "observation/image": img,
            "observation/wrist_image": img[::-1].copy(),
            "observation/state": state,
            "prompt": self.prompts[self.task],
        }

    def render(self) -> np.ndarray:
        return self._obs()["observation/image"]

    def close(self) -> None:
        pass
