"""Shared pieces of the same-process A/B scripts (sample_ab, fast_ab, version_ab): the bench's
full-size random model and inputs, and timing several instances in turn, round after round, so
that drift between rounds meets all of them."""

import torch

from kvreuse.bench import build_random, random_inputs, time_fn
from kvreuse.model import preset


def setup(variant: str, note: str = "", device: str = "cuda", batch: int = 1):
    """(cfg, model, obs, noise) as `kvreuse bench` builds them (batch rows); prints the card."""
    card = torch.cuda.get_device_name() if device == "cuda" else device
    print(card, torch.__version__, variant, note, flush=True)
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, device)
    obs, noise = random_inputs(cfg, batch, device)
    return cfg, model, obs, noise


def time_rounds(instances: dict, calls: dict, rounds: int, device: str = "cuda") -> None:
    """For each round and each call name -> fn(key, instance): the median of 30 calls of every
    instance, printed on one line."""
    for r in range(rounds):
        for name, call in calls.items():
            st = {k: time_fn(lambda k=k, f=f, call=call: call(k, f), 30, 3, device) for k, f in instances.items()}
            print(f"round {r + 1}, {name}: " + " | ".join(f"{k} {s.median:.3f} ms (p10 {s.p10:.3f})"
                                                         for k, s in st.items()), flush=True)
