"""`kvreuse demos`: scripted-expert demonstrations on the Meta-World testbed.

Each demo rolls out Meta-World's scripted expert (`metaworld.policies`) from one training layout
(init ids >= TRAIN_INIT_START; ids below are held out for evaluation) and records exactly what
the policy will see — both camera images, the 4-float state, the prompt — and the expert's
action at every step, until the env reports success. Only successful demos are kept.

DART-style noise: the *executed* action is the expert's plus Gaussian noise on dx/dy/dz, while
the *recorded* label is the expert's clean action at the state reached. The demos then visit
slightly-off states with corrective labels, which makes the cloned policy recover from its own
small errors. `noise=0` records plain expert rollouts.

On-disk format (no pickle; everything memory-mappable):

    DIR/index.json                       {"format": "kvreuse-demos/1", "image_size", "cameras",
                                          "noise", "tasks": {task: {"prompt", "parts": [...],
                                          "episodes": [{"init_id", "seed", "part", "start", "length"}]}}}
    DIR/<task>/partNN_base.npy           (N, H, W, 3) uint8  third-person camera (observation/image)
    DIR/<task>/partNN_wrist.npy          (N, H, W, 3) uint8  gripper camera (observation/wrist_image)
    DIR/<task>/partNN_state.npy          (N, 4) float32      hand xyz + gripper opening
    DIR/<task>/partNN_actions.npy        (N, 4) float32      expert action (dx, dy, dz, gripper)

Frames of one part are its episodes back to back; an episode is rows [start, start + length)
of its part. Parts exist so that several worker processes can fill one task in parallel.

A run writes into a staging directory beside DIR (`.DIR.partial`) and swaps it in only once every
task has its demos (train/outdir.py): an interrupted or failed run leaves DIR as it was. An
interrupted run (Ctrl-C, SIGTERM, a kill) or a failed one (an error in a worker or while writing,
a worker process killed) keeps the staging directory: each finished part there has a marker `<task>/partNN.json` (its
settings and episodes, written after its arrays), and the same command reuses those parts and
records only the others; a part without a marker, or recorded with other settings, is recorded
again. A DIR that already holds a demo set is
replaced only with `overwrite=True` (`--overwrite`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..workers import die_with_parent

FORMAT = "kvreuse-demos/1"
FIELDS = ("base", "wrist", "state", "actions")
PART_FILE = re.compile(rf"part\d+_({'|'.join(FIELDS)})\.npy")
# A worker gives up on its part after this many episodes in a row without success: the
# scripted experts succeed on every layout checked, so this means --max-steps is too low.
GIVE_UP_AFTER = 20

_progress = None  # worker side: queue of (task, success) per finished episode, for the bar
_parent = None  # worker side: the pid of the `kvreuse demos` process


def _init_worker(q, parent: int | None = None) -> None:
    global _progress, _parent
    _progress, _parent = q, parent
    import signal
    import warnings

    if parent is not None:  # (None: the tests' in-process calls)
        die_with_parent(parent)

    # Ctrl-C reaches the whole process group: the parent stops the pool and reports in one line;
    # a worker's own KeyboardInterrupt would print a traceback through the pool's machinery.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # The scripted experts' gains exceed 1 by design; the env clips. The warning, twice per worker,
    # would only break up the progress bar.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)


@dataclass(frozen=True)
class _Unit:
    task: str
    part: int
    init_ids: tuple[int, ...]
    n_demos: int
    noise: float
    image_size: int
    max_steps: int
    seed: int
    out: str


def _settings(u: _Unit) -> dict:
    """What a part's content depends on: a kept part is reused only by a run that asks the same."""
    return json.loads(json.dumps({"format": FORMAT, **{k: v for k, v in asdict(u).items() if k != "out"}}))


def _marker(out: str | Path, u: _Unit) -> Path:
    return Path(out) / u.task / f"part{u.part:02d}.json"


