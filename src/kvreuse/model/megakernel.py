"""Host side of `cuda/expert_chain.cu`, the persistent CUDA kernel for the action expert's layer
chain (an experiment of round 7, docs/PERFORMANCE.md: correct, slower than the Triton chain, so
FastPi0 does not use it). Optional: built
on demand with nvcc on an sm_90 GPU machine; nothing here runs on CPU machines or in CI, which have
neither. The kernel is loaded with ctypes (plain extern "C" entry points), so no torch headers or
ninja are needed to build it.

Shapes are the Pi0 expert's (width 1024, 8 query heads + 1 K/V head of 256, MLP 4096), batch 1,
<= 64 suffix rows."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

SRC = Path(__file__).with_name("cuda") / "expert_chain.cu"
W, H, D, F = 1024, 8, 256, 4096
SLOT_K, KEYS, ROWS = 512, 48, 64
N_QKV, N_ITEMS = 80, 128


class _Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in (
        "tape", "in_norm", "post_norm", "cosb", "sinb", "bias", "x", "xn", "q", "kc", "vc", "opart", "ml", "ao",
        "act", "bar", "prof")] + [(n, ctypes.c_int) for n in (
        "layers", "steps", "rows", "T", "nsplit", "nkp", "nblocks", "barriers_only")] + [("eps", ctypes.c_float)]


def build(nstage: int = 8, defines: tuple[str, ...] = (), cache: Path | None = None) -> ctypes.CDLL:
    """Compile (once per source and options) and load the kernel library. defines: extra -D
    switches (the timing bounds of scripts/megakernel_ab.py)."""
    src = SRC.read_bytes()
    tag = hashlib.sha1(src + f"nstage={nstage} {defines}".encode()).hexdigest()[:12]
    cache = cache or Path(os.environ.get("KVREUSE_CUDA_CACHE", Path.home() / ".cache" / "kvreuse" / "cuda"))
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"expert_chain_{tag}.so"
    if not lib.exists():
        nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
        tmp = lib.with_suffix(".tmp.so")
        cmd = [str(nvcc), "-O3", "-gencode", "arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC", f"-DNSTAGE={nstage}",
               *(f"-D{d}" for d in defines), "-o", str(tmp), str(SRC)]
        subprocess.run(cmd, check=True)
        tmp.rename(lib)
    dll = ctypes.CDLL(str(lib))
    dll.expert_chain_launch.argtypes = [ctypes.POINTER(_Params), ctypes.c_void_p]
    dll.expert_chain_launch.restype = ctypes.c_int
    return dll


def pack_layer(qkv: torch.Tensor, o: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, pad: int = 8,
               core: bool = False) -> torch.Tensor:
    """One layer's weights (nn.Linear layout: (out, in)) -> its slots in the blocks' consumption
    order (see the .cu file's header): (slots, 16, 512 + pad), the pad columns zero; with core
    (the WGMMA build), each slot as wgmma's 8 x 8 core matrices instead: (slots, 64, 16, 8)."""
    for name, w, shape in (("qkv", qkv, ((H + 2) * D, W)), ("o", o, (W, H * D)), ("gate_up", gate_up, (2 * F, W)),
                           ("down", down, (W, F))):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} weight is {tuple(w.shape)}; this kernel takes Pi0's expert shape {shape}")
    q = qkv.view(H + 2, 2, 8, 16, 2, SLOT_K).permute(0, 2, 4, 1, 3, 5).reshape(N_QKV, 4, 16, SLOT_K)
    wo = o.view(32, 2, 16, 4, SLOT_K).permute(3, 0, 1, 2, 4).reshape(N_ITEMS, 2, 16, SLOT_K)
    gu = gate_up.view(2, N_ITEMS, 2, 16, 2, SLOT_K).permute(1, 4, 0, 2, 3, 5).reshape(N_ITEMS, 8, 16, SLOT_K)
    dn = down.view(16, 4, 16, 8, SLOT_K).permute(3, 0, 1, 2, 4).reshape(N_ITEMS, 4, 16, SLOT_K)
    if core:  # a slot = all 16 G columns of the item x 512 / G inputs, as [inputs / 8][16 G][8]
        q, wo, gu, dn = _core(q, 2), _core(wo, 2), _core(gu, 4), _core(dn, 4)
    per_block = [torch.cat(([q[b]] if b < N_QKV else []) + [wo[b], gu[b], dn[b]]) for b in range(N_ITEMS)]
    slots = torch.cat(per_block)
    if core:
        return slots.contiguous()
    return torch.nn.functional.pad(slots, (0, pad)).contiguous()


