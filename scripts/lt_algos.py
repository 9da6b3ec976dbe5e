"""Does cuBLASLt have a faster algorithm than torch's pick for the prefix's products? For each
SigLIP / Gemma product as FastPi0 runs it (bias, GELU epilogue, residual, weight layout), times
torch's call and every algorithm cuBLASLt's heuristic lists (kvreuse.model.cublaslt; 7-8 per
shape on an H100), each over that many distinct weight copies as in a pass (27 SigLIP / 18 Gemma
layers) in a CUDA graph, and checks each algorithm's output against torch's.
--search: each listed algorithm also with split-K counts 1-8 (both reduction schemes) and CTA
swizzling on and off, where cuBLASLt accepts the combination (cublasLtMatmulAlgoCheck).
--tiles: each listed algorithm id with every tile shape and stage count it offers, at split-K 1
and 2 (round 14; at most MAX_CONFIGS per shape, in that order). --siglip: SigLIP's products only.
Usage: PYTHONPATH=src:scripts python3 scripts/lt_algos.py [M ...] [--search | --tiles] [--siglip]
(M: Gemma's rows; 560 672)"""

import functools
import operator
import re
import sys
from pathlib import Path

import torch
from attn_tune import _time_us

from kvreuse.model import cublaslt as lt
from kvreuse.model.cublaslt import LtProduct, Shape

dev, dt = "cuda", torch.bfloat16
SEARCH = False  # --search
TILES = False  # --tiles
MAX_CONFIGS = 800


def check_header() -> None:
    """The module's enum values against the installed cublasLt.h, where there is one."""
    heads = [p for p in (Path("/usr/local/cuda/include/cublasLt.h"),
                                 Path("/usr/local/cuda/targets/x86_64-linux/include/cublasLt.h")) if p.is_file()]
    if not heads:
        print("no cublasLt.h found: enum values unchecked")
        return
    text = heads[0].read_text()
    want = {"CUBLASLT_MATMUL_DESC_TRANSA": lt.DESC_TRANSA, "CUBLASLT_MATMUL_DESC_TRANSB": lt.DESC_TRANSB,
            "CUBLASLT_MATMUL_DESC_EPILOGUE": lt.DESC_EPILOGUE,
            "CUBLASLT_MATMUL_DESC_BIAS_POINTER": lt.DESC_BIAS_POINTER,
            "CUBLASLT_EPILOGUE_DEFAULT": lt.EPILOGUE_DEFAULT, "CUBLASLT_EPILOGUE_BIAS": lt.EPILOGUE_BIAS,
            "CUBLASLT_EPILOGUE_GELU_BIAS": lt.EPILOGUE_GELU_BIAS,
            "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES": lt.PREF_MAX_WORKSPACE_BYTES,
            "CUBLASLT_ALGO_CONFIG_SPLITK_NUM": lt.ALGO_CONFIG["splitk"],
            "CUBLASLT_ALGO_CONFIG_STAGES_ID": lt.ALGO_CONFIG["stages"],
            "CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME": lt.ALGO_CONFIG["reduction"],
            "CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING": lt.ALGO_CONFIG["swizzle"],
            "CUBLASLT_ALGO_CONFIG_TILE_ID": lt.ALGO_CONFIG["tile"],
            "CUBLASLT_ALGO_CAP_TILE_IDS": lt.ALGO_CAP["tile_ids"],
            "CUBLASLT_ALGO_CAP_STAGES_IDS": lt.ALGO_CAP["stages_ids"],
            "CUBLASLT_REDUCTION_SCHEME_INPLACE": lt.REDUCTION_INPLACE,
            "CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE": lt.REDUCTION_COMPUTE_TYPE}
    def value(name: str) -> int | None:  # a number, or names OR-ed together (GELU_BIAS = GELU | BIAS)
        m = re.search(rf"\b{re.escape(name)}\s*=\s*([^,\n/]+)", text)
        if m is None:
            return None
        parts = [p.strip(" ()\t") for p in m.group(1).split("|")]
        vals = [int(p, 0) if p[0].isdigit() else value(p) for p in parts]
        return None if None in vals else functools.reduce(operator.or_, vals)

    for name, v in want.items():
        assert value(name) == v, f"{name}: header {value(name)}, module {v}"
    print(f"enum values match {heads[0]}")


