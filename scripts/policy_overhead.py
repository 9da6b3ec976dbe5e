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

from kvreuse.bench import build_random, synthetic_obs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy


def wall_ms(fn, n=30):
    for _ in range(3):
        fn()
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main(name="pi0", n=30):
    cfg = preset(name).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs = synthetic_obs(cfg, 1, "cuda", torch.Generator().manual_seed(0))
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, device="cuda")
    fast = FastPi0(model, compile=True)
    pol = ReusePolicy(fast, ReuseConfig())
    print(torch.cuda.get_device_name(), name)
    print(f"sample_actions            {wall_ms(lambda: fast.sample_actions(obs, noise)):7.3f} ms (wall, median)")
    print(f"ReusePolicy.infer, off    {wall_ms(lambda: pol.infer(obs, noise)):7.3f} ms")
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