def _finished(u: _Unit) -> dict | None:
    """The result of part `u` kept in its staging directory by an earlier run, else None."""
    try:
        m = json.loads(_marker(u.out, u).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("settings") != _settings(u):
        return None
    d = Path(u.out) / u.task
    if not all((d / f"part{u.part:02d}_{k}.npy").is_file() for k in FIELDS):
        return None
    return m.get("result")


class _Shortfall(ValueError):
    """Fewer demos than asked for: the same command would fall short again."""


class _WorkerDied(ValueError):
    """A worker process ended mid-part: its half-written part has no marker and is recorded again."""


def _death(codes: list[int | None]) -> str:
    import signal

    # The pool ends the other workers with SIGTERM once one has died: name the one that died first.
    code = next((c for c in codes if c not in (None, 0, -signal.SIGTERM)), codes[0] if codes else None)
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return f"a worker process died ({how}) while recording; out of memory? fewer --workers use less"


def _collect_unit(u: _Unit) -> dict:
    """Worker: collect up to u.n_demos successful demos of one task from u.init_ids."""
    import torch

    _marker(u.out, u).unlink(missing_ok=True)  # a marker of other settings must not vouch for new arrays

    torch.set_num_threads(1)
    from ..envs.metaworld import MetaWorldEnv, expert_policy

    env = MetaWorldEnv(image_size=u.image_size, max_steps=u.max_steps)
    expert = expert_policy(u.task)
    rng = np.random.default_rng([u.seed, u.part, zlib.crc32(u.task.encode())])
    bufs: dict[str, list] = {k: [] for k in FIELDS}
    episodes, timeouts, in_a_row, n = [], 0, 0, 0
    t0 = time.perf_counter()
    for init_id in u.init_ids:
        if len(episodes) >= u.n_demos or in_a_row >= GIVE_UP_AFTER:
            break
        if _parent is not None and os.getppid() != _parent:  # the run was killed
            os._exit(1)
        seed = int(rng.integers(2**31))
        obs = env.reset(u.task, init_id, seed)
        ep = {k: [] for k in FIELDS}
        done = success = False
        while not done:
            a = np.clip(np.asarray(expert.get_action(env.raw_obs), dtype=np.float32), -1, 1)
            ep["base"].append(obs["observation/image"])
            ep["wrist"].append(obs["observation/wrist_image"])
            ep["state"].append(obs["observation/state"])
            ep["actions"].append(a)
            executed = a.copy()
            if u.noise > 0:
                executed[:3] += rng.normal(0.0, u.noise, 3).astype(np.float32)
            obs, success, done = env.step(np.clip(executed, -1, 1))
        if _progress is not None:
            _progress.put((u.task, success))
        if not success:  # the env ends an episode only on success or at max_steps
            timeouts += 1
            in_a_row += 1
            continue
        in_a_row = 0
        length = len(ep["actions"])
        episodes.append({"init_id": int(init_id), "seed": seed, "part": u.part, "start": n, "length": length})
        n += length
        for k in FIELDS:
            bufs[k].extend(ep[k])
    env.close()
    d = Path(u.out) / u.task
    d.mkdir(parents=True, exist_ok=True)
    for k in FIELDS:
        arr = np.stack(bufs[k]) if bufs[k] else np.zeros((0,), np.uint8)
        np.save(d / f"part{u.part:02d}_{k}.npy", arr)
    result = {"task": u.task, "part": u.part, "episodes": episodes, "timeouts": timeouts,
              "frames": n, "seconds": time.perf_counter() - t0}
    _write_marker(u, result)
    return result


def _write_marker(u: _Unit, result: dict) -> None:
    # The marker comes last and by rename: a part cut off while writing has none, and is redone.
    marker = _marker(u.out, u)
    marker.with_suffix(".tmp").write_text(json.dumps({"settings": _settings(u), "result": result}))
    marker.with_suffix(".tmp").replace(marker)


def collect_demos(
    out: str = "data/demos",
    tasks: tuple[str, ...] = (),
    demos_per_task: int = 60,
    noise: float = 0.1,
    image_size: int = 128,
    max_steps: int = 200,
    workers: int = 2,
    parts_per_task: int = 1,
    seed: int = 0,
    counts: tuple[str, ...] = (),
    overwrite: bool = False,
) -> dict:
    """Record scripted-expert demos (both cameras, state, prompt, actions) on training layouts
    into `out` (-> the index written to out/index.json).

    Args:
        out: the demo set's directory (what `kvreuse train --demos` reads).
        tasks: default all testbed tasks.
        demos_per_task: successful demos recorded per task.
        noise: std of the Gaussian noise added to the executed dx/dy/dz (DART: the recorded label
            stays the expert's action); 0 records plain expert rollouts.
        image_size: camera render size in pixels (the env's default is 128).
        max_steps: step limit of a demo episode; an episode that ends there unsolved is not kept.
        workers: parallel processes (each renders with its own GL context).
        parts_per_task: split each task over this many workers (disjoint layouts).
        counts: "TASK=N" entries that override demos_per_task for a task (more demos where
            the policy is weak).
        seed: seeds each task part's generator, which draws its episodes' action noise in order
            (the per-episode `seed` in index.json is passed to the env's reset, which Meta-World
            ignores: a demo is reproduced by the whole run, not by its own seed).
        overwrite: replace a demo set already in `out` (otherwise refused).

    Nothing is written unless every task gets its demos: a shortfall (episodes cut off at
    max_steps) is an error naming the tasks, and `out` stays as it was. An interrupted or failed
    run keeps its finished parts beside `out` (.NAME.partial); the same command continues from them."""
    import multiprocessing as mp

    from ..envs.metaworld import (
        TASKS,
        TRAIN_INIT_START,
        MetaWorldConfig,
        check_task,
        prompt_for,
    )
    from ..outputs import stop_keeping
    from ..progress import progress
    from .outdir import check_out, resumable, swap_in

    tasks = tuple(tasks) or tuple(TASKS)
    for t in tasks:
        check_task(t)
    from ..envs.metaworld import MIN_IMAGE_SIZE

    for name, v, least in (("demos-per-task", demos_per_task, 1), ("parts-per-task", parts_per_task, 1),
                           ("workers", workers, 1), ("max-steps", max_steps, 1),
                           ("image-size", image_size, MIN_IMAGE_SIZE)):  # the env's: found late, in a worker
        if v < least:
            raise ValueError(f"--{name} must be >= {least}, got {v}")
    if not noise >= 0:  # also rejects nan
        raise ValueError(f"--noise is the std of the expert's action noise: expected >= 0, got {noise}")
    per_task, given = {t: demos_per_task for t in tasks}, set()
    for c in counts:
        name, sep, num = c.partition("=")
        if not sep or name not in per_task:
            raise ValueError(f"--counts {c!r}: expected TASK=N with TASK one of {list(per_task)}")
        if name in given:
            raise ValueError(f"--counts: {name} given twice")
        if not num.isdigit() or int(num) < 1:
            raise ValueError(f"--counts {c!r}: N must be an integer >= 1, got {num!r}")
        per_task[name] = int(num)
        given.add(name)
    out = check_out(out, "demo set", lambda d: (d / "index.json").is_file(), _demo_file, overwrite)
    total_inits = MetaWorldConfig().num_inits
    train_ids = list(range(TRAIN_INIT_START, total_inits))
    units = []
    for t, n_task in per_task.items():
        per_part = -(-n_task // parts_per_task)
        if parts_per_task > len(train_ids):  # (no layout per part: "more demos than layouts" misled)
            raise ValueError(f"--parts-per-task {parts_per_task}: more parts than the {len(train_ids)} training "
                             "layouts of a task (each part takes its own)")
        if len(train_ids) // parts_per_task < per_part:
            raise ValueError(f"{n_task} demos of {t} need more training layouts than the {len(train_ids)} available"
                             + (f" ({len(train_ids) // parts_per_task} per part with --parts-per-task {parts_per_task})"
                                if parts_per_task > 1 else ""))
        for p in range(parts_per_task):
            ids = tuple(train_ids[p::parts_per_task])  # disjoint layouts per part; spares for failures
            want = min(per_part, n_task - p * per_part)
            if want > 0:
                units.append(_Unit(t, p, ids, want, noise, image_size, max_steps, seed, ""))

    index = {"format": FORMAT, "image_size": image_size, "noise": noise, "seed": seed,
             "cameras": {"base": "observation/image", "wrist": "observation/wrist_image"},
             "tasks": {t: {"prompt": prompt_for(t), "parts": [], "episodes": [], "timeouts": 0} for t in tasks}}
    t0 = time.perf_counter()
    tmp, lock = resumable(out)
    units = [replace(u, out=str(tmp)) for u in units]
    results: list[dict] = []
    try:
        kept = {(u.task, u.part): r for u in units if (r := _finished(u)) is not None}
        todo = [u for u in units if (u.task, u.part) not in kept]
        recorded = sum(len(r["episodes"]) for r in kept.values())
        if kept:
            print(f"demos: continuing the unfinished run in {tmp}: {len(kept)} of {len(units)} parts "
                  f"({recorded} demos) already recorded", flush=True)
        results += kept.values()
        if todo:
            ctx = mp.get_context("spawn")  # fresh processes: no GL or torch state inherited
            q = ctx.Queue()
            bar = progress(sum(u.n_demos for u in units), "demos", "demos", initial=recorded)
            timeouts = dict.fromkeys(tasks, 0)
            try:
                # Not multiprocessing.Pool: a worker killed mid-part (OOM killer, a simulator crash)
                # took its part with it unseen, and the run waited forever.
                others = set(mp.active_children())
                pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                           initargs=(q, os.getpid()))
                try:
                    futures = [pool.submit(_collect_unit, u) for u in todo]
                    procs = set(mp.active_children()) - others  # all started by the submits
                    while not all(f.done() for f in futures):  # workers report every episode: the bar moves per demo
                        try:
                            task, ok = q.get(timeout=0.5)
                        except queue.Empty:
                            continue
                        bar.update(int(ok))
                        recorded += int(ok)
                        timeouts[task] += not ok
                        if not ok:
                            bar.set_postfix_str(f"{sum(timeouts.values())} episodes hit --max-steps {max_steps}")
                    try:
                        results += [f.result() for f in futures]
                    except BrokenProcessPool:
                        raise _WorkerDied(_death([p.exitcode for p in procs])) from None
                except BaseException:  # Ctrl-C or an error: stop the parts under way (workers ignore SIGINT)
                    for p in set(mp.active_children()) - others:
                        p.kill()
                    raise
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
                bar.update(sum(len(r["episodes"]) for r in results) - recorded)  # messages still in flight at the end
            finally:  # an interrupt's message would land on a terminal bar's line
                bar.close()
        for r in results:
            e = index["tasks"][r["task"]]
            e["parts"].append(r["part"])
            e["episodes"].extend(r["episodes"])
            e["timeouts"] += r["timeouts"]
        for e in index["tasks"].values():
            e["parts"].sort()
            e["episodes"].sort(key=lambda x: (x["part"], x["start"]))
        short = {t: (len(e["episodes"]), per_task[t], e["timeouts"]) for t, e in index["tasks"].items()
                 if len(e["episodes"]) < per_task[t]}
        if short:
            raise _Shortfall(
                "demos: fewer demos than requested ("
                + ", ".join(f"{t}: {got} of {want}, {to} episodes cut off at --max-steps {max_steps}"
                            for t, (got, want, to) in short.items())
                + f"); the scripted experts need up to ~90 steps; nothing was written to {out}")
        _tidy(tmp, units)
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        swap_in(tmp, out)
    except _Shortfall:  # the same command would fall short again: nothing of it is worth keeping
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as e:  # interrupted or failed: keep the finished parts for the next run
        for r in results:  # _tidy removed the markers: a failure while writing the index or swapping in
            u = next(u for u in units if (u.task, u.part) == (r["task"], r["part"]))
            if _finished(u) is None:
                try:
                    _write_marker(u, r)
                except OSError:  # a full disk: that part is recorded again
                    pass
        done = [u for u in units if _finished(u) is not None]
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kept = f"{len(done)} of {len(units)} parts are kept in {tmp}; the same command continues from them"
        if not isinstance(e, Exception | KeyboardInterrupt):
            raise
        # Ctrl-C, or a worker's or a late error (the simulator, the disk): say what was kept.
        stop_keeping(e, "demos", kept)
    finally:
        os.close(lock)
    frames = sum(x["length"] for e in index["tasks"].values() for x in e["episodes"])
    print(f"wrote {out}: {len(tasks)} tasks, {sum(len(e['episodes']) for e in index['tasks'].values())} demos, "
          f"{frames} frames in {time.perf_counter() - t0:.0f}s")
    for t, e in index["tasks"].items():
        lens = [x["length"] for x in e["episodes"]]
        print(f"  {t}: {len(lens)} demos (mean {np.mean(lens) if lens else 0:.0f} steps), "
              f"{e['timeouts']} episodes cut off at --max-steps {max_steps} (discarded)")
    return index


def _tidy(tmp: Path, units: list[_Unit]) -> None:
    """Leave in `tmp` only this run's part files: no markers, nothing kept from runs of other tasks or parts."""
    own = {u.task: set() for u in units}
    for u in units:
        own[u.task].update(f"part{u.part:02d}_{k}.npy" for k in FIELDS)
    for p in tmp.iterdir():
        for f in ([p] if p.name not in own else [f for f in p.iterdir() if f.name not in own[p.name]]):
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()


def _demo_file(p: Path) -> bool:
    """p is part of a demo set: index.json or a task directory of part files."""
    if p.name == "index.json":
        return p.is_file()
    return p.is_dir() and all(f.is_file() and PART_FILE.fullmatch(f.name) for f in p.iterdir())


@dataclass
class DemoSet:
    """All demos in memory, frames of every task concatenated.

    base/wrist (N, H, W, 3) uint8, state (N, 4), actions (N, 4) float32; task_of (N,) task index;
    ep_end (N,) row index one past the end of the frame's episode (for action-chunk padding)."""

    base: np.ndarray
    wrist: np.ndarray
    state: np.ndarray
    actions: np.ndarray
    task_of: np.ndarray
    ep_end: np.ndarray
    prompts: list[str]
    tasks: list[str]
    episodes: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)