def torch_product(s: Shape, x, w, bias, res):
    """The product as FastPi0 calls it."""
    wt = w.t() if s.w_layout == "nk" else w
    if s.epilogue == "gelu_bias":
        return torch._addmm_activation(bias, x, wt, use_gelu=True)
    if s.epilogue == "bias":
        return torch.addmm(bias, x, wt)
    return torch.addmm(res, x, wt) if s.residual else x @ wt


SIGLIP = {"siglip qkv": Shape(512, 1152, 3456, epilogue="bias"), "siglip o": Shape(512, 1152, 1152, epilogue="bias"),
          "siglip fc1": Shape(512, 1152, 4304, epilogue="gelu_bias"),
          "siglip fc2": Shape(512, 4304, 1152, w_layout="kn", epilogue="bias")}


def gemma(m: int) -> dict:
    return {f"lm qkv M={m}": Shape(m, 2048, 2560), f"lm o M={m}": Shape(m, 2048, 2048, residual=True),
            f"lm gate_up M={m}": Shape(m, 2048, 32768), f"lm down M={m}": Shape(m, 16384, 2048, residual=True)}


def measure(name: str, s: Shape, layers: int) -> float:
    """Prints torch's time and the best cuBLASLt algorithms for one product; returns what the
    best correct one would save a pass (us)."""
    x = torch.randn(s.m, s.k, device=dev, dtype=dt)
    ws = [torch.randn(*((s.n, s.k) if s.w_layout == "nk" else (s.k, s.n)), device=dev, dtype=dt) * 0.02
          for _ in range(layers)]
    bias = torch.randn(s.n, device=dev, dtype=dt) if s.epilogue != "none" else None
    res = torch.randn(s.m, s.n, device=dev, dtype=dt) if s.residual else None
    ref = torch_product(s, x, ws[0], bias, res).float()
    t_torch = _time_us(lambda: [torch_product(s, x, w, bias, res) for w in ws], reps=1) / layers
    p = LtProduct(s)
    out = torch.empty(s.m, s.n, device=dev, dtype=dt)
    ws_buf = torch.empty(lt.MAX_WORKSPACE, dtype=torch.uint8, device=dev)
    rows = []
    configs = p.configs(32, search=SEARCH, tiles=TILES)
    if len(configs) > MAX_CONFIGS:
        print(f"  {len(configs)} configurations: timing the first {MAX_CONFIGS}")
    for i, c in enumerate(configs[:MAX_CONFIGS]):
        try:
            p.run(x, ws[0], out, c, ws_buf, bias, res)
            torch.cuda.synchronize()
            err = float((out.float() - ref).abs().max() / ref.abs().max())
            us = _time_us(lambda c=c: [p.run(x, w, out, c, ws_buf, bias, res) for w in ws], reps=1) / layers
        except RuntimeError as e:  # a configuration cuBLASLt lists but that will not run
            print(f"  algo {i}: {e}")
            continue
        rows.append((us, i, err, c.describe()))
    rows.sort(key=lambda r: r[0])
    flops = 2 * s.m * s.k * s.n
    print(f"{name:<18} {s.m}x{s.k}x{s.n} {s.w_layout} {s.epilogue}{' +res' if s.residual else ''}: "
          f"torch {t_torch:6.1f} us ({flops / t_torch / 1e6:4.0f} TFLOP/s); {len(rows)} cuBLASLt algos timed",
          flush=True)
    for us, i, err, d in rows[:4]:
        print(f"    #{i:<2} {us:6.1f} us ({flops / us / 1e6:4.0f} TFLOP/s) err {err:.1e} {d}")
    if not rows or rows[0][0] >= t_torch or rows[0][2] >= 2e-2:
        return 0.0
    gain = (t_torch - rows[0][0]) * layers
    print(f"    best/torch {rows[0][0] / t_torch:.3f}; x{layers} layers: {gain:.0f} us a pass")
    return gain


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    check_header()
    global SEARCH, TILES
    SEARCH, TILES = "--search" in sys.argv, "--tiles" in sys.argv
    rows = [int(a) for a in sys.argv[1:] if a.isdigit()] or [560, 672]
    shapes = {**SIGLIP, **{k: v for m in rows for k, v in gemma(m).items()}}
    if "--siglip" in sys.argv:
        shapes = SIGLIP
    saved = sum(measure(name, s, 27 if name.startswith("siglip") else 18) for name, s in shapes.items())
    print(f"sum of per-pass savings over the shapes above (each M counted): {saved:.0f} us")


if __name__ == "__main__":
    main()
