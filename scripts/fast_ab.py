"""A/B of two FastPi0 settings in one process, one card: two FastPi0s (compile on, as the bench)
over one model, timed in turn round after round: encode_prefix (vision + prefix LM) and full
inference (sample_actions), and the denoise alone over each one's cache (a reuse hit). Prints the actions' and caches' differences first. Both keep
cuBLAS's down product unless --tuned (each instance's route timer may pick another route, which
rounds differently: docs/PERFORMANCE.md, round 14's per-key mask).

    PYTHONPATH=src:scripts python3 scripts/fast_ab.py pi0|pi05 ROUNDS --a key=value ... --b key=value ... [--tuned]
        [--batch N]
    e.g. scripts/fast_ab.py pi0 4 --a rope_kernel=0 --b rope_kernel=1
         scripts/fast_ab.py pi0 4 --batch 2 --a skinny_rows=64 --b skinny_rows=256
"""

import sys

import torch
from ab_rounds import setup, time_rounds

from kvreuse.bench import rel_err
from kvreuse.model.fast import FastPi0


def _kwargs(args: list[str]) -> dict:
    out = {}
    for a in args:
        k, _, v = a.partition("=")
        out[k] = {"0": False, "1": True}.get(v, int(v) if v.isdigit() else v)
    return out


def main() -> None:
    argv = sys.argv[1:]
    tuned = "--tuned" in argv
    argv = [a for a in argv if a != "--tuned"]
    batch = 1
    if "--batch" in argv:
        i = argv.index("--batch")
        batch = int(argv[i + 1])
        del argv[i : i + 2]
    variant, rounds = argv[0], int(argv[1])
    ia, ib = argv.index("--a"), argv.index("--b")
    kw_a, kw_b = _kwargs(argv[ia + 1 : ib]), _kwargs(argv[ib + 1 :])
    _, model, obs, noise = setup(variant, f"A {kw_a} | B {kw_b} | batch {batch}", batch=batch)
    base = dict(compile=True, lm_down_tune=tuned)
    fast = {"A": FastPi0(model, **base, **kw_a), "B": FastPi0(model, **base, **kw_b)}
    with torch.no_grad():
        outs = [f.sample_actions(obs, noise) for f in fast.values()]
        a, b = (f.encode_prefix(obs) for f in fast.values())
        caches = dict(zip(fast, (a, b), strict=True))
        hits = [f.denoise(c, obs, noise) for f, c in zip(fast.values(), (a, b), strict=True)]
        valid = a.mask[None, :, :, None, None]
        print(f"actions rel diff {rel_err(*outs):.2e}, denoise {rel_err(*hits):.2e}; cache K rel diff {rel_err(a.k * valid, b.k * valid):.2e}, "
              f"V {rel_err(a.v * valid, b.v * valid):.2e}; down routes "
              + " | ".join(f"{k} {f.down_routes}" for k, f in fast.items()), flush=True)
        time_rounds(fast, {"encode_prefix (vision + prefix LM)": lambda k, f: f.encode_prefix(obs),
                           "sample_actions": lambda k, f: f.sample_actions(obs, noise),
                           "denoise (reuse hit)": lambda k, f: f.denoise(caches[k], obs, noise)}, rounds)


if __name__ == "__main__":
    main()
