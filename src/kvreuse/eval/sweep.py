"""Paired sweeps: a grid of reuse settings (plus the baseline) x tasks x init states, run in
parallel worker processes, each finished episode committed to the results DB.

Pairing: the episode list (task, init_id, seed) is built once and every setting, baseline
included, runs exactly that list. The seed fixes the env reset and the policy's noise sequence
(see rollout.py), so differences between settings come from reuse alone.

Workers: `spawn` processes, each loads the policy once (one model shared by every setting the
worker runs) and keeps one env; torch runs single-threaded in each. The parent is the only
writer of the DB: results arrive over the pool and are committed one episode per transaction.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..assets import shipped_checkpoint
from ..workers import die_with_parent
from .envs import (check_env_name, check_episodes, check_tasks, make_env, repeated_inits_note,
                   training_layouts_note)
from .rollout import EpisodeResult, run_episode
from .store import SCHEMA_VERSION, ResultStore, Setting, setting_group

# ---- policy source ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySource:
    """Where the policy comes from and how it runs. checkpoint=None: the shipped testbed policy
    on the Meta-World robot (resolved), else a randomly initialised `preset` (seeded: the same
    weights in every worker). dtype: the weights' (float32 | bfloat16). fast: through FastPi0 (CUDA graphs and the
    Triton kernels on a GPU). Model cameras the env lacks are left out of the prefix unless
    keep_absent_cameras (fed black and masked, as lerobot / openpi do). tokenizer: the PaliGemma
    SentencePiece `tokenizer.model` a full-size checkpoint needs (the tiny presets use bytes)."""

    checkpoint: str | None = None
    preset: str = "tiny-pi05"
    device: str = "cpu"
    fast: bool = False
    keep_absent_cameras: bool = False
    dtype: str = "float32"
    tokenizer: str | None = None

    def __post_init__(self):
        from ..devices import check_device, check_dtype

        check_dtype(self.dtype)
        if self.tokenizer is not None:  # serve's check and wording (a directory, a missing or huge file)
            from ..model.tokenizer import check_tokenizer_file

            check_tokenizer_file(self.tokenizer)
        from ..model.config import PRESETS

        if self.preset not in PRESETS:  # else an unknown name would silently run a shipped policy
            raise ValueError(f"preset: unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        check_device(self.device)

    def resolved(self, robot: str = "metaworld") -> "PolicySource":
        """The shipped policy drives the Meta-World testbed only; other robots (LIBERO) get
        the random preset unless a checkpoint is given."""
        if self.checkpoint is not None or robot != "metaworld":
            return self
        ckpt = shipped_checkpoint(self.preset)
        return replace(self, checkpoint=str(ckpt)) if ckpt else self


def checkpoint_meta(src: PolicySource) -> dict:
    """Our checkpoint's config.json; {} for a random preset or a reference (lerobot / openpi)
    checkpoint, whose config names no robot or tasks."""
    if src.checkpoint is None:
        return {}
    from ..checkpoint import checkpoint_format, read_meta

    return read_meta(src.checkpoint) if checkpoint_format(src.checkpoint) == "kvreuse" else {}


def checkpoint_tasks(src: PolicySource) -> tuple[str, ...] | None:
    return _meta_tasks(checkpoint_meta(src))


# Changes of the policy id, oldest first: what it began to name, and how rows under the id before
# may differ. A DB written before change i holds a policy's settings under policy_identity(src, i).
ID_CHANGES = (("the device and missing norm stats", "on another device, or before the norm stats were there"),
              ("the norm stats", "under other norm stats"),
              ("the model config", "under another config.json (Euler steps, chunk, prompt length, ...)"),
              ("a model.safetensors by its folder", "with the same weights (its file named, not its folder)"))


def policy_identity(src: PolicySource, era: int = len(ID_CHANGES)) -> str:
    """A stable id of the weights and of what changes their actions (the fast runtime rounds
    differently; a masked camera slot too): results of different policies never mix in one setting.
    A checkpoint's norm stats are named by a hash of those it applies (`+stats@<sha8>`), so stats
    replaced beside its weights form another policy; without stats it runs unnormalized (`+no-stats`).
    era: the id as DBs written before ID_CHANGES[era] hold it (the tags of that change and later ones
    left out); the default, today's."""
    cfg = None
    if src.checkpoint is not None:
        from ..checkpoint import checkpoint_config

        cfg = checkpoint_config(src.checkpoint)[0]  # once: a reference checkpoint's keys are matched for it
    digest = _stats_digest(src.checkpoint, cfg.variant) if cfg is not None else None
    # A GPU rounds differently (TF32 convolutions) and its calls take a fraction of a CPU's: a
    # setting continued on another device would average both into one row. cuda:N is one device type.
    dev = src.device.split(":")[0]
    tok = f"tok@{_sha12(Path(src.tokenizer))}" if src.tokenizer is not None else ""
    # A Pi0.5 run without its state (discrete_state_input false in, or inferred for, its config):
    # another prompt, so another policy. Off for every run before the option existed.
    stateless = cfg is not None and cfg.variant == "pi05" and not cfg.state_in_prompt
    # Actions given as offsets from the state (delta_action_mask): the state added back, other actions.
    # Added with +cfg@ (whose hash holds the mask too): older ids lack both.
    delta = "delta@" + "".join("1" if d else "0" for d in cfg.delta_action_mask) if cfg is not None else ""
    # (tag, on, the era it was added in: 0 from the start, i + 1 by ID_CHANGES[i])
    tags = ((dev, dev != "cpu", 1), (src.dtype, src.dtype != "float32", 0), ("fast", src.fast, 0),
            ("masked-cameras", src.keep_absent_cameras, 0), ("no-state-input", stateless, 0),
            (delta, cfg is not None and any(cfg.delta_action_mask), 3),
            ("no-stats", src.checkpoint is not None and digest is None, 1),
            (f"stats@{digest}", digest is not None, 2), (tok, bool(tok), 0),
            (f"cfg@{_config_digest(cfg)}" if cfg is not None else "", cfg is not None, 3))
    return "+".join([_weights_identity(src, era)] + [tag for tag, on, since in tags if on and since <= era])


