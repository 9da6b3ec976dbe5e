"""In-process A/B of FastPi0.sample_actions: prefix then denoise (overlap off) vs Euler step 0
beside the prefix LM on a second stream of normal or high priority. The variants share one
instance's weights and buffers (copy.copy) but capture their own graphs; rounds alternate, since
separate processes differ by ~0.2 ms. Also checks that every variant returns the same actions.
Usage (one CUDA GPU): PYTHONPATH=src python3 scripts/overlap_ab.py [pi0|pi05] [compile 1|0]"""

import copy
import statistics
import sys

import torch

from kvreuse.bench import build_random, random_inputs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0
from kvreuse.model.graphs import Graphs


def main(name="pi0", compile="1", rounds=5, iters=30):
    cfg = preset(name)
    cfg = cfg.replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    base = FastPi0(model, compile=compile == "1")
    variants = {}
    for tag, overlap, priority in (("prefix then denoise", False, None), ("step 0 beside, normal priority", True, 0),
                                   ("step 0 beside, high priority", True, -1)):
        v = copy.copy(base)
        v.graphs, v.overlap = Graphs(True), overlap
        v._side = torch.cuda.Stream(priority=priority) if overlap else None
        variants[tag] = v
    outs = {tag: v.sample_actions(obs, noise) for tag, v in variants.items()}
    ref = next(iter(outs.values()))
    print(torch.cuda.get_device_name(), name, "compile:", base.compiled,
          "same actions:", all(torch.equal(o, ref) for o in outs.values()))
    times = {tag: [] for tag in variants}
    for _ in range(rounds):
        for tag, v in variants.items():
            for _ in range(3):
                v.sample_actions(obs, noise)
            for _ in range(iters):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                v.sample_actions(obs, noise)
                e.record()
                e.synchronize()
                times[tag].append(s.elapsed_time(e))
    for tag, ts in times.items():
        print(f"{tag:<34} median {statistics.median(ts):7.3f} ms  (p10 {sorted(ts)[len(ts) // 10]:.3f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
