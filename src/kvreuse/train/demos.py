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
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "kvreuse-demos/1"
FIELDS = ("base", "wrist", "state", "actions")


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


def _collect_unit(u: _Unit) -> dict:
    """Worker: collect up to u.n_demos successful demos of one task from u.init_ids."""
    import torch

    torch.set_num_threads(1)
    from ..envs.metaworld import MetaWorldEnv, expert_policy

    env = MetaWorldEnv(image_size=u.image_size, max_steps=u.max_steps)
    expert = expert_policy(u.task)
    rng = np.random.default_rng([u.seed, u.part, zlib.crc32(u.task.encode())])
    bufs: dict[str, list] = {k: [] for k in FIELDS}
    episodes, failures, n = [], 0, 0
    t0 = time.perf_counter()
    for init_id in u.init_ids:
        if len(episodes) >= u.n_demos:
            break
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
        if not success:
            failures += 1
            continue
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
    return {"task": u.task, "part": u.part, "episodes": episodes, "failures": failures,
            "frames": n, "seconds": time.perf_counter() - t0}


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
) -> dict:
    """Record scripted-expert demos (both cameras, state, prompt, actions) on training layouts
    into `out` (-> the index written to out/index.json).

    Args:
        tasks: default all testbed tasks.
        workers: parallel processes (each renders with its own GL context).
        parts_per_task: split each task over this many workers (disjoint layouts).
        counts: "TASK=N" entries that override demos_per_task for a task (more demos where
            the policy is weak).
    """
    import multiprocessing as mp

    from tqdm import tqdm

    from ..envs.metaworld import TASKS, TRAIN_INIT_START, MetaWorldConfig, check_task, prompt_for

    tasks = tuple(tasks) or tuple(TASKS)
    for t in tasks:
        check_task(t)
    per_task = {t: demos_per_task for t in tasks}
    for c in counts:
        name, sep, num = c.partition("=")
        if not sep or name not in per_task or not num.isdigit():
            raise ValueError(f"counts entry {c!r}: expected TASK=N with TASK one of {list(per_task)}")
        per_task[name] = int(num)
    if min(per_task.values()) < 1 or parts_per_task < 1 or workers < 1:
        raise ValueError("demos per task, parts_per_task and workers must be >= 1")
    total_inits = MetaWorldConfig().num_inits
    train_ids = list(range(TRAIN_INIT_START, total_inits))
    units = []
    for t, n_task in per_task.items():
        per_part = -(-n_task // parts_per_task)
        if len(train_ids) // parts_per_task < per_part:
            raise ValueError(f"{n_task} demos of {t} need more training layouts than the {len(train_ids)} available")
        for p in range(parts_per_task):
            ids = tuple(train_ids[p::parts_per_task])  # disjoint layouts per part; spares for failures
            want = min(per_part, n_task - p * per_part)
            if want > 0:
                units.append(_Unit(t, p, ids, want, noise, image_size, max_steps, seed, str(out)))

    Path(out).mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "image_size": image_size, "noise": noise, "seed": seed,
             "cameras": {"base": "observation/image", "wrist": "observation/wrist_image"},
             "tasks": {t: {"prompt": prompt_for(t), "parts": [], "episodes": [], "failures": 0} for t in tasks}}
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # fresh processes: no GL or torch state inherited
    with ctx.Pool(min(workers, len(units))) as pool:
        bar = tqdm(total=sum(u.n_demos for u in units), desc="demos", unit="demo")
        for r in pool.imap_unordered(_collect_unit, units):
            e = index["tasks"][r["task"]]
            e["parts"].append(r["part"])
            e["episodes"].extend(r["episodes"])
            e["failures"] += r["failures"]
            bar.update(len(r["episodes"]))
            bar.set_postfix_str(f"{r['task']} part {r['part']}: {r['frames']} frames, {r['seconds']:.0f}s")
        bar.close()
    for e in index["tasks"].values():
        e["parts"].sort()
        e["episodes"].sort(key=lambda x: (x["part"], x["start"]))
    (Path(out) / "index.json").write_text(json.dumps(index, indent=1))
    frames = sum(x["length"] for e in index["tasks"].values() for x in e["episodes"])
    print(f"wrote {out}: {len(tasks)} tasks, {sum(len(e['episodes']) for e in index['tasks'].values())} demos, "
          f"{frames} frames in {time.perf_counter() - t0:.0f}s")
    for t, e in index["tasks"].items():
        lens = [x["length"] for x in e["episodes"]]
        print(f"  {t}: {len(lens)} demos (mean {np.mean(lens) if lens else 0:.0f} steps), {e['failures']} expert failures")
    return index


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
    if not f.is_file():
        raise ValueError(f"demos: no index.json in {path} (make one with `kvreuse demos --out {path}`)")
    index = json.loads(f.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"demos: {f} has format {index.get('format')!r}, expected {FORMAT!r}")
    names = list(tasks) or list(index["tasks"])
    unknown = [t for t in names if t not in index["tasks"]]
    if unknown:
        raise ValueError(f"demos: task(s) {unknown} not in {path}; it has {list(index['tasks'])}")
    cols: dict[str, list] = {k: [] for k in FIELDS}
    task_of, ep_end, offset, n_eps = [], [], 0, 0
    for ti, t in enumerate(names):
        e = index["tasks"][t]
        for p in e["parts"]:
            arrs = {k: np.load(path / t / f"part{p:02d}_{k}.npy") for k in FIELDS}
            n = len(arrs["actions"])
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


if __name__ == "__main__":  # runnable without the CLI registry: python -m kvreuse.train.demos
    import tyro

    tyro.cli(collect_demos)