def _config_digest(cfg) -> str:
    """8 hex digits of the model config a checkpoint's config.json resolves to (Euler steps, chunk,
    prompt length, cameras, ...: the weights' hash does not cover an edited config.json). Only fields
    away from ModelConfig's defaults are hashed, so a field added later with its default keeps the id."""
    from ..model.config import ModelConfig

    ours, default = cfg.to_dict(), ModelConfig().to_dict()
    moved = {k: v for k, v in ours.items() if v != default[k]}
    return hashlib.sha1(json.dumps(moved, sort_keys=True).encode()).hexdigest()[:8]


def _stats_digest(checkpoint: str, variant: str) -> str | None:
    """8 hex digits of the norm stats a run of `checkpoint` applies, or None if it has none. Hashed:
    what normalize / unnormalize read (each side's mode and that mode's two arrays), not the file's
    bytes, nor stats no mode reads (NaN where a file lacks them): the same stats from a lerobot or an
    openpi file agree."""
    from ..checkpoint import checkpoint_stats
    from ..transforms.normalize import NEEDS

    stats = checkpoint_stats(checkpoint)
    if stats is None:
        return None
    modes = stats.modes(variant)
    applied = {side: {"mode": m, **{k: [float(v) for v in getattr(s, k)] for k in NEEDS[m]}}
               for side, s, m in zip(("state", "actions"), (stats.state, stats.actions), modes, strict=True)}
    return hashlib.sha1(json.dumps(applied, sort_keys=True).encode()).hexdigest()[:8]


def _note_older_id(store, settings: list, src: PolicySource, db: str) -> None:
    """A DB written before a change of the policy id (ID_CHANGES) holds these settings under the older
    id: say that they are not continued, rather than start over without a word. One note, for the
    newest older id the DB holds; nothing stored is touched."""
    if not settings:
        return
    have = {r["key"] for r in store.settings()}
    if any(s.key in have for s in settings):
        return
    for era in reversed(range(len(ID_CHANGES))):
        old_id = policy_identity(src, era)
        old = [s for s in settings if replace(s, policy=old_id).key in have] if old_id != settings[0].policy else []
        if old:
            what, how = zip(*ID_CHANGES[era:], strict=True)
            print(f"note: {db} holds {len(old)} of these settings under the policy id {old_id}, recorded before "
                  f"policy ids named {', then '.join(what)}; they are not continued (they may have run "
                  f"{', or '.join(how)}): this run records its own rows", file=sys.stderr)
            return


def _protocol(plan) -> str:
    """A setting's protocol: step limit and env options. LIBERO's scenes="first" is left out, as in the
    rows from before scenes had a name (they ran that way), so such a run continues them."""
    env_kw = dict(plan.env_kw)
    if plan.env.startswith("libero:") and env_kw.get("scenes") == "first":
        del env_kw["scenes"]
    return json.dumps({"max_steps": plan.max_steps, "env": env_kw}, sort_keys=True)


def _note_older_scenes(store, settings: list, plan) -> None:
    """LIBERO settings stored before episode k got openpi's fixture layout k (their protocol is the one
    of scenes="first": every episode in episode 0's layout) are not continued: say so."""
    if plan.env_kw.get("scenes") != "openpi":
        return
    have = {r["key"] for r in store.settings()}
    if any(s.key in have for s in settings):
        return
    older = _protocol(replace(plan, env_kw={**plan.env_kw, "scenes": "first"}))
    n = sum(replace(s, protocol=older).key in have for s in settings)
    if n:
        print(f"note: {plan.db} holds {n} of these settings from before LIBERO's episode k ran in openpi's fixture "
              "layout k (theirs all ran in episode 0's, reported as `env scenes=first`); they are not continued "
              "(`--libero-scenes first` would): this run records its own rows", file=sys.stderr)


def _weights_identity(src: PolicySource, era: int = len(ID_CHANGES)) -> str:
    return weights_identity(src.checkpoint, src.preset, era)


def weights_identity(checkpoint: str | None, preset: str, era: int = len(ID_CHANGES)) -> str:
    """The first part of a policy id: which weights (a checkpoint's by a hash of its file)."""
    if checkpoint is None:
        return f"random:{preset}:seed0"
    p = Path(checkpoint)
    w = p if p.is_file() else p / "model.safetensors"  # a reference checkpoint may be given as its file
    if not w.is_file():
        raise ValueError(f"checkpoint {p}: no model.safetensors (only safetensors weights are read)")
    if era < 4:
        return f"{p.name}@{_sha12(w)}"
    # DIR and DIR/model.safetensors are one checkpoint, named by the folder either way ("." by its name too)
    a = Path(os.path.abspath(p))
    return f"{a.parent.name if a.is_file() and a.name == 'model.safetensors' else a.name}@{_sha12(w)}"


