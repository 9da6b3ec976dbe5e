"""A camera the robot lacks, fed black and masked out (as lerobot / openpi run it) against left out
of the prefix (`Pi0Model.with_cameras`, what `Policy` does since round 19 of docs/PERFORMANCE.md),
in one process on one CUDA GPU: FastPi0 (compile on) over the full-size preset's three cameras
with the last one absent, as a 3-slot Pi0 / Pi0.5 runs under LIBERO. Prints the actions'
difference, then times full inference and the denoise alone (a reuse hit) in turn, round after
round.

    PYTHONPATH=src:scripts python3 scripts/camera_ab.py pi0|pi05 ROUNDS
    PYTHONPATH=src:scripts python3 scripts/camera_ab.py tiny-pi0 1 cpu     # a smoke run, no compile
"""

import dataclasses
import sys

import torch
from ab_rounds import time_rounds

from kvreuse.bench import build_random, rel_err, synthetic_obs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def main() -> None:
    variant, rounds = sys.argv[1], int(sys.argv[2])
    dev = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    cfg = preset(variant)
    present, absent = cfg.cameras[:-1], cfg.cameras[-1]
    card = torch.cuda.get_device_name() if dev == "cuda" else dev
    print(card, torch.__version__, variant, f"cameras {cfg.cameras}, {absent} absent", flush=True)
    model = build_random(cfg, dev)
    g = torch.Generator().manual_seed(0)
    full = synthetic_obs(cfg, 1, "cpu", g)
    full = dataclasses.replace(full, images={**full.images, absent: torch.full_like(full.images[absent], -1.0)},
                               image_masks={**full.image_masks, absent: torch.zeros(1, dtype=torch.bool)})
    fewer = dataclasses.replace(full, images={c: full.images[c] for c in present},
                                image_masks={c: full.image_masks[c] for c in present})
    obs = {"masked": full.to(dev), "left out": fewer.to(dev)}
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g).to(dev)
    kw = dict(compile=dev == "cuda")
    fast = {"masked": FastPi0(model, **kw), "left out": FastPi0(model.with_cameras(present), **kw)}
    with torch.no_grad():
        acts = [f.sample_actions(obs[k], noise) for k, f in fast.items()]
        caches = {k: f.encode_prefix(obs[k]) for k, f in fast.items()}
        print(f"actions rel diff {rel_err(*acts):.2e}; prefix rows "
              + " | ".join(f"{k} {c.k.shape[2]}" for k, c in caches.items()), flush=True)
        time_rounds(fast, {"sample_actions": lambda k, f: f.sample_actions(obs[k], noise),
                           "denoise alone (reuse hit)": lambda k, f: f.denoise(caches[k], obs[k], noise)}, rounds, dev)


if __name__ == "__main__":
    main()
