"""How far the robot's state moves between policy calls, as the cross-modal gate measures it.

Rolls out a shipped testbed policy (baseline, no reuse) on one Meta-World task and, for calls k
apart, prints percentiles of the two state tests of the cross-modal gate: the cosine and the RMS
per-dim L2 of the normalised state (signals.state_signals, on the state the policy sees), and the
share of call pairs each test would pass. docs/RESULTS.md uses it to show what state cosine 0.98
lets through on push.

Usage: MUJOCO_GL=osmesa python scripts/state_motion.py [--variant pi05] [--task push-v3] [--episodes 6]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from kvreuse.eval.envs import make_env
from kvreuse.eval.rollout import run_episode
from kvreuse.policy import Policy
from kvreuse.reuse.signals import state_signals


def pairs(states: list[torch.Tensor], lags, dim: int, out: dict[int, tuple[list, list]]) -> None:
    """Append the (cosine, L2) of every pair of one episode's states `lag` calls apart to out[lag]."""
    for k in lags:
        for a, b in zip(states[k:], states[:-k], strict=True):
            cos, l2 = (float(v) for v in state_signals(a, b, dim))
            out[k][0].append(cos)
            out[k][1].append(l2)


def motion(variant: str, task: str, episodes: int, lags=(1, 2)) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """lag -> (cosines, L2s) over every pair of calls `lag` apart in `episodes` held-out episodes."""
    policy = Policy.from_checkpoint(f"src/kvreuse/assets/testbed-{variant}")
    states: list[torch.Tensor] = []
    infer = policy.infer

    def recording(raw, noise=None, reset=False):
        states.append(policy.transform(raw).state.float())  # the normalised state the gate compares
        return infer(raw, noise=noise, reset=reset)

    policy.infer = recording
    env, out = make_env("metaworld"), {k: ([], []) for k in lags}
    dim = policy.model.cfg.state_dim
    for i in range(episodes):
        states.clear()
        r = run_episode(policy, env, task, i, 1000 + i)
        print(f"episode {i}: {r.status}, {len(states)} calls", flush=True)
        pairs(states, lags, dim, out)
    return {k: (np.array(c), np.array(d)) for k, (c, d) in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="pi05", choices=["pi05", "pi0"])
    ap.add_argument("--task", default="push-v3")
    ap.add_argument("--episodes", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(1)
    pct = (5, 25, 50, 75, 95)
    for k, (cos, l2) in motion(a.variant, a.task, a.episodes).items():
        print(f"calls {k} apart (n = {len(cos)}): cosine p{pct} = {np.round(np.percentile(cos, pct), 4).tolist()}; "
              f"L2 = {np.round(np.percentile(l2, pct), 4).tolist()}")
        passed = cos >= 0.98
        if passed.any():
            print(f"  cosine >= 0.98 passes {passed.mean():.0%}; their L2 median / max "
                  f"{np.median(l2[passed]):.3f} / {l2[passed].max():.3f}")
        print("  L2 <= " + ", ".join(f"{e:g}: {(l2 <= e).mean():.0%}" for e in (0.02, 0.04, 0.06, 0.08)))


if __name__ == "__main__":
    main()
