"""A/B of SigLIP's fc2 weight layout in the fast path's vision tower, one process, one card:
FastPi0 as built (fc2 as a (K, N) contiguous copy, round 11) against a second FastPi0 over the same
model whose fc2 is the (N, K) weight's transposed view, the layout F.linear used before. Both
capture their own vision graph; timings alternate in rounds (bench.side_by_side); the embeddings
are compared too.

    PYTHONPATH=src python3 scripts/vision_ab.py [pi0|pi05] [rounds]
"""

import sys

import torch

from kvreuse.bench import build_random, random_inputs, side_by_side, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))
    model = build_random(cfg, "cuda")
    obs, _ = random_inputs(cfg, 1, "cuda", 1)
    new, old = FastPi0(model), FastPi0(model)
    for w, layer in zip(old.vis, model.vision.layers, strict=True):
        w.fc2_t = layer.fc2.weight.t()  # a view: (K, N) shape, (N, K) memory
    calls = {name: (lambda f=f: f.embed_images(obs.images)) for name, f in (("kn copy", new), ("nk view", old))}
    with torch.no_grad():
        a, b = (calls[k]() for k in calls)
        diff = max((a[c].float() - b[c].float()).abs().max().item() for c in a)
        print(f"{torch.cuda.get_device_name()} {variant}: vision embeddings max |diff| kn copy vs nk view {diff:.3e}")
        timer = lambda fn, n: time_fn(fn, n, 5, "cuda")  # noqa: E731
        for i, (x, y) in enumerate(side_by_side(calls["kn copy"], calls["nk view"], rounds, 50, 50, timer)):
            print(f"round {i + 1}: fc2 kn copy {x.median:.3f} ms (p10 {x.p10:.3f}), nk view {y.median:.3f} ms "
                  f"(p10 {y.p10:.3f})")


if __name__ == "__main__":
    main()
