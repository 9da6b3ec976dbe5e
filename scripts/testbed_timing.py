"""Per-inference time of a testbed policy on this machine's CPU (median of N calls on real
Meta-World observations, after warm-up). Usage:

    python scripts/testbed_timing.py [--variant pi05|pi0] [--checkpoint DIR] [--calls 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="pi05")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads on 2 shared cores stall badly
    ap.add_argument("--task", default="push-v3")
    a = ap.parse_args()

    from kvreuse.envs.metaworld import MetaWorldEnv  # selects headless GL before torch/mujoco

    import torch

    from kvreuse.assets import default_checkpoint
    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.model.tokenizer import load_tokenizer
    from kvreuse.policy import Policy
    from kvreuse.transforms.robot import RobotTransform, robot_spec

    torch.set_num_threads(a.threads)
    path = a.checkpoint or default_checkpoint(a.variant)
    model, stats, meta = load_checkpoint(path)
    pol = Policy(model, RobotTransform(model.cfg, load_tokenizer(model.cfg), stats, robot_spec("metaworld")))
    env = MetaWorldEnv()
    obs = env.reset(a.task, 0, 0)
    ms = []
    for i in range(a.calls + 5):
        t0 = time.perf_counter()
        actions, _ = pol.infer(obs)
        if i >= 5:
            ms.append((time.perf_counter() - t0) * 1e3)
        for act in actions[:5]:
            obs, _, _ = env.step(act)
    env.close()
    ms = np.array(ms)
    print(f"{path}: {meta['model']['variant']} on {platform.processor() or platform.machine()} "
          f"({torch.get_num_threads()} threads): per inference median {np.median(ms):.1f} ms, "
          f"p10 {np.percentile(ms, 10):.1f}, p90 {np.percentile(ms, 90):.1f} over {len(ms)} calls")


if __name__ == "__main__":
    main()
