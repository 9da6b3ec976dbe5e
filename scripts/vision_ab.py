"""A/B of SigLIP's attention in the real vision pass (round 13), one process, one card: FastPi0s
over one model, "sdpa" (PyTorch's pick, then the transpose back to (n, p, w)) against
kernels.mqa_attention ("triton") with FastPi0's tiling and any others given as
block_m,block_n,splits,warps. Each captures its own vision graph; they are timed in turn, round
after round, and their embeddings compared with the SDPA instance's.

    PYTHONPATH=src python3 scripts/vision_ab.py [pi0|pi05] [rounds] [bm,bn,splits,warps ...]
(Round 11's version of this script, which A/B'd the fc2 layout and the GELU epilogue, is in git
history before this round.)
"""

import sys

import torch

from kvreuse.bench import build_random, random_inputs, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import SIGLIP_ATTN_TILES, FastPi0


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(f"{torch.cuda.get_device_name()} {variant}", flush=True)
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))
    model = build_random(cfg, "cuda")
    obs, _ = random_inputs(cfg, 1, "cuda", 1)
    fast = {"sdpa": FastPi0(model, vision_attn="sdpa"), "triton": FastPi0(model, vision_attn="triton")}
    for arg in sys.argv[3:]:
        bm, bn, splits, warps = map(int, arg.split(","))
        f = FastPi0(model, vision_attn="triton")
        f.vision_tiles = dict(num_splits=splits, block_m=bm, block_n=bn, num_warps=warps)
        fast[f"triton {arg}"] = f
    print(f"triton: {SIGLIP_ATTN_TILES}")
    with torch.no_grad():
        emb = {k: f.embed_images(obs.images) for k, f in fast.items()}
        scale = max(emb["sdpa"][c].float().abs().max().item() for c in cfg.cameras)
        for k in list(fast)[1:]:
            diff = max((emb["sdpa"][c].float() - emb[k][c].float()).abs().max().item() for c in cfg.cameras)
            print(f"embeddings, sdpa vs {k}: max |diff| {diff:.3e} (max |x| {scale:.2f})")
        for r in range(rounds):  # in turn, so that drift between rounds meets all of them
            st = {k: time_fn(lambda f=f: f.embed_images(obs.images), 50, 5, "cuda") for k, f in fast.items()}
            print(f"round {r + 1}: " + ", ".join(f"{k} {s.median:.3f} ms (p10 {s.p10:.3f})" for k, s in st.items()),
                  flush=True)


if __name__ == "__main__":
    main()