def _sha12(path: Path) -> str:
    st = path.stat()  # a full-size checkpoint is GBs: hashed once per process while unchanged
    return _sha12_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha12_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def load_model(src: PolicySource, robot: str):
    """-> (model, RobotTransform, tasks the checkpoint was trained on or None)."""
    import torch

    from ..policy import random_model_config, robot_runtime
    from ..transforms.robot import robot_spec

    spec = robot_spec(robot)
    if src.checkpoint is None:
        from ..model import Pi0Model, preset

        cfg = preset(src.preset)
        if cfg.tokenizer != "bytes":
            raise ValueError(f"preset {src.preset!r} needs a checkpoint (random weights only for tiny presets)")
        cfg = random_model_config(cfg, spec)
        torch.manual_seed(0)
        model = Pi0Model(cfg).to(src.device, getattr(torch, src.dtype)).eval()
        return (*robot_runtime(model, spec, fast=src.fast), None)
    from ..checkpoint import load_checkpoint

    model, stats, meta = load_checkpoint(src.checkpoint, device=src.device, dtype=getattr(torch, src.dtype))
    ck_robot = meta.get("robot", robot)
    if ck_robot != robot:
        raise ValueError(f"checkpoint {src.checkpoint} drives robot {ck_robot!r}, the env needs {robot!r}")
    model, tf = robot_runtime(model, spec, stats, src.tokenizer, fast=src.fast,
                              keep_absent_cameras=src.keep_absent_cameras)
    return model, tf, _meta_tasks(meta)


def _meta_tasks(meta: dict) -> tuple[str, ...] | None:
    """Tasks a checkpoint was trained on (top level, or in its training record)."""
    tasks = meta.get("tasks") or (meta.get("training") or {}).get("tasks")
    return tuple(tasks) if tasks else None


def default_tasks(env, trained: tuple[str, ...] | None) -> tuple[str, ...]:
    """Tasks to run when none are asked for: those the checkpoint was trained on that this env
    has, else all of the env's (e.g. the fake env under a Meta-World checkpoint)."""
    known = tuple(t for t in trained or () if t in env.tasks)
    return known or tuple(env.tasks)


def make_policy(model, transform, reuse: dict | None):
    """Baseline (reuse None) and reuse settings through the one Policy class."""
    from ..policy import Policy

    if reuse is None:
        return Policy(model, transform)
    check_reuse_supported()
    return Policy(model, transform, reuse=reuse_config(reuse))


def check_reuse_supported() -> None:
    import inspect

    from ..policy import Policy

    if "reuse" not in inspect.signature(Policy).parameters:
        raise ValueError("this kvreuse has no reuse layer yet (Policy takes no `reuse`); run the baseline only")


def reuse_config(reuse: dict):
    from ..reuse.config import ReuseConfig

    return ReuseConfig.from_dict(reuse)


def canonical_reuse(params: dict) -> tuple[dict, str]:
    """User parameters -> (the fields that differ from today's defaults, display label)."""
    from ..reuse.config import ReuseConfig

    cfg = ReuseConfig.from_dict(params)
    return cfg.diff_from(ReuseConfig().to_dict()), cfg.label()


def canonical_grid(grid: list[dict]) -> list[tuple[dict, str]]:
    """canonical_reuse of every grid setting; one that never reuses (gate=never) is the baseline,
    which is always run: naming it in a grid is a mistake, not a second baseline."""
    out = [canonical_reuse(p) for p in grid]
    same = [p for p, (params, _) in zip(grid, out, strict=True) if not reuse_config(params).enabled]
    if same:
        raise ValueError(f"grid: {same[0]} never reuses: that is the baseline, which always runs; leave it out")
    # 'gate=threshold' and 'gate=threshold threshold=0.985' (the default) are one setting: run it once.
    return [x for i, x in enumerate(out) if x[0] not in [p for p, _ in out[:i]]]


# ---- grids -----------------------------------------------------------------------------------


def _value(s: str):
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def parse_grid(specs: list[str] | tuple[str, ...]) -> list[dict]:
    """Each spec is 'key=v1,v2 key2=v3 ...' (a cartesian product); specs are unioned.
    e.g. ["gate=threshold threshold=0.98,0.985 mode=full,vision_only", "gate=period period=2,4"]."""
    out: list[dict] = []
    for spec in specs:
        axes: list[tuple[str, list]] = []
        for item in spec.split():
            if "=" not in item:
                raise ValueError(f"grid: expected key=v1,v2 items, got {item!r} in {spec!r}")
            k, vs = item.split("=", 1)
            if not k or not vs:
                raise ValueError(f"grid: expected key=v1,v2 items, got {item!r} in {spec!r}")
            if k in (a for a, _ in axes):  # the last would silently win
                raise ValueError(f"grid: {k!r} given twice in {spec!r}; list its values once: {k}=v1,v2")
            glued = [v for v in vs.split(",") if "=" in v]  # 'gate=crossmodal,max_age_calls=1': a value of gate
            if glued:  # the spaced form keeps every value: a comma before a 'key=' piece becomes a space
                first, *rest = item.split(",")
                spaced = first + "".join((" " if "=" in v else ",") + v for v in rest)
                raise ValueError(f"grid: {k}={vs!r} holds {glued[0]!r} as one of {k}'s values; separate fields with "
                                 f"spaces and a field's values with commas: {spaced}")
            axes.append((k, [_value(v) for v in vs.split(",")]))
        combos = [dict(zip((k for k, _ in axes), c, strict=True)) for c in itertools.product(*(v for _, v in axes))]
        _check_read(spec, [k for k, _ in axes], combos)
        out += [d for d in combos if d not in out]
    return out


