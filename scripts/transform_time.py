"""Times the robot transform alone (numpy observation -> Observation, on the CPU) for the full-size
presets, as `kvreuse bench` feeds it (`robot_inputs`): median and p10 of 60 calls after 5 warm-ups,
one torch thread. To compare two commits, run it with PYTHONPATH pointing at each tree's src.

    PYTHONPATH=src python scripts/transform_time.py
"""
import statistics
import time

import torch

from kvreuse.bench import robot_inputs
from kvreuse.model import preset


def main() -> None:
    torch.set_num_threads(1)
    for name in ("pi0", "pi05"):
        tf, raw = robot_inputs(preset(name), 1, 0)
        for _ in range(5):
            tf(raw, device="cpu")
        ts = []
        for _ in range(60):
            t = time.perf_counter()
            tf(raw, device="cpu")
            ts.append((time.perf_counter() - t) * 1e3)
        print(f"{name}: median {statistics.median(ts):.3f} ms, p10 {sorted(ts)[6]:.3f} ms")


if __name__ == "__main__":
    main()
