"""Policy: checkpoint + robot transform + inference, what rollouts and the server call.

`infer(raw)` takes an openpi-style observation dict and returns the robot's action chunk
(chunk, action_dim), or (B, chunk, action_dim) for a batched one (state (B, state_dim)), and a
record of what was done. Every call goes through ReusePolicy; with
`reuse=None` (the `never` gate) that is the baseline, bit-identical to `model.sample_actions`
for the same observation and noise.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .model.pi0 import Pi0Model
from .reuse.config import ReuseConfig
from .reuse.policy import ReusePolicy
from .reuse.records import ReuseStats, StepRecord
from .transforms.robot import RobotTransform

__all__ = ["Policy", "StepRecord", "ReuseStats", "ReuseConfig"]


def robot_runtime(model: Pi0Model, spec, stats=None, tokenizer: str | Path | None = None, *, fast: bool = False,
                  keep_absent_cameras: bool = False):
    """(the model as this robot runs it, its RobotTransform), as every loader builds them: model
    cameras the robot lacks left out of the prefix (transforms.robot.fit_cameras; the same
    actions up to float rounding) unless keep_absent_cameras, which feeds them black and masked
    as lerobot / openpi do; the tokenizer from `tokenizer` (bytes for the tiny presets); fast:
    FastPi0 over the model (fused weights, static cache, CUDA graphs on a GPU). The config's state and
    action dims become the robot's (Pi0Model.with_robot_dims)."""
    from .model.tokenizer import load_tokenizer
    from .transforms.robot import fit_cameras

    check_stats(stats, spec)
    spec = spec.for_cameras(model.cfg.cameras)
    model = model.with_robot_dims(spec.state_dim, spec.action_dim)  # what the reuse layer's cues read
    if not keep_absent_cameras:
        model = fit_cameras(model, spec)
    tf = RobotTransform(model.cfg, load_tokenizer(model.cfg, tokenizer), stats, spec)
    if fast:
        from .model.fast import FastPi0

        model = FastPi0(model.eval())
    return model, tf


def check_stats(stats, spec, where: str = "norm stats") -> None:
    """Norm stats must cover the robot's state and actions: shorter ones (another robot's, or a
    dataset's of fewer dims) failed on the first call as a numpy broadcast error naming nothing.
    Longer ones are fine (openpi keeps them padded; the first dims are used)."""
    if stats is None:
        return
    for name, s, dim in (("state", stats.state, spec.state_dim), ("actions", stats.actions, spec.action_dim)):
        have = min(np.size(getattr(s, k)) for k in ("mean", "std", "q01", "q99"))
        if have < dim:
            raise ValueError(f"{where}: the {name} stats have {have} dims, robot {spec.name!r} has {dim} "
                             "(stats of another robot's data?)")


def check_runtime(cfg, spec, tokenizer: str | Path | None = None, *, keep_absent_cameras: bool = False,
                  stats=None, where: str = "norm stats") -> None:
    """robot_runtime's checks (the tokenizer file, the robot's cameras, the norm stats' dims) from a
    config alone, on a meta-device model: a bad --tokenizer or robot is refused before a full-size
    model's weights load. where: what the stats are named in an error (their checkpoint)."""
    check_stats(stats, spec, where)
    with torch.device("meta"):
        robot_runtime(Pi0Model(cfg), spec, None, tokenizer, keep_absent_cameras=keep_absent_cameras)


SEED_MAX = 2**64 - 1  # torch.manual_seed's largest; numpy's default_rng takes no negative seed


