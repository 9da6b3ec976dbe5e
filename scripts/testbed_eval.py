"""Closed-loop evaluation of testbed checkpoints on Meta-World with parallel worker processes.

A thin driver over kvreuse.eval.rollout.run_episode (the harness's one rollout loop): every
(checkpoint, task, init id) episode runs in a worker that keeps its policy and env between
episodes. Prints success per task with n and a 95% Wilson interval, for held-out layouts
(init ids 0..49, never in the demos) and seen layouts (training init ids), and writes JSON.

    python scripts/testbed_eval.py CKPT [CKPT ...] --heldout 50 --seen 20 --workers 16
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from kvreuse.eval.stats import wilson

_CACHE: dict = {}


def _episode(args) -> dict:
    ckpt, task, init_id, seed, replan, device, image_size = args
    import torch

    torch.set_num_threads(1)
    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.envs.metaworld import MetaWorldEnv
    from kvreuse.eval.rollout import run_episode
    from kvreuse.model.tokenizer import load_tokenizer
    from kvreuse.policy import Policy
    from kvreuse.transforms.robot import RobotTransform, robot_spec

    if ckpt not in _CACHE:
        model, stats, meta = load_checkpoint(ckpt, device=device)
        tf = RobotTransform(model.cfg, load_tokenizer(model.cfg), stats, robot_spec(meta["robot"]))
        _CACHE[ckpt] = Policy(model, tf)
    if "env" not in _CACHE:
        _CACHE["env"] = MetaWorldEnv(image_size=image_size)
    r = run_episode(_CACHE[ckpt], _CACHE["env"], task, init_id, seed, replan=replan)
    ms = r.timings.get("total", [])
    return {"ckpt": ckpt, "task": task, "init_id": init_id, "seed": seed, "status": r.status, "steps": r.steps,
            "calls": r.calls, "wall_s": r.wall_s, "infer_ms": sum(ms) / max(1, len(ms)), "error": r.error[:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--tasks", nargs="*", default=[])
    ap.add_argument("--heldout", type=int, default=50, help="episodes per task on held-out layouts (init ids 0..)")
    ap.add_argument("--seen", type=int, default=20, help="episodes per task on training layouts (init ids 50..)")
    ap.add_argument("--replan", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    import multiprocessing as mp

    from tqdm import tqdm

    from kvreuse.envs.metaworld import TASKS, TRAIN_INIT_START, check_task

    tasks = [check_task(t) for t in a.tasks] or list(TASKS)
    jobs = []
    for ck in a.checkpoints:
        for t in tasks:
            for i in range(a.heldout):
                jobs.append((ck, t, i, a.seed + i, a.replan, a.device, a.image_size))
            for i in range(a.seen):
                jobs.append((ck, t, TRAIN_INIT_START + i, a.seed + TRAIN_INIT_START + i, a.replan, a.device, a.image_size))
    # Interleave so each worker's cache sees few checkpoints and all tasks progress together.
    t0 = time.perf_counter()
    results = []
    with mp.get_context("spawn").Pool(a.workers) as pool:
        for r in tqdm(pool.imap_unordered(_episode, jobs, chunksize=1), total=len(jobs), desc="episodes"):
            results.append(r)
    wall = time.perf_counter() - t0
    table = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in results:
        split = "heldout" if r["init_id"] < TRAIN_INIT_START else "seen"
        cell = table[(r["ckpt"], split)][r["task"]]
        cell[0] += r["status"] == "success"
        cell[1] += r["status"] != "error"
    summary = {}
    for (ck, split), per_task in sorted(table.items()):
        print(f"\n{ck} — {split} layouts")
        print("| task | success | n | 95% Wilson |\n|---|---|---|---|")
        ks = ns = 0
        rows = {}
        for t in tasks:
            k, n = per_task[t]
            lo, hi = wilson(k, n)
            ks, ns = ks + k, ns + n
            rows[t] = {"k": k, "n": n, "rate": k / max(1, n), "wilson": [lo, hi]}
            print(f"| {t} | {100 * k / max(1, n):.0f}% | {n} | [{100 * lo:.0f}, {100 * hi:.0f}] |")
        lo, hi = wilson(ks, ns)
        rows["mean"] = {"k": ks, "n": ns, "rate": ks / max(1, ns), "wilson": [lo, hi]}
        print(f"| **all** | {100 * ks / max(1, ns):.1f}% | {ns} | [{100 * lo:.1f}, {100 * hi:.1f}] |")
        summary[f"{ck}:{split}"] = rows
    errors = [r for r in results if r["status"] == "error"]
    infer = [r["infer_ms"] for r in results if r["calls"]]
    print(f"\n{len(results)} episodes in {wall:.0f}s with {a.workers} workers on {a.device}; "
          f"{len(errors)} env errors; mean per-call inference {sum(infer) / max(1, len(infer)):.1f} ms")
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "episodes": results, "wall_s": wall,
                                           "workers": a.workers, "device": a.device}, indent=1))


if __name__ == "__main__":
    main()
