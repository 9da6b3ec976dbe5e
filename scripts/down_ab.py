"""A/B of round 13's down-product route, one process, one card, two FastPi0s (compile on, as the
bench) over one model, timed in turn round after round: "round 12" picks the prefix LM's down
product route among cuBLAS's pick and torch's cuBLASLt pick only (the cuBLASLt configuration
candidates switched off while it warms up); "lt configs" also among cuBLASLt's other
configurations (FastPi0 now). Prints each one's routes, the actions' difference, full inference
and the prefix LM's graph alone.

    PYTHONPATH=src python3 scripts/down_ab.py pi0|pi05 [rounds] [prompt tokens]
"""

import sys

import torch

import kvreuse.model.fast as fast_mod
from kvreuse.bench import build_random, random_inputs, rel_err, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    prompt = int(sys.argv[3]) if len(sys.argv) > 3 else None
    print(torch.cuda.get_device_name(), torch.__version__, variant, flush=True)
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda", prompt_tokens=prompt)
    fast = {"round 12": FastPi0(model, compile=True), "lt configs": FastPi0(model, compile=True)}
    with torch.no_grad():
        keep = fast_mod._LtDown.candidates
        fast_mod._LtDown.candidates = staticmethod(lambda *a: [])
        try:
            outs = {"round 12": fast["round 12"].sample_actions(obs, noise)}
        finally:
            fast_mod._LtDown.candidates = keep
        outs["lt configs"] = fast["lt configs"].sample_actions(obs, noise)
        rows = fast["round 12"].prefix_rows(obs.token_mask)
        for k, f in fast.items():
            print(f"{k}: down routes {f.down_routes}", flush=True)
        print(f"actions, lt configs vs round 12: {rel_err(outs['lt configs'], outs['round 12']):.2e}", flush=True)
        for r in range(rounds):  # in turn, so that drift between rounds meets both
            cells = []
            for k, f in fast.items():
                full = time_fn(lambda f=f: f.sample_actions(obs, noise), 30, 3, "cuda")
                lm = time_fn(lambda f=f: f._prefix_graph(f._static(1), (), rows), 30, 3, "cuda")
                cells.append(f"{k}: full {full.median:.3f} (p10 {full.p10:.3f}) LM {lm.median:.3f}")
            print(f"round {r + 1}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
