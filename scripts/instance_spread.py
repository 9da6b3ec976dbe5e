"""How far apart do FastPi0 instances of the same code run? N instances over one model (compile
on, as the bench), the denoise alone (= a reuse hit) and sample_actions timed in turn, round after
round. A spread that stays with an instance across rounds points at something fixed per instance
(its fused weights' and buffers' placement) rather than at noise.

    PYTHONPATH=src:scripts python3 scripts/instance_spread.py pi0|pi05 [instances] [rounds]
"""

import sys

import torch
from ab_rounds import setup, time_rounds

from kvreuse.model.fast import FastPi0


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    _, model, obs, noise = setup(variant, f"{n} instances")
    fast = {f"#{i}": FastPi0(model, compile=True, lm_down_tune=False) for i in range(n)}
    with torch.no_grad():
        caches = {k: f.encode_prefix(obs) for k, f in fast.items()}
        outs = [f.sample_actions(obs, noise) for f in fast.values()]
        print("actions identical across instances:", all(torch.equal(outs[0], o) for o in outs[1:]), flush=True)
        time_rounds(fast, {"denoise alone (reuse hit)": lambda k, f: f.denoise(caches[k], obs, noise),
                           "sample_actions": lambda k, f: f.sample_actions(obs, noise)}, rounds)


if __name__ == "__main__":
    main()
