"""The reuse layer on FastPi0 (CUDA graphs on a GPU) against the eager model: every mode under the
always gate and the period gate with text_fixed / layer_wise / partial, over a sequence that moves
a camera, repeats the moved frame and comes back to the first frame (layer_wise's return to its
base); then the signal gates (the crossmodal gate with each state reference over the modes that
part the state and camera snapshots, its L2 bound, the patch metric, the phase gate) over frames
near the first (a camera's top rows redrawn, the state nudged). Each gated setting also runs with
its signals called directly instead of through SignalGraphs (compiled and replayed from CUDA
graphs on a GPU): the two must measure the same values (within 1e-5) and decide alike. Prints
each setting's decisions (decision:plan) and the worst relative error; exits 1 when decisions
differ or an error exceeds 1e-3 (float32 on a GPU runs TF32 products: ~5e-4 on an H100). Variants:
tiny Pi0, tiny Pi0.5, and tiny Pi0.5 without its state (discrete_state_input=False).

    PYTHONPATH=src python3 scripts/reuse_fast_check.py [cuda|cpu]
"""
import sys
from dataclasses import replace

import torch

from kvreuse.bench import build_random, rel_err, synthetic_obs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy

MODES = ("full", "vision_only", "state_only", "layer_wise", "partial", "text_fixed")
# Signal gates, over a sequence whose new frames move one camera's top rows of patches and nudge
# the state (`_near`): the image and state tests pass or fail by how far the call is from the
# cache's snapshots, so each gate decides both ways and the modes run their partial plans.
GATED = [ReuseConfig(gate="crossmodal", threshold=0.85, state_threshold=0.97, state_reference=r, mode=m)
         for r in ("state", "cameras", "both") for m in ("vision_only", "state_only", "partial")]
GATED += [ReuseConfig(gate="crossmodal", threshold=0.85, state_threshold=0.9, state_max_l2=0.3),
          ReuseConfig(gate="threshold", image_metric="patch", threshold=0.9),
          ReuseConfig(gate="phase", threshold=0.85, phase_threshold=0.95)]


def _near(obs, rows: int, shift: float, g: torch.Generator):
    """obs with the first camera's top `rows` pixel rows redrawn and the state moved by `shift`
    (a fresh Observation; tokens and the other cameras shared)."""
    images = dict(obs.images)
    cam = next(iter(images))
    img = images[cam].clone()
    img[:, :, :rows] = torch.rand(img[:, :, :rows].shape, generator=g) * 2 - 1
    images[cam] = img
    return replace(obs, images=images, state=obs.state + shift * torch.randn(obs.state.shape, generator=g))


def _signals_differ(a: dict, b: dict) -> float:
    """Largest difference between two records' numeric signals (inf if they name other ones); the
    cache's age in seconds is wall time, not a signal of the observation."""
    if a.keys() != b.keys():
        return float("inf")
    nums = [(a[k], b[k]) for k in a if isinstance(a[k], float) and k != "age_s"]
    return max((abs(x - y) for x, y in nums), default=0.0)


def main(dev: str) -> int:
    worst, same = 0.0, True
    variants = {"tiny-pi0": preset("tiny-pi0"), "tiny-pi05": preset("tiny-pi05"),
                "tiny-pi05 without its state": preset("tiny-pi05", discrete_state_input=False)}  # openpi's pi05_libero
    for variant, cfg in variants.items():
        model = build_random(cfg, dev, dtype=torch.float32, seed=0).eval()
        fast = FastPi0(model)
        g = torch.Generator().manual_seed(5)
        first, later = synthetic_obs(cfg, 1, "cpu", g), synthetic_obs(cfg, 1, "cpu", g)
        later.tokens, later.token_mask = first.tokens, first.token_mask  # same prompt: reuse allowed
        seq = [o.to(dev) for o in (first, later, later, first, later, first)]
        a, b = _near(first, 7, 0.05, g), _near(first, 14, 0.2, g)
        near = [o.to(dev) for o in (first, a, a, b, first, b, a)]
        noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g).to(dev)
        settings = [ReuseConfig(gate="always", mode=m) for m in MODES]
        settings += [ReuseConfig(gate="period", period=2, mode=m) for m in ("text_fixed", "layer_wise", "partial")]
        for rc in settings + GATED:
            runs = []
            for m, direct in ((model, False), (fast, False), (fast, True))[: 3 if rc in GATED else 2]:
                pol = ReusePolicy(m, rc)
                if direct:
                    pol._graphs = None  # measure then calls the signal functions as they are
                pol.reset()
                runs.append([pol.infer(o, noise) for o in (near if rc in GATED else seq)])
            if len(runs) == 3:  # the signals through SignalGraphs against the direct calls
                plain = runs.pop()
                gap = max(_signals_differ(f[1].signals, d[1].signals) for f, d in zip(runs[1], plain, strict=True))
                alike = [r[1].decision for r in runs[1]] == [r[1].decision for r in plain]
                same = same and gap <= 1e-5 and alike
                print(f"{variant} {rc.label()}: signals through graphs vs direct: max diff {gap:.1e}"
                      + ("" if alike else "; decisions DIFFER"))
            err = max(rel_err(f[0].float(), e[0].float()) for e, f in zip(*runs, strict=True))
            decisions = [[(f"{r[1].decision}:{r[1].plan}", r[1].mode) for r in run] for run in runs]
            worst, same = max(worst, err), same and decisions[0] == decisions[1]
            print(f"{variant} {rc.label()}: {' '.join(d for d, _ in decisions[1])}; max rel err {err:.2e}"
                  + ("" if decisions[0] == decisions[1] else f"; eager decided {decisions[0]}"))
    ok = same and worst < 1e-3
    print(f"worst {worst:.2e}, decisions {'the same' if same else 'DIFFER'}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
