"""Does the latency-bound denoise chain overlap with the compute-bound prefix LM on one GPU?

A bound, not a feature: replays FastPi0's captured prefix-LM graph and denoise graph at the same
time on two streams (they share buffers, so the numbers they compute are garbage; only time is
measured) and compares with each alone and both back to back. If together ~= the longer one,
running Euler step 1 layer by layer behind the prefix LM (it needs only layer l's prefix K/V)
could hide up to one step of the denoise in a full inference; if together ~= the sum, it cannot.
Usage (one CUDA GPU): PYTHONPATH=src python3 scripts/overlap_probe.py [pi0|pi05] [compile 1|0] [cameras, default 2]"""

import sys

import torch

from kvreuse.bench import build_random, random_inputs, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def main(name="pi0", compile="1", cameras="2"):
    cfg = preset(name)
    cfg = cfg.replace(cameras=tuple(f"cam{i}" for i in range(int(cameras))))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    fast = FastPi0(model, compile=compile == "1", overlap=False)  # separate prefix and denoise graphs
    fast.sample_actions(obs, noise)  # captures the vision, prefix and denoise graphs
    graphs = fast.graphs.graphs
    prefix = graphs[("prefix", 1, (), fast.prefix_rows(obs.token_mask))][0]
    denoise = graphs[("denoise", 1, cfg.num_steps)][0]
    print(torch.cuda.get_device_name(), name, "cameras:", cameras, "compile:", fast.compiled, "expert:", fast.expert_gemm, "pdl:", fast.expert_pdl)

    main_s = torch.cuda.current_stream()
    lo, hi = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)  # -1: higher priority

    def together(side):
        side.wait_stream(main_s)
        prefix.replay()
        with torch.cuda.stream(side):
            denoise.replay()
        main_s.wait_stream(side)

    rows = {
        "prefix LM alone": prefix.replay,
        "denoise alone": denoise.replay,
        "back to back": lambda: (prefix.replay(), denoise.replay()),
        "together (same priority)": lambda: together(lo),
        "together (denoise high priority)": lambda: together(hi),
    }
    res = {k: time_fn(f, 30, 3, "cuda").median for k, f in rows.items()}  # events around each call, as the bench
    for k, v in res.items():
        print(f"{k:<34} {v:7.3f} ms")
    hidden = res["back to back"] - res["together (denoise high priority)"]
    print(f"hidden by running together: {hidden:.3f} ms of the denoise's {res['denoise alone']:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
