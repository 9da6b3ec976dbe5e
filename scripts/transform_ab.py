"""A/B of the robot transform at two commits in one process, one card: RobotTransform as an older
commit had it (`kvreuse_old`, see version_ab.py --make) against the working tree's, on the bench's
raw observation (bench.robot_inputs: uint8 images at the model's size, a state, a short prompt).
Times the transform alone and Policy.infer (reuse off, and a reuse hit) over one compiled FastPi0
of the full-size random model, round after round; checks that both give the same images and
actions.

    python3 scripts/version_ab.py --make REV
    PYTHONPATH=src:scripts:scripts/_ab python3 scripts/transform_ab.py pi0|pi05 ROUNDS
"""

import sys

import numpy as np
import torch
from ab_rounds import setup, time_rounds
from kvreuse_old.transforms.robot import RobotTransform as OldTransform

from kvreuse.bench import robot_inputs
from kvreuse.model.fast import FastPi0
from kvreuse.policy import Policy
from kvreuse.reuse.config import ReuseConfig


def main() -> None:
    variant, rounds = sys.argv[1], int(sys.argv[2])
    cfg, model, _, noise = setup(variant, "robot transform A/B")
    new, raw = robot_inputs(cfg, 1)
    old = OldTransform(new.cfg, new.tok, new.stats, new.spec)
    fast = FastPi0(model, compile=True)
    tfs = {"old": old, "new": new}
    with torch.no_grad():
        a, b = (tfs[k](raw, device="cuda") for k in ("old", "new"))
        same = all(torch.equal(a.images[c], b.images[c]) for c in cfg.cameras)
        print(f"images identical: {same}; tokens identical: {torch.equal(a.tokens, b.tokens)}", flush=True)
        pols = {k: Policy(fast, tf) for k, tf in tfs.items()}
        hits = {k: Policy(fast, tf, reuse=ReuseConfig(gate="crossmodal")) for k, tf in tfs.items()}
        acts = {k: p.infer(raw, noise)[0] for k, p in pols.items()}
        print(f"actions identical: {np.array_equal(acts['old'], acts['new'])}", flush=True)
        time_rounds(tfs, {
            "transform": lambda k, tf: tf(raw, device="cuda"),
            "Policy.infer, reuse off": lambda k, tf: pols[k].infer(raw, noise),
            "Policy.infer, reuse hit": lambda k, tf: hits[k].infer(raw, noise),
        }, rounds)
        print("hit calls reused:", {k: p.stats.reuses for k, p in hits.items()}, flush=True)


if __name__ == "__main__":
    main()
