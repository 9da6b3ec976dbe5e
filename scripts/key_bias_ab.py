"""A/B of the prefix LM's padding mask read per key (round 14) against the dense rows x keys mask
FastPi0 passed the Triton attention until round 13: two FastPi0s (compile on, as the bench) over
one model, timed in turn round after round: encode_prefix (vision + prefix LM) and full
inference (sample_actions). The actions and caches are compared (the same values are added to
the same scores, so they should be bit-identical).

    PYTHONPATH=src python3 scripts/key_bias_ab.py [pi0|pi05] [rounds] [untuned]

Runs at commit 2d6a696 (the round-14 logs'): later commits build the mask in `_prefix_tables`,
and scripts/fast_ab.py is the general A/B.
"""

import sys

import torch

from kvreuse.bench import build_random, random_inputs, rel_err, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


class _Dense(FastPi0):
    def _prefix_bias(self, valid, rows):
        return super()._prefix_bias(valid, rows).contiguous()


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    tune = "untuned" not in sys.argv[3:]  # untuned: both keep cuBLAS's down product (no route timer)
    print(torch.cuda.get_device_name(), torch.__version__, variant, flush=True)
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    kw = dict(compile=True, lm_down_tune=tune)
    fast = {"dense mask": _Dense(model, **kw), "per-key mask": FastPi0(model, **kw)}
    with torch.no_grad():
        outs = {k: f.sample_actions(obs, noise) for k, f in fast.items()}
        caches = {k: f.encode_prefix(obs) for k, f in fast.items()}
        a, b = caches.values()
        # Each instance times the prefix LM's down-product routes itself (round 13), so two
        # instances may round differently for a reason of their own: print what each chose.
        print("down routes: " + " | ".join(f"{k} {f.down_routes}" for k, f in fast.items()), flush=True)
        print(f"actions rel diff {rel_err(*outs.values()):.2e}; cache K equal {torch.equal(a.k, b.k)}, "
              f"V equal {torch.equal(a.v, b.v)}", flush=True)
        for r in range(rounds):  # in turn, so that drift between rounds meets both
            for name, call in (("encode_prefix (vision + prefix LM)", lambda f: f.encode_prefix(obs)),
                               ("sample_actions", lambda f: f.sample_actions(obs, noise))):
                st = {k: time_fn(lambda f=f, call=call: call(f), 30, 3, "cuda") for k, f in fast.items()}
                print(f"round {r + 1}, {name}: " + " | ".join(f"{k} {s.median:.3f} ms (p10 {s.p10:.3f})"
                                                             for k, s in st.items()), flush=True)


if __name__ == "__main__":
    main()
