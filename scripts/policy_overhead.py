"""Where ReusePolicy.infer (reuse off: what `kvreuse eval` / `serve` run per call) spends the time
that FastPi0.sample_actions does not: host-side profile (cProfile, cumulative) of N calls on a GPU,
beside the medians of both. Usage: PYTHONPATH=src python3 scripts/policy_overhead.py [pi0|pi05]"""

import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

from kvreuse.bench import build_random, random_inputs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy


def wall_ms(fn, n=30):
    """(wall-clock, CUDA-event) medians in ms, both around each call, synchronized before and after."""
    for _ in range(3):
        fn()
    wall, ev = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
        ev.append(a.elapsed_time(b))
    return statistics.median(wall), statistics.median(ev)


def main(name="pi0", n=30):
    cfg = preset(name).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    fast = FastPi0(model, compile=True)
    pol = ReusePolicy(fast, ReuseConfig())
    print(torch.cuda.get_device_name(), name)
    for _ in range(2):  # alternate, in case the card's state drifts
        for tag, fn in (("sample_actions", lambda: fast.sample_actions(obs, noise)),
                        ("ReusePolicy.infer, reuse off", lambda: pol.infer(obs, noise))):
            w, e = wall_ms(fn)
            print(f"{tag:<30} median {w:7.3f} ms wall-clock, {e:7.3f} ms CUDA events")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        pol.infer(obs, noise)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
    print(f"cProfile of {n} calls (cumulative):")
    print(s.getvalue())


if __name__ == "__main__":
    main(*sys.argv[1:])
