"""SigLIP's patch embedding on the GPU: cuDNN's stride-14 conv (round 5) vs one GEMM over the
unfolded patches (round 6, FastPi0._vision), each captured in a CUDA graph, same process.
Usage (one CUDA GPU): PYTHONPATH=src python3 scripts/patch_embed_ab.py [cameras]"""

import sys

import torch
import torch.nn.functional as F
from attn_tune import _time_us  # same CUDA-graph timing

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
dev, dt, ps, size, width = "cuda", torch.bfloat16, 14, 224, 1152
g = torch.Generator(device=dev).manual_seed(0)
img = torch.rand(n, 3, size, size, device=dev, generator=g).to(dt) * 2 - 1
w = (torch.randn(width, 3, ps, ps, device=dev, generator=g) * 0.02).to(dt)
b = (torch.randn(width, device=dev, generator=g) * 0.02).to(dt)


def conv():
    return F.conv2d(img, w, b, stride=ps).flatten(2).transpose(1, 2)


def gemm():
    k = size // ps
    patches = img.unflatten(2, (k, ps)).unflatten(4, (k, ps)).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * ps * ps)
    return F.linear(patches, w.reshape(width, -1), b).view(n, k * k, width)


err = ((conv().float() - gemm().float()).norm() / conv().float().norm()).item()
print(f"{torch.cuda.get_device_name()}  {n} images  rel. L2 conv vs gemm {err:.2e}")
for name, fn in (("conv (cuDNN)", conv), ("unfold + GEMM", gemm), ("conv (cuDNN)", conv), ("unfold + GEMM", gemm)):
    print(f"{name:<14} {_time_us(fn, reps=20):6.1f} us")