def _check_read(spec: str, keys: list[str], combos: list[dict]) -> None:
    """A key that no setting of its spec reads is a mistake (gate=period threshold=0.9): say so."""
    from ..reuse.config import ReuseConfig

    unused = [set(ReuseConfig.from_dict(d).unused_fields()) for d in combos]
    for k in keys:
        if all(k in u for u in unused):
            gates, modes = ({d.get(f, dflt) for d in combos} for f, dflt in (("gate", "never"), ("mode", "full")))
            why = {"downsample": " (it is read by image_metric=raw only)",
                   "state_reference": " (it is read by the crossmodal gate with vision_only, state_only or partial, "
                                      "and not under synchronized=true)"}.get(k, "")
            raise ValueError(f"grid: {k} has no effect with gate {'/'.join(sorted(map(str, gates)))} and mode "
                             f"{'/'.join(sorted(map(str, modes)))}{why} (in {spec!r}); leave it out")


# ---- episodes --------------------------------------------------------------------------------


def episode_seed(base_seed: int, task: str, index: int) -> int:
    """Seed of episode `index` of `task`: the same for every setting (pairing)."""
    return zlib.crc32(f"{base_seed}:{task}:{index}".encode()) & 0x7FFFFFFF


def episode_list(env, tasks, episodes: int, init_start: int = 0, base_seed: int = 0) -> list[tuple[str, int, int]]:
    if episodes < 1:
        raise ValueError(f"episodes: expected an integer >= 1 per task, got {episodes}")
    out = []
    for i in range(episodes):
        for task in tasks:
            n = env.num_inits(task)
            out.append((task, (init_start + i) % n, episode_seed(base_seed, task, i)))
    return out


# ---- workers ---------------------------------------------------------------------------------

_W: dict = {}


def _worker_init(src: PolicySource, env_name: str, env_kw: dict, robot: str, threads: int) -> None:
    # A failing initializer makes multiprocessing.Pool respawn workers forever: keep the error
    # and raise it from the first job instead, which stops the sweep.
    try:
        import torch

        torch.set_num_threads(threads)
        _W.update(src=src, env_name=env_name, env_kw=env_kw, env=None, policies={}, init_error=None)
        _W["model"], _W["transform"], _ = load_model(src, robot)
    except BaseException as e:  # noqa: BLE001
        _W["init_error"] = e


def _worker_run(job: tuple) -> tuple[str, EpisodeResult]:
    if _W.get("init_error") is not None:
        raise _W["init_error"]
    key, reuse, task, init_id, seed, replan, max_steps, video, stream, policy_id = job
    pol = _W["policies"].get(key)
    if pol is None:
        pol = _W["policies"][key] = make_policy(_W["model"], _W["transform"], reuse)
    if _W["env"] is None:
        _W["env"] = make_env(_W["env_name"], **_W["env_kw"])
    rec = None
    if stream is not None:  # every observation the policy sees, for replay (kvreuse compare --stream)
        from ..reuse.stream import ObservationStream

        rec = ObservationStream(robot=_W["transform"].spec.name,
                                meta={"setting": key, "reuse": reuse, "task": task, "init_id": init_id, "seed": seed,
                                      "policy": policy_id})  # compare notes a replay through other weights
    pol.recorder = rec
    try:
        res = run_episode(pol, _W["env"], task, init_id, seed, replan=replan, max_steps=max_steps, video_path=video)
    finally:
        pol.recorder = None
    if rec is not None and len(rec):
        rec.save(stream)
    if res.status == "error":  # the simulator may be left broken: start a fresh one
        try:
            _W["env"].close()
        except Exception:  # noqa: BLE001 - a crashed env may fail to close too
            pass
        _W["env"] = None
    return key, res


# ---- sweep -----------------------------------------------------------------------------------


@dataclass
class SweepPlan:
    db: str = "runs/kvreuse.db"
    env: str = "metaworld"
    tasks: tuple[str, ...] = ()  # empty: the checkpoint's tasks, else all of the env's
    episodes: int = 50  # per task
    init_start: int = 0
    seed: int = 0
    replan: int = 5
    max_steps: int | None = None  # None: the env's per-task limit
    grid: list[dict] = field(default_factory=list)  # reuse parameter dicts; baseline is added
    baseline: bool = True
    workers: int = 0  # 0: in this process
    videos: int = 0  # record the first N episodes of each task and setting
    video_dir: str = "runs/videos"
    streams: int = 0  # record the observation streams of the first N episodes of each task and setting
    stream_dir: str = "runs/streams"
    env_kw: dict = field(default_factory=dict)
    progress: bool = True
    retry_errors: bool = False  # run again the episodes stored as errors (a killed worker, a crash)
    kept: bool = True  # stopped early, say what the DB keeps (not for bench-eval's throw-away DB)


