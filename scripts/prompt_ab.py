"""A/B of round 12's two prefix-LM changes, one process, one card, three FastPi0s (compile on, as
the bench) over one model:
- "round 11": every prompt slot computed, the down product through cuBLAS's pick
  (prompt_bucket=0, lm_down_tune=False);
- "down tuned": every slot, the down product's route timed per row count (lm_down_tune=True);
- "both": also the prompt run only up to its bucket (prompt_bucket=64, round 12's first default;
  FastPi0's default is now 32 slots for Pi0.5, see buckets=).
For each prompt length (valid tokens of the synthetic prompt; the bench's own is two thirds of the
slots) the three are timed in turn, round after round: full inference (sample_actions) and the
prefix LM's graph alone. Their actions are compared with round 11's (different GEMM kernels and
row counts round differently in bf16: expect ~1e-3, never more than --check's bound).

    PYTHONPATH=src python3 scripts/prompt_ab.py pi05:133,100,60,20 pi0:32,12 [buckets=32,...] [rounds=3]

buckets=...: also a variant per extra prompt_bucket (down product tuned), e.g. buckets=32.
"""

import sys

import torch

from kvreuse.bench import build_random, rel_err, random_inputs, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0

VARIANTS = {"round 11": dict(prompt_bucket=0, lm_down_tune=False), "down tuned": dict(prompt_bucket=0),
            "both": dict(prompt_bucket=64)}


def ab_one(variant: str, prompts: list[int], rounds: int, variants: dict) -> None:
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    fast = {k: FastPi0(model, compile=True, **kw) for k, kw in variants.items()}
    for n in prompts:
        obs, noise = random_inputs(cfg, 1, "cuda", 1, prompt_tokens=n)
        with torch.no_grad():
            outs = {k: f.sample_actions(obs, noise) for k, f in fast.items()}
            rows = {k: f.prefix_rows(obs.token_mask) for k, f in fast.items()}
            for k, f in fast.items():
                f._prefix_graph(f._static(1), (), rows[k])
            print(f"{variant} prompt {n} of {cfg.max_token_len} slots: rows " +
                  ", ".join(f"{k} {r}" for k, r in rows.items()) + "; down routes " +
                  ", ".join(f"{k} {f.down_routes}" for k, f in fast.items()), flush=True)
            print("  actions vs round 11: " + ", ".join(
                f"{k} {rel_err(o, outs['round 11']):.2e}" for k, o in outs.items() if k != "round 11"), flush=True)
            for r in range(rounds):  # in turn, so that drift between rounds meets all of them
                cells = []
                for k, f in fast.items():
                    full = time_fn(lambda f=f, o=obs, z=noise: f.sample_actions(o, z), 30, 3, "cuda")
                    lm = time_fn(lambda f=f, r=rows[k]: f._prefix_graph(f._static(1), (), r), 30, 3, "cuda")
                    cells.append(f"{k}: full {full.median:.2f} (p10 {full.p10:.2f}) LM {lm.median:.2f}")
                print(f"  round {r}: " + " | ".join(cells), flush=True)
    del fast, model
    torch.cuda.empty_cache()


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    args = sys.argv[1:] or ["pi05:133,100,60,20", "pi0:32,12"]
    rounds = int(args.pop()) if args and args[-1].isdigit() else 3
    variants = dict(VARIANTS)
    for arg in [a for a in args if a.startswith("buckets=")]:
        args.remove(arg)
        variants |= {f"bucket {b}": dict(prompt_bucket=int(b)) for b in arg.split("=")[1].split(",")}
    for arg in args:
        variant, lens = arg.split(":")
        ab_one(variant, [int(n) for n in lens.split(",")], rounds, variants)


if __name__ == "__main__":
    main()