def load_demos(path: str | Path, tasks: tuple[str, ...] = ()) -> DemoSet:
    path = Path(path)
    f = path / "index.json"
    if path.is_file():
        raise ValueError(f"demos: {path} is a file; pass the demo set's folder ({path.parent})")
    if not f.is_file():
        raise ValueError(f"demos: no index.json in {path} (make one with `kvreuse demos --out {path}`)")
    try:
        index = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"demos: {f} is not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"demos: {f} has format {got!r}, expected {FORMAT!r}")
    try:
        return _load(path, f, index, tasks)
    except (KeyError, TypeError, IndexError) as e:  # a field missing or of another kind: edited by hand?
        raise ValueError(f"demos: {f} lacks or misstates {e} (damaged index; record the set again)") from None


def _load(path: Path, f: Path, index: dict, tasks: tuple[str, ...]) -> DemoSet:
    from ..envs.metaworld import ACTION_DIM, STATE_DIM

    names = list(dict.fromkeys(tasks)) or list(index["tasks"])  # a repeated task was loaded (and weighted) twice
    unknown = [t for t in names if t not in index["tasks"]]
    if unknown:
        raise ValueError(f"demos: task(s) {unknown} not in {path}; it has {list(index['tasks'])}")
    size = int(index["image_size"])
    # Per frame: what the testbed records (Meta-World renders at the index's size, 4-dim state and actions).
    shapes = {"base": (size, size, 3), "wrist": (size, size, 3), "state": (STATE_DIM,), "actions": (ACTION_DIM,)}
    cols: dict[str, list] = {k: [] for k in FIELDS}
    task_of, ep_end, offset, n_eps = [], [], 0, 0
    for ti, t in enumerate(names):
        e = index["tasks"][t]
        for p in e["parts"]:
            arrs = {k: _load_part(path / t / f"part{p:02d}_{k}.npy") for k in FIELDS}
            n = len(arrs["actions"])
            # A set mixed by an interrupted re-run (or edited by hand) must not load silently.
            want = sum(x["length"] for x in e["episodes"] if x["part"] == p)
            for k, a in arrs.items():
                part = path / t / f"part{p:02d}_{k}.npy"
                if len(a) != want:
                    raise ValueError(f"demos: {part} has {len(a)} frames but "
                                     f"{f} lists {want} for its episodes (mixed or damaged demo set; record it again)")
                if a.shape[1:] != shapes[k]:
                    raise ValueError(f"demos: {part} holds frames of shape {a.shape[1:]}; {f} (image_size "
                                     f"{size}) and the Meta-World testbed mean {shapes[k]}")
            if n == 0:
                continue
            for k in FIELDS:
                cols[k].append(arrs[k])
            task_of.append(np.full(n, ti, np.int64))
            end = np.zeros(n, np.int64)
            for x in e["episodes"]:
                if x["part"] == p:
                    end[x["start"] : x["start"] + x["length"]] = offset + x["start"] + x["length"]
                    n_eps += 1
            ep_end.append(end)
            offset += n
    if offset == 0:
        raise ValueError(f"demos: {path} holds no frames")
    return DemoSet(
        *(np.concatenate(cols[k]) for k in FIELDS),
        task_of=np.concatenate(task_of), ep_end=np.concatenate(ep_end),
        prompts=[index["tasks"][t]["prompt"] for t in names], tasks=names, episodes=n_eps, meta=index,
    )


def _load_part(f: Path) -> np.ndarray:
    try:
        return np.load(f)  # allow_pickle=False: arrays only
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"demos: cannot read {f} ({e})") from None


# `python -m kvreuse.train.demos` (scripts/testbed_device.sh) is `kvreuse demos`: one-line errors,
# and Ctrl-C / SIGTERM keep the finished parts with a one-line message; through tyro.cli alone
# errors were tracebacks and SIGTERM ended the run at once.
if __name__ == "__main__":
    import sys

    from ..cli import main

    main(["demos", *sys.argv[1:]])