@dataclass
class SweepSummary:
    settings: list[Setting]
    ran: int
    skipped: int
    errors: int
    wall_s: float
    first_result_s: float  # seconds from start until the first episode came back (start-up)
    tasks: tuple[str, ...] = ()  # the tasks this sweep covered (run or skipped)
    stored_elsewhere: int = 0  # run here, but another process (a concurrent sweep) had stored them first
    episodes: tuple[tuple[str, int, int], ...] = ()  # this sweep's (task, init id, seed) list
    ran_keys: frozenset[str] = frozenset()  # the settings (keys) that had episodes run here, not only skipped


def run_sweep(plan: SweepPlan, src: PolicySource) -> SweepSummary:
    from ..model.config import preset as model_preset

    check_env_name(plan.env)
    if plan.replan < 1:
        raise ValueError(f"replan: expected an integer >= 1, got {plan.replan}")
    if plan.workers < 0:
        raise ValueError(f"workers: expected an integer >= 0, got {plan.workers}")
    if plan.max_steps is not None and plan.max_steps < 1:
        raise ValueError(f"max_steps: expected an integer >= 1 (or none: the env's limit), got {plan.max_steps}")
    if plan.init_start < 0:
        raise ValueError(f"init_start: expected an integer >= 0, got {plan.init_start}")
    for name, v in (("videos", plan.videos), ("streams", plan.streams)):
        if v < 0:
            raise ValueError(f"{name}: expected an integer >= 0 (episodes per task and setting), got {v}")
    env = make_env(plan.env, **plan.env_kw)
    try:
        robot = env.robot
        src = src.resolved(robot)
        if src.checkpoint is None and model_preset(src.preset).tokenizer != "bytes":
            raise ValueError(f"preset {src.preset!r} needs a checkpoint (random weights only for tiny presets)")
        if src.checkpoint is None:
            # A plain line: a Python warning would also echo a source line of this file.
            print(f"warning: no checkpoint for robot {robot!r}: using a randomly initialised {src.preset} "
                  "(success will be ~0)", file=sys.stderr)
        if src.checkpoint is not None:  # unreadable / ill-typed files: one error before the DB and workers
            from ..checkpoint import check_checkpoint

            check_checkpoint(src.checkpoint)
        meta = checkpoint_meta(src)
        tok_kind = (meta.get("model") or {}).get("tokenizer") or (
            model_preset(src.preset).tokenizer if src.checkpoint is None else None)  # None: a reference's, unknown yet
        if src.tokenizer is not None and tok_kind == "bytes":
            raise ValueError(f"tokenizer: {src.checkpoint or src.preset} uses the built-in byte tokenizer; "
                             "--tokenizer (PaliGemma's tokenizer.model) is for full-size checkpoints")
        if src.tokenizer is None and tok_kind == "sentencepiece":
            raise ValueError(f"checkpoint {src.checkpoint} needs the PaliGemma SentencePiece tokenizer: "
                             "pass --tokenizer PATH/tokenizer.model")
        ck_robot = meta.get("robot")
        if ck_robot is not None and ck_robot != robot:
            raise ValueError(f"checkpoint {src.checkpoint} drives robot {ck_robot!r}; env {plan.env!r} needs {robot!r}")
        if src.checkpoint is not None:  # a reference's tokenizer, the tokenizer file, the cameras: not after the load
            from ..checkpoint import checkpoint_config, checkpoint_stats
            from ..policy import check_runtime
            from ..transforms.robot import robot_spec

            cfg = checkpoint_config(src.checkpoint)[0]
            check_runtime(cfg, robot_spec(robot), src.tokenizer, keep_absent_cameras=src.keep_absent_cameras,
                          stats=checkpoint_stats(src.checkpoint), where=f"checkpoint {src.checkpoint}: norm stats")
        else:
            cfg = model_preset(src.preset)
        if plan.replan > cfg.chunk_size:
            # The rollout executes at most one chunk per call: a larger replan would run as the chunk
            # size while the DB records (and keeps apart) the larger one.
            raise ValueError(f"replan: {plan.replan} is above the policy's action chunk of {cfg.chunk_size} "
                             f"actions ({src.checkpoint or src.preset}); give at most {cfg.chunk_size}")
        # Validate everything before any work starts (bad input -> one ValueError).
        settings_params: list[tuple[dict | None, str]] = [(None, "baseline")] if plan.baseline else []
        settings_params += canonical_grid(plan.grid)
        if plan.grid:
            check_reuse_supported()
        policy_id = policy_identity(src)
        tasks = check_tasks(env, plan.tasks) if plan.tasks else default_tasks(env, _meta_tasks(meta))
        check_episodes(env, plan.env, tasks, plan.init_start, plan.max_steps)
        explicit = None  # a --max-steps equal to every task's own limit: the same episodes as none given
        if plan.max_steps is not None and all(env.max_steps(t) == plan.max_steps for t in tasks):
            explicit, plan = plan.max_steps, replace(plan, max_steps=None)
        episodes = episode_list(env, tasks, plan.episodes, plan.init_start, plan.seed)
        for note in (training_layouts_note(plan.env, episodes),
                     repeated_inits_note(env, plan.episodes, tasks)):
            if note:
                print(note, file=sys.stderr)
        if any(p is not None and p.get("max_age_s") is not None for p, _ in settings_params):
            print("note: max_age_s bounds the cache's age in wall-clock seconds; between a rollout's policy calls "
                  "these are simulation, rendering and the machine's load (they change with --workers), not a "
                  "robot's control period, so such a setting's reuse varies from run to run (max_age_calls does "
                  "not)", file=sys.stderr)
        from ..outputs import check_dir_out

        # Written by the workers after an episode: an unwritable folder would stop the sweep there,
        # losing that episode, with a traceback.
        for n, folder, what in ((plan.videos, plan.video_dir, "videos"), (plan.streams, plan.stream_dir, "streams")):
            if n:
                check_dir_out(folder, f"--{what}: folder")
        if src.checkpoint is not None:  # once all is checked: a warning, then no error
            from ..checkpoint import print_checkpoint_notes

            print_checkpoint_notes(src.checkpoint)
        plan = _trained_render_size(plan, env, meta)
        if plan.env.startswith("libero:") and "scenes" not in plan.env_kw:
            # openpi's fixture layout k for episode k (LiberoEnv's default): named in the protocol, so
            # these episodes never pair with those run before it, all in episode 0's layout
            plan = replace(plan, env_kw={**plan.env_kw, "scenes": "openpi"})
    finally:
        env.close()
    protocol = _protocol(plan)
    settings = []
    for reuse, label in settings_params:
        s = Setting(policy_id, plan.env, plan.replan, reuse, label, protocol)
        if s.key not in {x.key for x in settings}:
            settings.append(s)
    if not settings:
        raise ValueError("nothing to run: give a grid, or keep the baseline")

    named: dict[str, set[str]] = {}  # setting (fields vs today's defaults) -> the fields its grid entries name
    for params in plan.grid:
        named.setdefault(json.dumps(canonical_reuse(params)[0], sort_keys=True), set()).update(params)
    store = ResultStore(plan.db)
    if explicit is not None:
        # Stored as the default, so it pairs with runs without --max-steps; a DB that holds this
        # sweep under the explicit limit alone (recorded before) is continued under it.
        old = [replace(s, protocol=_protocol(replace(plan, max_steps=explicit))) for s in settings]
        have = {r["key"] for r in store.settings()}
        if any(s.key in have for s in old) and not any(s.key in have for s in settings):
            settings = old
    try:
        settings, configs = _as_stored(store, settings, named, plan.db)
    except BaseException:
        store.close()
        raise
    _note_older_id(store, settings, src, plan.db)
    _note_older_scenes(store, settings, plan)
    ids = {s.key: store.setting_id(s) for s in settings}
    if store.upgraded_from is not None:
        print(f"note: {plan.db}: upgraded from schema version {store.upgraded_from} to {SCHEMA_VERSION}: it now "
              "records the reuse defaults its settings are relative to (an older kvreuse cannot open it)",
              file=sys.stderr)
    done = {s.key: store.done(ids[s.key], errors=not plan.retry_errors) for s in settings}
    jobs, skipped = [], 0
    unrecorded = {"videos": 0, "streams": 0}  # asked for, but the episode is in the DB and has no file yet
    # Task-major order: a worker mostly stays on one task (switching rebuilds the simulator);
    # every setting of one episode is queued together, so a partial sweep stays paired.
    order = sorted(range(len(episodes)), key=lambda j: tasks.index(episodes[j][0]))
    for j in order:
        task, init_id, seed = episodes[j]
        i = j // len(tasks)  # episode index within its task
        stem = f"{task}_{init_id}_{seed}"
        for s in settings:
            video = str(Path(plan.video_dir) / s.key / f"{stem}.mp4") if i < plan.videos else None
            stream = str(Path(plan.stream_dir) / s.key / f"{stem}.safetensors") if i < plan.streams else None
            if (task, init_id, seed) in done[s.key]:
                skipped += 1
                if video and not any(Path(video).with_suffix(x).is_file() for x in (".mp4", ".gif")):
                    unrecorded["videos"] += 1
                if stream and not Path(stream).is_file():
                    unrecorded["streams"] += 1
                continue
            jobs.append((s.key, configs[s.key], task, init_id, seed, plan.replan, plan.max_steps, video, stream,
                         policy_id))
    for what, n in unrecorded.items():
        if n:  # only a run records them: a rerun skips stored episodes, and the folder stayed empty silently
            print(f"note: --{what}: {n} of the episodes to record are already in {plan.db} and are not run "
                  f"again, so nothing is recorded for them; to record them, give a new --db", file=sys.stderr)

    t0 = time.perf_counter()
    first = [None]
    ran = errors = elsewhere = 0
    ran_keys: set[str] = set()
    bar = _progress(len(jobs), plan.progress)
    try:
        for key, res in _results(jobs, plan, src, robot):
            if first[0] is None:
                first[0] = time.perf_counter() - t0
            elsewhere += not store.add(ids[key], res)
            ran += 1
            ran_keys.add(key)
            errors += res.status == "error"
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{res.task} {res.status}")
    except (KeyboardInterrupt, Exception) as e:  # Ctrl-C, a policy's or the disk's error: say what is kept
        from ..outputs import stop_keeping

        if not plan.kept:
            raise
        stop_keeping(e, "sweep", f"{ran} of the {len(jobs)} episodes this run had to do are in {plan.db}; "
                                 "the same command continues from there")
    finally:
        if bar is not None:
            bar.close()
        store.close()
    return SweepSummary(settings, ran, skipped, errors, time.perf_counter() - t0, first[0] or 0.0, tasks, elsewhere,
                        tuple(episodes), frozenset(ran_keys))


