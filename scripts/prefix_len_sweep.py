"""What the prompt's padding costs: the fast path (compile on, as `kvreuse bench` times it) at
several prompt lengths (max_token_len), all else as the bench (2 cameras, batch 1, 10 steps).
The runtime computes every prompt slot, padded or not, so this bounds what running only a
prompt's valid tokens (rounded up to a graph bucket) would save. One process, one card.

    PYTHONPATH=src python3 scripts/prefix_len_sweep.py pi05:64,128,200 pi0:16,48
"""

import sys

import torch

from kvreuse.bench import build_random, random_inputs, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def sweep_one(variant: str, n: int) -> None:
    cfg = preset(variant).replace(cameras=("cam0", "cam1"), max_token_len=n)
    # every slot computed, as in round 11 (scripts/prompt_ab.py times the prompt buckets since)
    fast = FastPi0(build_random(cfg, "cuda"), compile=True, prompt_bucket=0, lm_down_tune=False)
    obs, noise = random_inputs(cfg, 1, "cuda", 1)
    st = fast._static(1)
    with torch.no_grad():
        full = time_fn(lambda: fast.sample_actions(obs, noise), 30, 5, "cuda")
        lm = time_fn(lambda: fast._prefix_graph(st, (), cfg.prefix_len), 30, 5, "cuda")
    print(f"{variant} prompt {n:3d} (prefix {cfg.prefix_len} tokens): full inference {full.median:.2f} ms "
          f"(p10 {full.p10:.2f}), prefix LM {lm.median:.2f} ms (p10 {lm.p10:.2f})", flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for arg in sys.argv[1:] or ["pi05:64,128,200", "pi0:16,48"]:
        variant, lens = arg.split(":")
        for n in map(int, lens.split(",")):
            sweep_one(variant, n)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
