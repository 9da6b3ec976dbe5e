"""cuBLASLt through ctypes: the heuristic's list of algorithms for one product shape, and the
product run with a chosen one. torch reaches cuBLASLt only through its default pick per shape
(round 11-12 measured that pick); this lists the others so that a shape's fastest can be timed
and kept (scripts/lt_algos.py). GPU only; the library is the libcublasLt torch itself loaded.

Row-major y (M, N) = x (M, K) @ W^T (+ bias (N,)) (+ residual (M, N)), W stored (N, K) ("nk", an
nn.Linear weight) or (K, N) ("kn"), is the column-major product y^T = op(W) x^T that cuBLASLt
computes: A = W, B = x, C = residual (beta 1), D = y."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

# cublasLt.h / library_types.h values (scripts/lt_algos.py checks them against the header).
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
OP_N, OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
EPILOGUE_DEFAULT, EPILOGUE_BIAS, EPILOGUE_GELU_BIAS = 1, 4, 36
PREF_MAX_WORKSPACE_BYTES = 1
ALGO_CONFIG = {"id": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6}
REDUCTION_INPLACE, REDUCTION_COMPUTE_TYPE = 1, 2
WORKSPACE = 32 << 20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _loaded_lib() -> ctypes.CDLL:
    """The libcublasLt mapped into this process by torch's CUDA library (which links it)."""
    a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    with open("/proc/self/maps") as f:
        paths = sorted({ln.split()[-1] for ln in f if "libcublasLt.so" in ln})
    if not paths:
        raise RuntimeError("cublaslt: torch has not loaded libcublasLt")
    return ctypes.CDLL(paths[0])


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _loaded_lib()
    return _LIB


def _ok(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cublaslt: {what} returned status {status}")


@dataclass(frozen=True)
class Shape:
    m: int
    k: int
    n: int
    w_layout: str = "nk"  # "nk": W is (N, K); "kn": (K, N)
    epilogue: str = "none"  # "none" | "bias" | "gelu_bias" (tanh GELU after the bias)
    residual: bool = False  # + an (M, N) residual (C, beta 1)


class LtProduct:
    """One product shape's descriptors; `algos()` lists the heuristic's choices, `run` computes
    with one of them on the current stream (capturable in a CUDA graph: fixed workspace)."""

    _handle = None
    _workspace: torch.Tensor | None = None

    def __init__(self, shape: Shape):
        self.shape, L = shape, lib()
        if LtProduct._handle is None:
            h = ctypes.c_void_p()
            _ok(L.cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
            LtProduct._handle = h
            LtProduct._workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
        s = shape
        self.desc = ctypes.c_void_p()
        _ok(L.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate")
        ta = ctypes.c_int32(OP_T if s.w_layout == "nk" else OP_N)
        self._set(DESC_TRANSA, ta)
        self._set(DESC_TRANSB, ctypes.c_int32(OP_N))
        epi = {"none": EPILOGUE_DEFAULT, "bias": EPILOGUE_BIAS, "gelu_bias": EPILOGUE_GELU_BIAS}[s.epilogue]
        self._set(DESC_EPILOGUE, ctypes.c_int32(epi))
        a_rows, a_cols = (s.k, s.n) if s.w_layout == "nk" else (s.n, s.k)
        self.a = self._layout(a_rows, a_cols)
        self.b = self._layout(s.k, s.m)
        self.d = self._layout(s.n, s.m)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(1.0 if s.residual else 0.0)

    def _set(self, attr: int, value) -> None:
        _ok(lib().cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
            f"MatmulDescSetAttribute({attr})")

    @staticmethod
    def _layout(rows: int, cols: int) -> ctypes.c_void_p:
        lay = ctypes.c_void_p()
        _ok(lib().cublasLtMatrixLayoutCreate(ctypes.byref(lay), CUDA_R_16BF, ctypes.c_uint64(rows),
                                             ctypes.c_uint64(cols), ctypes.c_int64(rows)), "MatrixLayoutCreate")
        return lay

    def algos(self, count: int = 32) -> list[Algo]:
        """Up to `count` algorithms the heuristic offers for this shape, its best guess first."""
        L = lib()
        pref = ctypes.c_void_p()
        _ok(L.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        ws = ctypes.c_uint64(WORKSPACE)
        _ok(L.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws),
                                                    ctypes.sizeof(ws)), "MatmulPreferenceSetAttribute")
        res = (_Heuristic * count)()
        got = ctypes.c_int(0)
        _ok(L.cublasLtMatmulAlgoGetHeuristic(self._handle, self.desc, self.a, self.b, self.d, self.d, pref, count,
                                            res, ctypes.byref(got)), "MatmulAlgoGetHeuristic")
        L.cublasLtMatmulPreferenceDestroy(pref)
        return [res[i].algo for i in range(got.value) if res[i].state == 0]

    def variants(self, algo: Algo, splits=(1, 2, 3, 4, 6, 8), swizzles=(0, 1)) -> list[Algo]:
        """`algo` with other split-K counts (each reduction scheme), CTA swizzles: the copies
        cuBLASLt accepts for this shape (cublasLtMatmulAlgoCheck) within the workspace."""
        L, out = lib(), []
        for k in splits:
            for red in ((0,) if k == 1 else (REDUCTION_INPLACE, REDUCTION_COMPUTE_TYPE)):
                for sw in swizzles:
                    a = Algo()
                    ctypes.memmove(ctypes.byref(a), ctypes.byref(algo), ctypes.sizeof(Algo))
                    ok = all(L.cublasLtMatmulAlgoConfigSetAttribute(
                        ctypes.byref(a), ALGO_CONFIG[name], ctypes.byref(ctypes.c_uint32(v)), 4) == 0
                        for name, v in (("splitk", k), ("reduction", red), ("swizzle", sw)))
                    res = _Heuristic()
                    if ok and L.cublasLtMatmulAlgoCheck(self._handle, self.desc, self.a, self.b, self.d, self.d,
                                                        ctypes.byref(a), ctypes.byref(res)) == 0 \
                            and res.workspace <= WORKSPACE:
                        out.append(a)
        return out

    @staticmethod
    def describe(algo: Algo) -> dict:
        """The algorithm's configuration (id, tile, split-K, ...) as cuBLASLt reports it."""
        out = {}
        for name, attr in ALGO_CONFIG.items():
            v, n = ctypes.c_uint32(0), ctypes.c_size_t(0)
            if lib().cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                          ctypes.sizeof(v), ctypes.byref(n)) == 0:
                out[name] = v.value
        return out

    def run(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, algo: Algo,
            bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """out = x @ W^T (+ bias) (+ residual); all bf16, contiguous, on the current device."""
        s = self.shape
        if s.epilogue != "none":
            self._set(DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        c = residual if s.residual else out
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _ok(lib().cublasLtMatmul(
            self._handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()), self.a,
            ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta), ctypes.c_void_p(c.data_ptr()), self.d,
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.byref(algo),
            ctypes.c_void_p(self._workspace.data_ptr()), ctypes.c_size_t(WORKSPACE), stream), "cublasLtMatmul")
        return out
