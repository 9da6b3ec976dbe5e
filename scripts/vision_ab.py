"""A/B of round 11's two vision-tower changes, one process, one card, three FastPi0s over one model:
- "as built": SigLIP's fc2 weight as a (K, N) copy and fc1's bias + GELU in cuBLASLt's epilogue;
- "no GELU epilogue": the fc2 copy only;
- "round 10": neither (fc2 as the (N, K) weight's transposed view, the layout F.linear used;
  bias + GELU as a separate kernel).
Each captures its own vision graph; the three are timed in turn, round after round, and their
embeddings compared. First, in float32 (no TF32), which GELU the epilogue computes: tanh, as
SigLIP's, or erf.

    PYTHONPATH=src python3 scripts/vision_ab.py [pi0|pi05] [rounds]
"""

import sys

import torch
import torch.nn.functional as F

from kvreuse.bench import build_random, random_inputs, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def epilogue_gelu_kind() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w, b = (torch.randn(*s, device="cuda") for s in ((512, 1152), (4304, 1152), (4304,)))
    e = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    z = torch.addmm(b, x, w.t())
    print(f"fp32 epilogue GELU: max |diff| vs tanh GELU {(e - F.gelu(z, approximate='tanh')).abs().max():.2e}, "
          f"vs erf GELU {(e - F.gelu(z)).abs().max():.2e}", flush=True)


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(f"{torch.cuda.get_device_name()} {variant}", flush=True)
    epilogue_gelu_kind()
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))
    model = build_random(cfg, "cuda")
    obs, _ = random_inputs(cfg, 1, "cuda", 1)
    fast = {"as built": FastPi0(model), "no GELU epilogue": FastPi0(model), "round 10": FastPi0(model)}
    fast["no GELU epilogue"].gelu_epilogue = fast["round 10"].gelu_epilogue = False
    for w, layer in zip(fast["round 10"].vis, model.vision.layers, strict=True):
        w.fc2_t = layer.fc2.weight.t()  # a view: (K, N) shape, (N, K) memory
    with torch.no_grad():
        emb = {k: f.embed_images(obs.images) for k, f in fast.items()}
        for k in ("no GELU epilogue", "round 10"):
            diff = max((emb["as built"][c].float() - emb[k][c].float()).abs().max().item() for c in cfg.cameras)
            scale = max(emb[k][c].float().abs().max().item() for c in cfg.cameras)
            print(f"embeddings, as built vs {k}: max |diff| {diff:.3e} (max |x| {scale:.2f})")
        for r in range(rounds):  # the three in turn, so that drift between rounds meets all of them
            st = {k: time_fn(lambda f=f: f.embed_images(obs.images), 50, 5, "cuda") for k, f in fast.items()}
            print(f"round {r + 1}: " + ", ".join(f"{k} {s.median:.3f} ms (p10 {s.p10:.3f})" for k, s in st.items()))


if __name__ == "__main__":
    main()
