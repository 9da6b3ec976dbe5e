"""In-process A/B of L2 eviction hints in the Triton kernels (kvreuse.model.kernels.cache_hints):
the expert products' weight tiles are read once per Euler step (~620 MB for Pi0, far over the L2),
while the prefix K/V (~10 MB) are re-read by every step; "evict_first" on the weights and / or
"evict_last" on the K/V may keep the K/V in L2. One FastPi0 per variant (graphs captured with its
hints), rounds alternating between them; reuse hit (denoise) and full inference (sample_actions).
Usage (one CUDA GPU): PYTHONPATH=src python3 scripts/evict_ab.py [pi0|pi05] [rounds]"""

import statistics
import sys

import torch

from kvreuse.bench import build_random, synthetic_obs, time_fn
from kvreuse.model import kernels, preset
from kvreuse.model.fast import FastPi0

VARIANTS = {  # name: (weights, kv)
    "default": ("", ""),
    "w evict_first": ("evict_first", ""),
    "kv evict_last": ("", "evict_last"),
    "both": ("evict_first", "evict_last"),
}


def main(name="pi0", rounds=5, iters=30):
    cfg = preset(name)  # the preset's 3 cameras (the round-9 logs); kvreuse bench runs 2
    model = build_random(cfg, "cuda")
    obs = synthetic_obs(cfg, 1, "cuda", torch.Generator().manual_seed(0))
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, device="cuda")
    fps, ref = {}, None
    for v, (w, kv) in VARIANTS.items():
        kernels.cache_hints(weights=w, kv=kv)  # read at launch: the graphs captured below keep them
        fp = FastPi0(model, compile=True)
        cache = fp.encode_prefix(obs)
        out = (fp.denoise(cache, obs, noise), fp.sample_actions(obs, noise))
        if ref is None:
            ref = out
        same = all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
        print(f"{v:<14} bit-identical to default: {same}", flush=True)
        fps[v] = (fp, cache)
    kernels.cache_hints(weights="", kv="")
    print(torch.cuda.get_device_name(), name)
    times = {v: ([], []) for v in VARIANTS}
    for _ in range(int(rounds)):
        for v, (fp, cache) in fps.items():
            times[v][0].append(time_fn(lambda fp=fp, c=cache: fp.denoise(c, obs, noise), iters, 3, "cuda").median)
            times[v][1].append(time_fn(lambda fp=fp: fp.sample_actions(obs, noise), iters, 3, "cuda").median)
    print("| hints | reuse hit (ms, median of round medians) | rounds | full inference | rounds |")
    print("|---|---|---|---|---|")
    for v, (hit, full) in times.items():
        fmt = " ".join
        print(
            f"| {v} | {statistics.median(hit):.3f} | {fmt(f'{t:.2f}' for t in hit)} "
            f"| {statistics.median(full):.3f} | {fmt(f'{t:.2f}' for t in full)} |"
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