def _core(t: torch.Tensor, g: int) -> torch.Tensor:
    """(items, KS x G slots, 16, 512) in (ks, g) order -> the WGMMA build's slots: per ks, G slots
    of (512 / G) / 8 core-matrix columns of 16 G rows x 8 inputs."""
    items, n, _, _ = t.shape
    ks = n // g
    cols = t.view(items, ks, g * 16, SLOT_K)  # the G groups' columns side by side, in group order
    return cols.view(items, ks, g * 16, g, SLOT_K // g // 8, 8).permute(0, 1, 3, 4, 2, 5).reshape(items, n, -1)


@dataclass
class ExpertChain:
    """The expert layer stack (`layers` dicts of qkv / o / gate_up / down weights in nn.Linear
    layout and in_norm / post_norm as (1 + w)) over a [prefix ; suffix] K/V buffer of `prefix`
    rows, for `rows` suffix rows."""

    layers: list[dict]
    prefix: int
    rows: int
    eps: float = 1e-6
    nstage: int = 8
    defines: tuple[str, ...] = ()
    pad: int = 8  # slot row padding (elements), against shared-memory bank conflicts; none with WGMMA

    def __post_init__(self):
        dev = self.layers[0]["qkv"].device
        props = torch.cuda.get_device_properties(dev)
        self.nblocks = props.multi_processor_count
        core = "WGMMA" in self.defines  # wgmma reads unpadded core-matrix slots
        pad = 0 if core else self.pad
        self.lib = build(self.nstage, (*self.defines, f"SLOT_PAD={pad}"))
        self.tape = torch.stack([pack_layer(l["qkv"], l["o"], l["gate_up"], l["down"], pad, core) for l in self.layers])
        self.in_norm = torch.stack([l["in_norm"].float() for l in self.layers]).contiguous()
        self.post_norm = torch.stack([l["post_norm"].float() for l in self.layers]).contiguous()
        keys = self.prefix + self.rows
        self.nsplit = -(-keys // KEYS)
        self.nkp = self.nsplit * KEYS
        if self.nblocks < max(N_ITEMS, H * self.nsplit) or not 0 < self.rows <= ROWS:
            raise ValueError(f"{self.nblocks} SMs, {keys} keys, {self.rows} rows: beyond this kernel's shapes")
        f32, bf = dict(device=dev, dtype=torch.float32), dict(device=dev, dtype=torch.bfloat16)
        n = len(self.layers)
        self.x = torch.zeros(ROWS, W, **f32)
        # Activations tiled [K/16][64 rows][16]; K/V [key/16][D/16][16][16] (see the .cu header).
        self.xn = torch.zeros(W // 16, ROWS, 16, **bf)
        self.q = torch.zeros(H, D // 16, ROWS, 16, **bf)
        self.kc = torch.zeros(n, self.nkp // 16, D // 16, 16, 16, **bf)
        self.vc = torch.zeros_like(self.kc)
        self.opart = torch.zeros(H, self.nsplit, ROWS, D, **f32)
        self.ml = torch.zeros(H, self.nsplit, ROWS, 2, **f32)
        self.ao = torch.zeros(H * D // 16, ROWS, 16, **bf)
        self.act = torch.zeros(F // 16, ROWS, 16, **bf)
        self.bias = torch.full((ROWS, self.nkp), float("-inf"), **f32)
        self.cos = torch.zeros(self.rows, D // 2, **f32)
        self.sin = torch.zeros(self.rows, D // 2, **f32)
        self.bar = torch.zeros(1, device=dev, dtype=torch.int32)

    def set_inputs(self, k_prefix, v_prefix, bias, cos_h, sin_h):
        """k/v_prefix: (layers, prefix, D); bias: (rows, prefix + rows) additive mask; cos_h /
        sin_h: (rows, D/2) rotary tables (as fused_qkv's)."""
        t, r = self.prefix, self.rows
        for buf, src in ((self.kc, k_prefix), (self.vc, v_prefix)):
            rows = torch.zeros(buf.shape[0], self.nkp, D, dtype=buf.dtype, device=buf.device)
            rows[:, :t] = src
            buf.copy_(rows.view(-1, self.nkp // 16, 16, D // 16, 16).transpose(2, 3))
        self.bias.fill_(float("-inf"))
        self.bias[:r, : t + r].copy_(bias)
        self.bias[r:, :t] = 0.0  # padding rows: finite, never read back
        self.cos.copy_(cos_h)
        self.sin.copy_(sin_h)

    def run(self, x: torch.Tensor, steps: int = 1, prof: torch.Tensor | None = None,
            barriers_only: bool = False) -> torch.Tensor:
        """x: (rows, W) input of layer 0 -> the residual stream after steps x layers (float32).
        prof: an int64 (16,) tensor that block 0 adds its clock cycles to: per phase (incl. its
        barrier), then inside the products and the attention (expert_chain.cu's Params). barriers_only: a timing bound that skips every phase (wrong numbers)."""
        self.x.zero_()
        self.x[: self.rows].copy_(x)
        self.bar.zero_()
        p = _Params(*(t.data_ptr() for t in (
            self.tape, self.in_norm, self.post_norm, self.cos, self.sin, self.bias, self.x, self.xn, self.q, self.kc,
            self.vc, self.opart, self.ml, self.ao, self.act, self.bar)), prof.data_ptr() if prof is not None else None,
            len(self.layers), steps, self.rows, self.prefix, self.nsplit, self.nkp, self.nblocks, int(barriers_only),
            self.eps)
        err = self.lib.expert_chain_launch(ctypes.byref(p), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if err:
            raise RuntimeError(f"expert_chain launch failed: cudaError {err}")
        return self.x[: self.rows]