def _as_stored(store: ResultStore, settings: list[Setting], named: dict[str, set[str]],
               db: str) -> tuple[list[Setting], dict[str, dict | None]]:
    """Each setting (its reuse: the fields that differ from today's defaults) as this DB holds it:
    relative to the defaults the DB records, or the row of the same meaning already there (rows
    written before the DB recorded its defaults mean those of their day). A new setting whose key an
    older row of another meaning holds is refused unless the setting names the fields that differ.
    Also -> each setting's full reuse config by key (for the workers: today's defaults are not the DB's)."""
    from ..reuse.config import ReuseConfig

    rows = [r for r in store.settings() if not r["is_baseline"]]
    out, configs = [], {}
    means: dict[int, dict | None] = {}  # row id -> _means, parsed once for all the settings of its group
    for s in settings:
        if s.reuse is None:
            out.append(s)
            configs[s.key] = None
            continue
        cfg = ReuseConfig.from_dict(s.reuse)
        mine = [r for r in rows if setting_group(r) == (s.policy, s.env, s.replan, s.protocol)]
        for r in mine:
            if r["id"] not in means:
                means[r["id"]] = _means(store, r)
        same = [r for r in mine if means[r["id"]] == s.reuse]
        same_ids = {r["id"] for r in same}
        new = replace(s, reuse=cfg.diff_from(store.reuse_defaults))
        taken = next((r for r in mine if r["key"] == new.key), None)
        if taken is not None and taken["id"] not in same_ids:
            old = store.row_config(taken)
            fields = sorted(k for k in cfg.read_fields() | old.read_fields() if getattr(cfg, k) != getattr(old, k))
            if not set(fields) <= named.get(json.dumps(s.reuse, sort_keys=True), set()):
                was = " ".join(f"{k}={_spell(getattr(old, k))}" for k in fields)
                now = " ".join(f"{k}={_spell(getattr(cfg, k))}" for k in fields)
                when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(taken["created"]))
                raise ValueError(f"setting {s.label}: {db} holds it as {taken['name']!r}, recorded {when} under that "
                                 f"day's reuse defaults, where it means {was}; today's defaults make it {now}. Name "
                                 f"the value: {was} continues that row, {now} is stored apart from it")
            # Named: the fields join its identity, so it is stored apart from that row.
            new = replace(new, reuse={**new.reuse, **{k: getattr(cfg, k) for k in fields}})
            if any(r["key"] == new.key for r in mine) and not same:
                raise ValueError(f"setting {s.label}: {db} holds another setting under its key {new.key}; give "
                                 "another --db")
        if same:  # the row of the natural key if it is one of them, else the first recorded
            row = taken if taken is not None and taken["id"] in same_ids else same[0]
            new = replace(s, reuse=json.loads(row["reuse"]))
        out.append(new)
        configs[new.key] = cfg.to_dict()
    return out, configs


