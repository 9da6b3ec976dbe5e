"""Times the prefix's dense products (SigLIP over 2 x 256 patches, Gemma-2B over 560 tokens) with
F.linear in CUDA graphs, under cuBLAS and cuBLASLt, and prints TFLOP/s per shape: where the
vision tower and prefix LM stand against the card's peak. Usage: PYTHONPATH=src python3 scripts/gemm_shapes.py"""

import torch
import torch.nn.functional as F
from attn_tune import _time_us  # same CUDA-graph timing

dev, dt = "cuda", torch.bfloat16
SHAPES = {  # name: (M, K, N, bias)
    "siglip qkv": (512, 1152, 3456, True), "siglip o": (512, 1152, 1152, True),
    "siglip fc1": (512, 1152, 4304, True), "siglip fc2": (512, 4304, 1152, True),
    "lm qkv": (560, 2048, 2560, False), "lm o": (560, 2048, 2048, False),
    "lm gate_up": (560, 2048, 32768, False), "lm down": (560, 16384, 2048, False),
}
LAYERS = {"siglip": 27, "lm": 18}


print(torch.cuda.get_device_name(), torch.__version__)
for lib in ("cublas", "cublaslt"):
    torch.backends.cuda.preferred_blas_library(lib)
    total = {k: 0.0 for k in LAYERS}
    for name, (m, k, n, has_b) in SHAPES.items():
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        b = torch.randn(n, device=dev, dtype=dt) if has_b else None
        us = _time_us(lambda x=x, w=w, b=b: F.linear(x, w, b))
        part = name.split()[0]
        total[part] += us * LAYERS[part]
        print(f"{lib:<9} {name:<12} {m}x{k}x{n}  {us:7.1f} us  {2 * m * k * n / us / 1e6:6.0f} TFLOP/s", flush=True)
    print(f"{lib:<9} per pass: " + ", ".join(f"{k} products {v / 1e3:.2f} ms" for k, v in total.items()), flush=True)
