"""The reuse layer on FastPi0 (CUDA graphs on a GPU) against the eager model: every mode under the
always gate, and the period gate with text_fixed / layer_wise / partial, over a sequence that
moves a camera, repeats the moved frame and comes back to the first frame (layer_wise's return to
its base). Prints each setting's decisions (decision:plan) and the worst relative error; exits 1
when decisions differ or an error exceeds 1e-3 (float32 on a GPU runs TF32 products: ~5e-4 on an
H100).

    PYTHONPATH=src python3 scripts/reuse_fast_check.py [cuda|cpu]
"""
import sys

import torch

from kvreuse.bench import build_random, rel_err, synthetic_obs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy

MODES = ("full", "vision_only", "state_only", "layer_wise", "partial", "text_fixed")


def main(dev: str) -> int:
    worst, same = 0.0, True
    for variant in ("tiny-pi0", "tiny-pi05"):
        cfg = preset(variant)
        model = build_random(cfg, dev, dtype=torch.float32, seed=0).eval()
        fast = FastPi0(model)
        g = torch.Generator().manual_seed(5)
        first, later = synthetic_obs(cfg, 1, "cpu", g), synthetic_obs(cfg, 1, "cpu", g)
        later.tokens, later.token_mask = first.tokens, first.token_mask  # same prompt: reuse allowed
        seq = [o.to(dev) for o in (first, later, later, first, later, first)]
        noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g).to(dev)
        settings = [ReuseConfig(gate="always", mode=m) for m in MODES]
        settings += [ReuseConfig(gate="period", period=2, mode=m) for m in ("text_fixed", "layer_wise", "partial")]
        for rc in settings:
            runs = []
            for m in (model, fast):
                pol = ReusePolicy(m, rc)
                pol.reset()
                runs.append([pol.infer(o, noise) for o in seq])
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