def check_seed(seed, name: str = "--seed") -> int:
    """A seed torch and numpy both take: past 2**64 - 1 torch said only 'Overflow when unpacking long long'."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name}: expected an integer in 0..{SEED_MAX} (2**64 - 1), got {seed!r}")
    return int(seed)


def random_model_config(cfg, spec):
    """`cfg` (a preset's) for a randomly initialised model that drives `spec`: the robot's cameras
    and dims, and with the byte tokenizer room for LIBERO's long prompts (+ the state, Pi0.5)."""
    cfg = cfg.replace(cameras=tuple(c for _, c in spec.cameras), state_dim=spec.state_dim, action_dim=spec.action_dim)
    if spec.name == "libero" and cfg.tokenizer == "bytes":
        cfg = cfg.replace(max_token_len=max(cfg.max_token_len, 192))
    return cfg


class Policy:
    def __init__(
        self, model: Pi0Model, transform: RobotTransform, seed: int = 0, reuse: ReuseConfig | None = None
    ):
        seed = check_seed(seed, "seed")
        if isinstance(reuse, dict):  # as stored in a results DB or a JSON file
            reuse = ReuseConfig.from_dict(reuse)
        mc = model.cfg
        if any(mc.delta_action_mask) and mc.state_in_prompt and (reuse or ReuseConfig()).enabled:
            # its actions are offsets from the state the prompt carried: after a reused prefix that is
            # an earlier call's, which nothing here tracks (no such checkpoint is known: openpi's
            # delta-action LIBERO policy is a Pi0, whose state token is tracked below)
            raise ValueError("reuse: a model whose actions are offsets from the state (delta_action_mask) and "
                             "whose state is in the prompt runs without reuse only (gate=never)")
        self.model = model.eval()
        self.transform = transform
        self._delta = any(mc.delta_action_mask)  # its actions are offsets from the state it was given
        self._fed_state = None
        self.generator = torch.Generator(device=model.device)
        self.seed = int(seed)
        self.reuse_config = reuse or ReuseConfig()
        self.runner = ReusePolicy(self.model, self.reuse_config)
        # Set to an ObservationStream to record every observation this policy sees (e.g. during
        # a rollout) for replay with `kvreuse compare ... --stream`.
        self.recorder = None
        self.reset()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        reuse: ReuseConfig | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        tokenizer: str | Path | None = None,
        dtype: torch.dtype | None = None,
        robot: str | None = None,
        fast: bool = False,
        keep_absent_cameras: bool = False,
    ) -> "Policy":
        """Load a checkpoint (ours, or lerobot / openpi safetensors). The RobotSpec is `robot`,
        else meta["robot"] (reference checkpoints carry none, so they need `robot`). fast,
        keep_absent_cameras: see robot_runtime."""
        from .checkpoint import checkpoint_config, checkpoint_stats, load_checkpoint
        from .devices import check_device, check_dtype
        from .transforms.robot import robot_spec

        device = check_device(str(device))
        if dtype is not None:  # as the CLI spells it, or a torch dtype (int8 once failed deep in load_state_dict)
            dtype = check_dtype(dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."))
        cfg, meta = checkpoint_config(path)  # headers only: every check below comes before the weights load
        robot = robot or meta.get("robot")
        if robot is None:
            raise ValueError(f"checkpoint {path}: names no robot; pass one (e.g. robot='libero' / --robot libero)")
        spec = robot_spec(robot)
        check_runtime(cfg, spec, tokenizer, keep_absent_cameras=keep_absent_cameras,
                      stats=checkpoint_stats(path), where=f"checkpoint {path}: norm stats")
        model, stats, meta = load_checkpoint(path, device=device, dtype=dtype)
        model, tf = robot_runtime(model, spec, stats, tokenizer, fast=fast,
                                  keep_absent_cameras=keep_absent_cameras)
        return cls(model, tf, seed=seed, reuse=reuse)

    def fork(self, reuse: ReuseConfig | None = None, seed: int | None = None) -> "Policy":
        """A new Policy sharing this one's model and transform (no weight copy), with its own
        cache, reuse state, noise generator and stats: one per client or per setting."""
        return Policy(self.model, self.transform, seed=self.seed if seed is None else seed,
                      reuse=self.reuse_config if reuse is None else reuse)

    def reset(self, seed: int | None = None) -> None:
        """Start an episode: reseeds the noise and drops the cache (never reused across resets)."""
        self._episode_seed = self.seed if seed is None else check_seed(seed, "seed")  # a recorder keeps it
        self.generator.manual_seed(self._episode_seed)
        self.runner.reset()

    @property
    def stats(self) -> ReuseStats:
        return self.runner.stats

    def raw_shapes(self, raw: dict) -> tuple:
        return tuple(tuple(np.shape(raw[k])) for k in self.transform.spec.camera_keys if k in raw)

    @torch.no_grad()
    def infer(self, raw: dict, noise: torch.Tensor | None = None, reset: bool = False) -> tuple[np.ndarray, StepRecord]:
        """reset: start an episode with this observation (as reset() first), applied only once the
        observation has passed the transform's checks, so a rejected one changes nothing."""
        t0 = time.perf_counter()
        obs = self.transform(raw, device=self.model.device)
        c = self.model.cfg
        want = (obs.batch_size, c.chunk_size, c.max_action_dim)
        if noise is not None and (not isinstance(noise, torch.Tensor) or tuple(noise.shape) != want
                                  or not noise.is_floating_point()):  # int noise ran truncated
            got = f"{tuple(noise.shape)} {noise.dtype}" if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise: expected a floating-point torch.Tensor of shape {want} (batch, chunk, max "
                             f"action dim), got {got}")
        if reset:
            self.reset()
        first = self.runner.call_index == 0
        if noise is None:
            noise = self.model.make_noise(obs.batch_size, self.generator)
        # The record's total covers the input transform too (what a client waits for).
        out, rec = self.runner.infer(obs, noise, raw_shapes=self.raw_shapes(raw), started=t0)
        answered, key = raw, self.transform.spec.state_key
        if self._delta:  # the state added back is the one the model was given
            if rec.state_source == "snapshot":  # a synchronized hit denoised with the snapshot's
                answered = {**raw, key: self._fed_state}
            else:
                self._fed_state = np.array(raw[key])
        actions = self.transform.actions(out, answered)
        if self.recorder is not None:  # only calls that gave actions: a replay has one per step
            self.recorder.add(raw, reset=first, seed=self._episode_seed if first else None)
        return (actions if self.transform.batched(raw) else actions[0]), rec