def _means(store: ResultStore, row) -> dict | None:
    """A settings row's reuse setting as fields that differ from today's defaults (None: unreadable,
    a field a later kvreuse added)."""
    from ..reuse.config import ReuseConfig

    try:
        return store.row_config(row).diff_from(ReuseConfig().to_dict())
    except ValueError:
        return None


def _spell(v) -> str:
    """A value as a grid spec writes it."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def _trained_render_size(plan: SweepPlan, env, meta: dict) -> SweepPlan:
    """A Meta-World policy trained on demos rendered at another size than the env's default is
    evaluated at that size (unless env_kw sets one): the same pixels it learned from. The size then
    joins the setting's protocol, so such episodes never mix with default-size ones."""
    trained = (meta.get("training") or {}).get("image_size")
    size = getattr(getattr(env, "cfg", None), "image_size", None)
    if plan.env != "metaworld" or "image_size" in plan.env_kw or not trained or size is None or trained == size:
        return plan
    print(f"note: the checkpoint was trained on {trained}px renders; the env renders at {trained}px "
          f"(not its default {size}px)", file=sys.stderr)
    return replace(plan, env_kw={**plan.env_kw, "image_size": int(trained)})


def _results(jobs, plan: SweepPlan, src: PolicySource, robot: str):
    if not jobs:
        return
    if plan.workers == 0:
        import torch

        prev = torch.get_num_threads()
        _worker_init(src, plan.env, plan.env_kw, robot, prev)
        try:
            for job in jobs:
                yield _worker_run(job)
        finally:
            if _W.get("env") is not None:
                _W["env"].close()
            _W.clear()
        return
    yield from _pool_results(jobs, min(plan.workers, len(jobs)), (src, plan.env, plan.env_kw, robot))


