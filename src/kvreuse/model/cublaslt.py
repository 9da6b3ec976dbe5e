"""cuBLASLt through ctypes, for a product whose fastest cuBLASLt configuration torch does not
reach: torch runs cuBLAS's pick, or cuBLASLt's heuristic's first pick with a default workspace.
For one product shape this lists the heuristic's algorithms (and, with `search`, each with other
split-K counts, reduction schemes and CTA swizzles that cuBLASLt accepts), and runs the product
with one of them on the current stream, capturable in a CUDA graph. FastPi0 times these against
torch's routes for the prefix LM's down product and keeps one only where it is faster and gives
torch's result (docs/PERFORMANCE.md, round 13). GPU only: the library is the libcublasLt that
torch's CUDA library links, found among the process's mapped files.

Row-major y (M, N) = x (M, K) @ W^T (+ bias (N,)) (+ residual (M, N)), W stored (N, K) ("nk", an
nn.Linear weight) or (K, N) ("kn"), is the column-major product y^T = op(W) x^T that cuBLASLt
computes: A = W, B = x, C = residual (beta 1), D = y."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

# cublasLt.h / library_types.h values (scripts/lt_algos.py checks them against the card's header).
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
OP_N, OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
EPILOGUE_DEFAULT, EPILOGUE_BIAS, EPILOGUE_GELU_BIAS = 1, 4, 36
PREF_MAX_WORKSPACE_BYTES = 1
ALGO_CONFIG = {"id": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6}
ALGO_CAP = {"tile_ids": 6, "stages_ids": 13}  # cublasLtMatmulAlgoCapAttributes_t
REDUCTION_INPLACE, REDUCTION_COMPUTE_TYPE = 1, 2
MAX_WORKSPACE = 32 << 20  # bytes a configuration may ask for


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The libcublasLt mapped into this process (torch's CUDA library links it)."""
    global _LIB
    if _LIB is None:
        a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
        (a @ a).sum().item()  # CUDA and its BLAS libraries loaded
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "libcublasLt.so" in ln})
        if not paths:
            raise RuntimeError("cublaslt: no libcublasLt mapped into this process")
        _LIB = ctypes.CDLL(paths[0])
    return _LIB


def available() -> bool:
    """Whether cuBLASLt can be reached here (a CUDA device and its library found)."""
    if not torch.cuda.is_available():
        return False
    try:
        lib()
        return True
    except (OSError, RuntimeError):
        return False


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


@dataclass
class Config:
    """One algorithm configuration for a product shape and the workspace it needs (bytes)."""

    algo: Algo
    workspace: int

    def describe(self) -> dict:
        """Its settings (id, tile, split-K, ...) as cuBLASLt reports them."""
        out = {}
        for name, attr in ALGO_CONFIG.items():
            v, n = ctypes.c_uint32(0), ctypes.c_size_t(0)
            if lib().cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(self.algo), attr, ctypes.byref(v),
                                                          ctypes.sizeof(v), ctypes.byref(n)) == 0:
                out[name] = v.value
        return out


class LtProduct:
    """One product shape's cuBLASLt descriptors: `configs()` lists what may run it, `run`
    computes it with one of them on the current stream."""

    _handle = None

    def __init__(self, shape: Shape):
        self.shape, L = shape, lib()
        if LtProduct._handle is None:
            h = ctypes.c_void_p()
            _ok(L.cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
            LtProduct._handle = h
        s = shape
        self.desc = ctypes.c_void_p()
        _ok(L.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate")
        self._set(DESC_TRANSA, ctypes.c_int32(OP_T if s.w_layout == "nk" else OP_N))
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

    def configs(self, count: int = 32, search: bool = False, tiles: bool = False) -> list[Config]:
        """The heuristic's algorithms for this shape (up to `count`, its best guess first); with
        search, each also at split-K 1-8 (both reduction schemes) and CTA swizzling on and off,
        where cuBLASLt accepts the combination within MAX_WORKSPACE; with tiles, each algorithm
        id listed with every tile shape and stage count it offers (split-K 1 and 2, no swizzle)."""
        L = lib()
        pref = ctypes.c_void_p()
        _ok(L.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        ws = ctypes.c_uint64(MAX_WORKSPACE)
        _ok(L.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws),
                                                    ctypes.sizeof(ws)), "MatmulPreferenceSetAttribute")
        res = (_Heuristic * count)()
        got = ctypes.c_int(0)
        status = L.cublasLtMatmulAlgoGetHeuristic(self._handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                  count, res, ctypes.byref(got))
        L.cublasLtMatmulPreferenceDestroy(pref)
        _ok(status, "MatmulAlgoGetHeuristic")
        found = [Config(res[i].algo, res[i].workspace) for i in range(got.value) if res[i].state == 0]
        if tiles:  # one algorithm per id (the heuristic lists an id several times with other tiles)
            ids = {Config(c.algo, 0).describe().get("id"): c for c in found}
            return [v for c in ids.values() for t in self._retiled(c.algo) for v in self._variants(t, (1, 2), (0,))]
        return [v for c in found for v in self._variants(c.algo)] if search else found

    def _caps(self, algo: Algo, cap: str) -> list[int]:
        """An algorithm's listed ids for one capability (tile shapes, stage counts)."""
        L, n = lib(), ctypes.c_size_t(0)
        if L.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), ALGO_CAP[cap], None, 0, ctypes.byref(n)) != 0:
            return []
        buf = (ctypes.c_uint32 * max(1, n.value // 4))()
        if L.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), ALGO_CAP[cap], buf, ctypes.sizeof(buf),
                                               ctypes.byref(n)) != 0:
            return []
        return list(buf)[: n.value // 4]

    def _retiled(self, algo: Algo) -> list[Algo]:
        """algo with each tile id and stage id it lists (itself where it lists none)."""
        L, out = lib(), []
        for tile in self._caps(algo, "tile_ids") or [None]:
            for stages in self._caps(algo, "stages_ids") or [None]:
                a = Algo()
                ctypes.memmove(ctypes.byref(a), ctypes.byref(algo), ctypes.sizeof(Algo))
                ok = all(L.cublasLtMatmulAlgoConfigSetAttribute(
                    ctypes.byref(a), ALGO_CONFIG[name], ctypes.byref(ctypes.c_uint32(v)), 4) == 0
                    for name, v in (("tile", tile), ("stages", stages)) if v is not None)
                if ok:
                    out.append(a)
        return out

    def _variants(self, algo: Algo, splits=(1, 2, 3, 4, 6, 8), swizzles=(0, 1)) -> list[Config]:
        """algo at each split-K count (both reduction schemes) and swizzle that cuBLASLt accepts."""
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
                            and res.workspace <= MAX_WORKSPACE:
                        out.append(Config(a, res.workspace))
        return out

    def run(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: Config, workspace: torch.Tensor,
            bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """out = x @ W^T (+ bias) (+ residual): bf16, contiguous, on the current device;
        `workspace` a device buffer of at least cfg.workspace bytes, used by nothing else
        meanwhile."""
        s = self.shape
        if not all(t.is_contiguous() for t in (x, w, out)) or (residual is not None and not residual.is_contiguous()):
            raise ValueError("cublaslt: operands must be contiguous")
        if s.epilogue != "none":
            self._set(DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        c = residual if s.residual else out
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _ok(lib().cublasLtMatmul(
            self._handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()), self.a,
            ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta), ctypes.c_void_p(c.data_ptr()), self.d,
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.byref(cfg.algo),
            ctypes.c_void_p(workspace.data_ptr()), ctypes.c_size_t(workspace.numel()), stream), "cublasLtMatmul")
        return out
