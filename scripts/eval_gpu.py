"""`kvreuse eval` on a GPU: the shipped testbed policies eager in float32, eager in bf16 and in bf16
through FastPi0 (`--device cuda [--dtype bfloat16] [--fast]`), each with and without a reuse
setting, on the fake env (the device image has no MuJoCo; the policy sees the same observation
format as under Meta-World). Checks that the GPU runtime runs under the harness and that each
runtime's episodes stay apart in the DB; prints the harness's own table.

    PYTHONPATH=src python3 scripts/eval_gpu.py [--db runs/eval_gpu.db] [--episodes 3]
"""

from __future__ import annotations

import argparse
import sqlite3
import time

RUNTIMES = {"float32 eager": ("float32", False), "bf16 eager": ("bfloat16", False), "bf16 fast": ("bfloat16", True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="runs/eval_gpu.db")
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--reuse", default="gate=crossmodal mode=full")
    ap.add_argument("--device", default="cuda")  # cpu: a dry run of the script
    a = ap.parse_args()

    import torch

    from kvreuse.eval.cli import run_eval

    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(card, torch.__version__, flush=True)
    for preset in ("tiny-pi0", "tiny-pi05"):
        for name, (dtype, fast) in RUNTIMES.items():
            t0 = time.perf_counter()
            print(f"\n## {preset}, {name}", flush=True)
            run_eval(reuse=a.reuse, env="fake", tasks=("reach", "reach-far"), preset=preset, episodes=a.episodes,
                     workers=0, db=a.db, with_baseline=True, device=a.device, dtype=dtype, fast=fast, progress=False)
            print(f"({time.perf_counter() - t0:.1f} s)", flush=True)
    with sqlite3.connect(a.db) as c:
        print("\nsettings in the DB:")
        for policy, name, n in c.execute("SELECT s.policy, s.name, count(e.id) FROM settings s "
                                          "JOIN episodes e ON e.setting_id = s.id GROUP BY s.id ORDER BY s.id"):
            print(f"  {policy:45s} {name:35s} {n} episodes")


if __name__ == "__main__":
    main()