def _worker_loop(slot, current, init_args, jobs_q, results_q, parent) -> None:
    """A worker process: init once, then run jobs until the None sentinel. `current[slot]` holds
    the job in hand (shared memory, written synchronously) so the parent can tell which episode
    a worker was running if the process dies (a simulator segfault or abort)."""
    die_with_parent(parent)
    _worker_init(*init_args, 1)
    while True:
        item = jobs_q.get()
        if item is None or os.getppid() != parent:
            return
        jid, job = item
        current[slot] = jid
        try:
            key, res = _worker_run(job)
        except BaseException as e:  # noqa: BLE001 - a policy error: stop the sweep, with the error
            import traceback

            # The parent re-raises a copy whose traceback starts there: keep where it came from.
            tb = traceback.format_exc()
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                e = RuntimeError(f"{type(e).__name__}: {e}")
            note = f"raised in a sweep worker process:\n{tb}"
            try:
                e.add_note(note)
            except AttributeError:  # Python 3.10 has no add_note; its traceback shows no notes either
                e.__notes__ = [*getattr(e, "__notes__", []), note]
            results_q.put(("fail", jid, e))
            return
        results_q.put(("done", jid, key, res))
        current[slot] = -1


def _finished_behind(results_q, pending: set, wait_s: float = 1.0):
    """(setting key, EpisodeResult) of the episodes other workers finished and queued behind a
    policy error, read for up to `wait_s` before the error stops the sweep: they go to the DB."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = results_q.get(timeout=left)
        except queue.Empty:
            return
        if msg[0] == "done" and msg[1] in pending:
            pending.discard(msg[1])
            yield msg[2], msg[3]


def _tracker_ignoring_sighup() -> None:
    """Start multiprocessing's resource tracker with SIGHUP blocked, as it blocks SIGINT and SIGTERM
    itself: a closed terminal hangs up the whole process group, and a tracker killed by it was
    relaunched with warnings and a KeyError traceback per queue after the run's one line."""
    from multiprocessing import resource_tracker

    hup = getattr(signal, "SIGHUP", None)
    if hup is None or not hasattr(signal, "pthread_sigmask"):
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {hup})
    try:
        resource_tracker.ensure_running()  # (a no-op once running: the mask only matters at its start)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _pool_results(jobs: list, n: int, init_args: tuple):
    """Run jobs in n spawn processes; yield (setting key, EpisodeResult) as they finish.

    Unlike multiprocessing.Pool (which hangs when a worker dies mid-task), a worker that dies
    during an episode turns that episode into an error result, and a fresh worker takes its
    place. An exception raised by the policy in a worker is re-raised here."""
    ctx = mp.get_context("spawn")
    _tracker_ignoring_sighup()
    jobs_q, results_q = ctx.Queue(), ctx.Queue()
    current = ctx.Array("q", [-1] * n, lock=False)
    for jid, job in enumerate(jobs):
        jobs_q.put((jid, job))
    for _ in range(n):
        jobs_q.put(None)

    def start(slot: int):
        p = ctx.Process(target=_worker_loop, args=(slot, current, init_args, jobs_q, results_q, os.getpid()),
                        daemon=True)
        p.start()
        return p

    procs = [start(i) for i in range(n)]
    pending = set(range(len(jobs)))
    idle_deaths = 0
    lost: dict[int, int] = {}  # job id -> times it was lost with a worker that died between episodes
    try:
        while pending:
            try:
                msg = results_q.get(timeout=0.2)
            except queue.Empty:
                msg = None
            if msg is not None:
                if msg[0] == "fail":
                    yield from _finished_behind(results_q, pending)
                    raise msg[2]
                _, jid, key, res = msg
                if jid in pending:
                    pending.discard(jid)
                    yield key, res
                continue
            for slot, p in enumerate(procs):
                if p.is_alive() or p.exitcode == 0:
                    continue
                jid = current[slot]
                current[slot] = -1
                if jid in pending:
                    pending.discard(jid)
                    key, _, task, init_id, seed, *_ = jobs[jid]
                    yield key, EpisodeResult(task, init_id, seed, "error",
                                             error=f"worker process died during the episode (exit code {p.exitcode})")
                else:
                    idle_deaths += 1
                    if idle_deaths > 2 * n:
                        raise RuntimeError(f"sweep workers keep dying outside episodes (last exit code {p.exitcode})")
                procs[slot] = start(slot)  # takes the dead worker's place (and its unread sentinel)
            if pending and all(p.exitcode == 0 for p in procs):
                # A worker killed between episodes can take one with it: taken from the queue but
                # not yet marked as in hand, or its result not yet flushed. Run those again; one
                # lost a third time is stored as an error.
                for jid in sorted(pending):
                    lost[jid] = lost.get(jid, 0) + 1
                    if lost[jid] >= 3:
                        pending.discard(jid)
                        key, _, task, init_id, seed, *_ = jobs[jid]
                        yield key, EpisodeResult(task, init_id, seed, "error",
                                                 error="lost three times with a worker that died between episodes")
                if not pending:
                    break
                while True:  # every worker has exited: what is left in the queue are spare sentinels
                    try:
                        jobs_q.get(timeout=0.1)
                    except queue.Empty:
                        break
                for jid in sorted(pending):
                    jobs_q.put((jid, jobs[jid]))
                for _ in range(n):
                    jobs_q.put(None)
                procs = [start(i) for i in range(n)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
        # Jobs nobody will read may still fill the queue's pipe: without this the interpreter
        # would wait at exit for its feeder thread forever (Ctrl-C, SIGTERM or a policy error).
        jobs_q.cancel_join_thread()
        results_q.cancel_join_thread()


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from ..progress import progress

    return progress(total, "episodes")
