"""One closed-loop episode: the single rollout loop that baseline and reuse settings share
(design invariant 4: same loop, same success rule = the env's own signal).

Action chunking: the policy returns a chunk of `chunk` actions; the first `replan` of them are
executed, then the policy is called again on the newest observation (openpi's LIBERO client
does this with replan 5).

Noise: every policy call draws its initial flow-matching noise from a generator seeded with the
episode's seed, so a reuse setting and the baseline see the same noise sequence on the same
episode (paired comparison). The noise of call i does not depend on what earlier calls did.
"""

from __future__ import annotations

import inspect
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..envs.base import EpisodeEnv
from ..transforms.robot import ROBOTS
from .stats import latency

STATUSES = ("success", "failure", "error")


@dataclass
class EpisodeResult:
    task: str
    init_id: int
    seed: int
    status: str  # "success" | "failure" | "error" (env crash: neither success nor failure)
    steps: int = 0  # env steps taken (after any settle steps the env does in reset)
    calls: int = 0  # policy calls
    reuses: int = 0  # calls whose prefix was (at least partly) reused
    decisions: list[str] = field(default_factory=list)  # per call: "refresh" or "reuse:<mode>"
    reasons: list[str] = field(default_factory=list)  # per call: the gate's reason
    mixed: int = 0  # calls whose prefix mixed snapshots
    timings: dict[str, list[float]] = field(default_factory=dict)  # part -> per-call ms ("warmup": _record)
    error: str = ""
    wall_s: float = 0.0
    video: str = ""

    @property
    def success(self) -> bool | None:
        return None if self.status == "error" else self.status == "success"

    @property
    def reuse_rate(self) -> float:
        return self.reuses / self.calls if self.calls else 0.0

    def latency(self, part: str = "total") -> dict[str, float]:
        """mean / p50 / p95 in ms of one timing part over this episode's calls (NaN if none)."""
        lat = latency(self.timings.get(part, []))
        return {"mean": lat.mean, "p50": lat.p50, "p95": lat.p95}


class _EnvCrash(Exception):
    """Wraps an exception raised by the environment (not by the policy)."""


def _env_call(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any simulator failure is recorded, not raised
        raise _EnvCrash(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}") from e


def _accepts_noise(policy) -> bool:
    try:
        return "noise" in inspect.signature(policy.infer).parameters
    except (TypeError, ValueError):
        return False


def _reset_policy(policy, seed: int) -> None:
    try:
        params = inspect.signature(policy.reset).parameters
    except (TypeError, ValueError):
        params = {}
    policy.reset(seed=seed) if "seed" in params else policy.reset()


def run_episode(
    policy,
    env: EpisodeEnv,
    task: str,
    init_id: int,
    seed: int,
    replan: int = 5,
    max_steps: int | None = None,
    video_path: str | Path | None = None,
) -> EpisodeResult:
    """Roll out one episode. The policy is `kvreuse.policy.Policy` (baseline or with reuse):
    `reset()` and `infer(raw, noise=None) -> (actions (chunk, action_dim), StepRecord)`.

    Exceptions from the env are recorded as status "error"; exceptions from the policy propagate
    (a policy bug would repeat on every episode, so the sweep must stop)."""
    if replan < 1:
        raise ValueError(f"replan: expected an integer >= 1, got {replan}")
    limit = env.max_steps(task)
    if max_steps is not None:
        # Above the env's own limit the env would end the episode there (its `done`), silently.
        if not 1 <= max_steps <= limit:
            raise ValueError(f"max_steps: expected 1..{limit} (the env's episode limit for {task!r}), got {max_steps}")
        limit = max_steps
    spec = ROBOTS.get(getattr(env, "robot", None))
    dim = spec.action_dim if spec is not None else None
    res = EpisodeResult(task=task, init_id=init_id, seed=seed, status="failure")
    model = getattr(policy, "model", None)
    gen = torch.Generator(device=model.device if model is not None else "cpu").manual_seed(seed)
    pass_noise = model is not None and _accepts_noise(policy)
    frames: list[np.ndarray] = []
    t_start = time.perf_counter()
    try:
        _reset_policy(policy, seed)
        obs = _env_call(env.reset, task, init_id, seed)
        if video_path:
            frames.append(_env_call(env.render))
        done = success = False
        while res.steps < limit and not (done or success):
            if pass_noise:
                noise = model.make_noise(1, gen)
                actions, rec = policy.infer(obs, noise=noise)
            else:
                actions, rec = policy.infer(obs)
            _record(res, rec)
            actions = np.asarray(actions)
            if actions.ndim != 2 or (dim is not None and actions.shape[1] != dim):
                raise ValueError(f"policy returned actions of shape {actions.shape}; expected (chunk, "
                                 f"{dim or 'action_dim'}) for robot {getattr(env, 'robot', '?')!r}")
            for a in actions[:replan]:
                # The policy's fault, not the env's: raised here, it stops the sweep instead of
                # making the episode an env error (excluded from n) on every call that has one.
                if not np.isfinite(a).all():
                    raise ValueError(f"policy returned a non-finite action {a.tolist()} at step {res.steps} of "
                                     f"{task!r} init {init_id} seed {seed}")
                obs, success, done = _env_call(env.step, a)
                res.steps += 1
                if video_path:
                    frames.append(_env_call(env.render))
                if success or done or res.steps >= limit:
                    break
        res.status = "success" if success else "failure"
    except _EnvCrash as e:
        res.status, res.error = "error", str(e)
    res.wall_s = time.perf_counter() - t_start
    if video_path and frames:
        res.video = str(write_video(frames, video_path))
    return res


def _record(res: EpisodeResult, rec) -> None:
    """Count the call; its timings join the latency figures unless it was a warm-up (graphs
    captured, a model's first call: rec.warmup), whose total is kept apart under "warmup"."""
    res.calls += 1
    decision = getattr(rec, "decision", "refresh")
    mode = getattr(rec, "mode", "none")
    reused = decision == "reuse"
    res.reuses += int(reused)
    res.decisions.append(f"reuse:{mode}" if reused else "refresh")
    res.reasons.append(str(getattr(rec, "reason", "")))
    res.mixed += int(bool(getattr(rec, "mixed", False)))
    timings = getattr(rec, "timings", None) or {}
    if getattr(rec, "warmup", False):
        timings = {"warmup": timings["total"]} if "total" in timings else {}
    for part, ms in timings.items():
        res.timings.setdefault(part, []).append(round(float(ms), 4))


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 20) -> Path:
    """mp4 when imageio's ffmpeg plugin is installed, else an animated gif (same stem)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    kw: dict = {"duration": 1000 / fps, "loop": 0}
    if path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401

            kw = {"fps": fps, "macro_block_size": 1}
        except ImportError:
            path = path.with_suffix(".gif")
    # Written under a temporary name and renamed: a killed sweep leaves no half-written video.
    part = path.with_name(f".{path.stem}.part{path.suffix}")
    try:
        imageio.mimwrite(part, frames, **kw)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path
