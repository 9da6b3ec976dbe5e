"""Would the vision tower run faster as two halves on two CUDA streams (camera 0 and camera 1,
each a 256-row tower) than as one 512-row pass? The halves' kernels could fill each other's
launch gaps and the SMs one pass leaves idle (its fc2 product has 108 tiles for 132 SMs). Two
FastPi0s (compile on, as the bench) over one model, the vision graph timed in turn round after
round, and the embeddings compared.

    PYTHONPATH=src python3 scripts/vision_streams_ab.py [pi0|pi05] [rounds]
"""

import sys

import torch
import torch.nn.functional as F

from kvreuse.bench import build_random, random_inputs, rel_err, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0, _add_ln


class _TwoStreams(FastPi0):
    def _tower(self, images):
        vc, m = self.cfg.vision, self.model.vision
        ps, g = vc.patch_size, vc.grid
        patches = images.unflatten(2, (g, ps)).unflatten(4, (g, ps)).permute(0, 2, 4, 1, 3, 5)
        x = F.linear(patches.reshape(-1, 3 * ps * ps), m.patch_embed.weight.reshape(vc.width, -1), m.patch_embed.bias)
        x = x.view(images.shape[0], vc.num_patches, vc.width) + m.pos_embed.weight[None]
        y = None
        for w in self.vis:
            x, y = self._siglip_fn(
                x, y, w.ln1_w, w.ln1_b, w.qkv_w, w.qkv_b, w.o_w, w.o_b, w.ln2_w, w.ln2_b,
                w.fc1_w, w.fc1_b, w.fc2_t, w.fc2_b, vc.num_heads, vc.eps, self.fused_ln, self.gelu_epilogue,
            )
        x = _add_ln(self.fused_ln)(x, y, m.post_ln.weight, m.post_ln.bias, vc.eps)[1]
        return F.linear(x, self.model.projector.weight, self.model.projector.bias)

    def _vision(self, st, n):
        b = st.image_masks.shape[0]
        imgs = st.images[: n * b]
        h = imgs.shape[0] // 2
        if h == 0:
            return self._tower(imgs)
        main = torch.cuda.current_stream()
        if self._side is None:
            self._side = torch.cuda.Stream(device=imgs.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            second = self._tower(imgs[h:])
        first = self._tower(imgs[:h])
        main.wait_stream(self._side)
        return torch.cat([first, second])


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(torch.cuda.get_device_name(), torch.__version__, variant, flush=True)
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, _ = random_inputs(cfg, 1, "cuda")
    fast = {"one pass": FastPi0(model, compile=True), "two streams": _TwoStreams(model, compile=True)}
    imgs = [obs.images[c] for c in cfg.cameras]
    with torch.no_grad():
        outs = {k: f._vision_of(f._static(1), imgs).clone() for k, f in fast.items()}
        print(f"embeddings rel diff {rel_err(*outs.values()):.2e}", flush=True)
        for r in range(rounds):
            st = {k: time_fn(lambda f=f: f._vision_of(f._static(1), imgs), 30, 3, "cuda") for k, f in fast.items()}
            print(f"round {r + 1}, vision graph: " + " | ".join(f"{k} {s.median:.3f} ms (p10 {s.p10:.3f})"
                                                              for k, s in st.items()), flush=True)


if __name__ == "__main__":
    main()
