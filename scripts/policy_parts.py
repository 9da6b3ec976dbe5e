"""Where the eval / serve call (ReusePolicy.infer, reuse off) spends what sample_actions does not,
one piece at a time, one process, one card (compile on, as the bench), timed in turn round after
round (wall-clock around each call, synchronized before and after):
- sample_actions: vision, then the prefix + denoise graph;
- sample_with_prefix: the same graph, then the cache copied out (PrefixCache);
- embed_images + sample_with_prefix: the vision pass through embed_images (clones), the
  embeddings given to sample_with_prefix (copied in), as the policy runs a full refresh;
- ReusePolicy.infer, parts timed on the host: the policy without its CUDA events;
- ReusePolicy.infer, masks read ahead: FastPi0.prepare reading Pi0.5's spans and rows before the
  vision pass even from the masks' host copies (as before round 13's last change);
- ReusePolicy.infer: as eval / serve run it.

    PYTHONPATH=src python3 scripts/policy_parts.py [pi0|pi05] [rounds]
"""

import copy
import statistics
import sys
import time

import torch

import kvreuse.reuse.policy as policy_mod
from kvreuse.bench import build_random, random_inputs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy


def wall_ms(fn, n=30):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


class _HostParts(policy_mod._Parts):
    def __init__(self, cuda: bool):
        super().__init__(False)


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    fast = FastPi0(model, compile=True)
    pol = ReusePolicy(fast, ReuseConfig())
    ahead = copy.copy(fast)  # same weights, buffers and graphs; prepare() always reads ahead
    ahead.prepare = lambda o: setattr(ahead, "_prepared", (o, model.spans(o, 0), ahead._rows_of(o), ahead._versions(o)))
    pol_ahead = ReusePolicy(ahead, ReuseConfig())

    def host_parts():
        keep, policy_mod._Parts = policy_mod._Parts, _HostParts
        try:
            return pol.infer(obs, noise)
        finally:
            policy_mod._Parts = keep

    def given():
        e = fast.embed_images(obs.images)
        return fast.sample_with_prefix(obs, noise, image_embeds=e)

    pieces = {"sample_actions": lambda: fast.sample_actions(obs, noise),
              "sample_with_prefix": lambda: fast.sample_with_prefix(obs, noise),
              "embed_images + sample_with_prefix": given,
              "ReusePolicy.infer, parts timed on the host": host_parts,
              "ReusePolicy.infer, masks read ahead": lambda: pol_ahead.infer(obs, noise),
              "ReusePolicy.infer": lambda: pol.infer(obs, noise)}
    print(torch.cuda.get_device_name(), torch.__version__, variant, flush=True)
    with torch.no_grad():
        for r in range(rounds):
            print(f"round {r + 1}: " + " | ".join(f"{k} {wall_ms(fn):.3f}" for k, fn in pieces.items()), flush=True)


if __name__ == "__main__":
    main()
