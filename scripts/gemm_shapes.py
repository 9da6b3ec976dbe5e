"""Times the prefix's dense products (SigLIP over 2 x 256 patches, Gemma-2B over 560 tokens) in
CUDA graphs and prints TFLOP/s per shape: where the vision tower and prefix LM stand against the
card's peak, and whether another weight layout or BLAS library would serve a shape better.

Each shape runs once per layer over that many distinct weight copies (27 SigLIP / 18 Gemma
layers), as in a pass, so that weights that fit in L2 are not re-read from it every call.
Layouts: "nk" is the (N, K) nn.Linear weight (F.linear / addmm on its .t() view), "kn" a (K, N)
contiguous copy made at load time (addmm / mm on it); FastPi0 keeps "nk" for all of them but
SigLIP's fc2 (round 11). For SigLIP's biased products also "nk-nobias" (the bias left to a later
kernel); for the others also "nk-1dbias": addmm with a zero (N,) bias (and a residual added
after it). torch appears to send a 1-D-bias addmm through cuBLASLt's bias epilogue whatever the
preferred library: round 11's SigLIP rows took the same time under either library with their
bias, and not without it. So this would be a way to pick cuBLASLt for one product; it was added
after round 11's runs and has not been run yet. Gemma's O and down carry the residual in the
addmm, as in FastPi0.
Usage: PYTHONPATH=src python3 scripts/gemm_shapes.py [M ...]
With row counts M, only Gemma's products, at each M (Pi0: 560 prefix tokens, Pi0.5: 712)."""

import sys

import torch
from attn_tune import _time_us  # same CUDA-graph timing

dev, dt = "cuda", torch.bfloat16
SHAPES = {  # name: (M, K, N, epilogue) with epilogue None, "bias" (a (N,) vector) or "res" (an (M, N) residual)
    "siglip qkv": (512, 1152, 3456, "bias"), "siglip o": (512, 1152, 1152, "bias"),
    "siglip fc1": (512, 1152, 4304, "bias"), "siglip fc2": (512, 4304, 1152, "bias"),
    "lm qkv": (560, 2048, 2560, None), "lm o": (560, 2048, 2048, "res"),
    "lm gate_up": (560, 2048, 32768, None), "lm down": (560, 16384, 2048, "res"),
}
LAYERS = {"siglip": 27, "lm": 18}


def product(x, w_nk, w_kn, c, layout: str):
    """x @ W^T (+ c) through the given layout; c: bias (N,), residual (M, N) or None."""
    if layout == "nk-nobias":
        return x @ w_nk.t()
    if layout == "nk-1dbias":
        y = torch.addmm(x.new_zeros(w_nk.shape[0]), x, w_nk.t())
        return y if c is None else y + c
    w = w_nk.t() if layout == "nk" else w_kn
    return x @ w if c is None else torch.addmm(c, x, w)


def per_layer_us(x, ws, wts, c, layout: str) -> float:
    """Median us per layer of one pass (each layer's weights once) in a CUDA graph."""
    return _time_us(lambda: [product(x, w, wt, c, layout) for w, wt in zip(ws, wts, strict=True)], reps=1) / len(ws)


def lm_shapes(m: int) -> dict:
    """Gemma's products over m prefix tokens."""
    return {f"lm {name.split()[1]} M={m}": (m, k, n, epi)
            for name, (_, k, n, epi) in SHAPES.items() if name.startswith("lm")}


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    total: dict[tuple, float] = {}
    shapes = SHAPES if len(sys.argv) < 2 else {k: v for m in map(int, sys.argv[1:]) for k, v in lm_shapes(m).items()}
    for name, (m, k, n, epi) in shapes.items():
        layers = LAYERS[name.split()[0]]
        part = name.split()[0] + "".join(f" {w}" for w in name.split() if w.startswith("M="))  # per M
        x = torch.randn(m, k, device=dev, dtype=dt)
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(layers)]
        wts = [w.t().contiguous() for w in ws]
        c = None if epi is None else torch.randn(*((n,) if epi == "bias" else (m, n)), device=dev, dtype=dt)
        layouts = ("nk", "kn") + (("nk-nobias",) if epi == "bias" else ("nk-1dbias",))
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            for lay in layouts:
                us = per_layer_us(x, ws, wts, c, lay)
                total[(lib, lay, part)] = total.get((lib, lay, part), 0.0) + us * layers
                tflops = 2 * m * k * n / us / 1e6
                print(f"{lib:<9} {lay:<9} {name:<17} {m}x{k}x{n}  {us:7.1f} us  {tflops:6.0f} TFLOP/s", flush=True)
        del ws, wts
    for (lib, lay, part), us in sorted(total.items()):
        print(f"per pass: {lib:<9} {lay:<9} {part} products {us / 1e3:.3f} ms (nobias / 1dbias: some shapes only)")


if __name__ == "__main__":
    main()
