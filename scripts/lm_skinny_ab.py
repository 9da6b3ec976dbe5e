"""The prefix LM's products at the row counts of a partial update (<= 64 tokens: a few moved
patches and the prompt), as FastPi0 runs them (torch / cuBLAS, the gelu * up product fused by
torch.compile) against the expert's skinny Triton kernels (kvreuse.model.skinny_gemm), which
stream each program's weight slice with deep pipelines. Whether routing a partial update's LM
products through them would pay: us per layer, each product over 18 distinct layers' weights
(as in a pass, so that nothing stays in L2), in CUDA graphs; and the results' agreement.

    PYTHONPATH=src:scripts python3 scripts/lm_skinny_ab.py [M ...]     (default 32 64)
"""

import sys

import torch
import torch.nn.functional as F
from attn_tune import _time_us

from kvreuse.model.skinny_gemm import skinny_linear

DEPTH, WIDTH, MLP, QKV = 18, 2048, 16384, 2560  # Gemma-2B: 8 query heads + 1 K + 1 V of 256


@torch.compile
def _gelu_up(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.gelu(g, approximate="tanh") * u


def _cases(w: dict, x, a, res) -> dict:
    """Per product: (as FastPi0 runs it, through skinny_linear), each a function of the layer."""
    return {
        "qkv": (lambda i: F.linear(x, w["qkv"][i]), lambda i: skinny_linear(x, w["qkv"][i].t())),
        "o + residual": (lambda i: torch.addmm(res, x, w["o"][i].t()),
                         lambda i: skinny_linear(x, w["o"][i].t(), residual=res)),
        "gate/up + gelu * up": (lambda i: _gelu_up(F.linear(x, w["gate_up"][i])),
                                lambda i: skinny_linear(x, w["gate_up"][i].t(), gated_gelu=True)),
        "down + residual": (lambda i: torch.addmm(res, a, w["down"][i].t()),
                            lambda i: skinny_linear(a, w["down"][i].t(), residual=res)),
    }


def main() -> None:
    rows = [int(a) for a in sys.argv[1:]] or [32, 64]
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    w = {  # (N, K) nn.Linear layouts, as FastPi0 fuses them
        "qkv": [torch.randn(QKV, WIDTH, device=dev, dtype=dt) / WIDTH**0.5 for _ in range(DEPTH)],
        "o": [torch.randn(WIDTH, WIDTH, device=dev, dtype=dt) / WIDTH**0.5 for _ in range(DEPTH)],
        "gate_up": [torch.randn(2 * MLP, WIDTH, device=dev, dtype=dt) / WIDTH**0.5 for _ in range(DEPTH)],
        "down": [torch.randn(WIDTH, MLP, device=dev, dtype=dt) / MLP**0.5 for _ in range(DEPTH)],
    }
    print(torch.cuda.get_device_name(), torch.__version__)
    for m in rows:
        x = torch.randn(m, WIDTH, device=dev, dtype=dt)
        a = torch.randn(m, MLP, device=dev, dtype=dt)
        res = torch.randn(m, WIDTH, device=dev, dtype=dt)
        tot = [0.0, 0.0]
        for name, fns in _cases(w, x, a, res).items():
            us = []
            for fn in fns:
                us.append(_time_us(lambda fn=fn: [fn(i) for i in range(DEPTH)], reps=2) / DEPTH)
            ref, got = fns[0](0).float(), fns[1](0).float()
            err = float((got - ref).abs().max() / ref.abs().max())
            tot = [tot[0] + us[0], tot[1] + us[1]]
            print(f"M={m:3d} {name:20s} torch {us[0]:7.2f} us | skinny {us[1]:7.2f} us | max|diff|/max {err:.1e}",
                  flush=True)
        print(f"M={m:3d} per layer: torch {tot[0]:.1f} us, skinny {tot[1]:.1f} us; x {DEPTH} layers "
              f"{tot[0] * DEPTH / 1e3:.3f} vs {tot[1] * DEPTH / 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
