"""Fast inference runtime for Pi0 / Pi0.5, built beside the eager model (which stays untouched).

`FastPi0(model)` reads the eager `Pi0Model`'s weights once and keeps:
- fused weights (QKV and gate/up of every layer as new tensors; (1 + w) of every RMSNorm),
- per batch size, static buffers: one K/V buffer per layer with room for [prefix ; suffix], so
  the action tokens attend over both through one SDPA call and nothing is concatenated,
- time-conditioning tables: the flow-matching times of the Euler steps are fixed, so everything
  that depends on t alone (Pi0's time half of action_time_mlp_in, Pi0.5's whole adaptive-RMSNorm
  conditioning of every layer) is computed once per step count, not per call,
- on CUDA, one CUDA graph per shape for the vision tower, the prefix LM, the denoise loop (all
  Euler steps), prefix + denoise for sample_actions (Euler step 0 on a second stream, each expert
  layer starting once the prefix's layer has written its K/V) and each reuse update; optionally the layer functions go through torch.compile
  (inductor fuses the elementwise work between the matmuls),
- the prompt computed only up to its last valid token, rounded up to a bucket of slots
  (`prefix_rows`), and, on CUDA, the prefix LM's down product through whichever of cuBLAS,
  torch's cuBLASLt pick (over rows padded to 128) and cuBLASLt's other configurations
  (`kvreuse.model.cublaslt`) timed fastest for that row count (`_down_rows`),
- on CUDA with Triton: Triton attention (prefix and expert), the expert layer as a chain of Triton
  kernels with programmatic dependent launch on sm_90 (`expert_gemm="chain"`; since round 5 each
  Euler step's projections and update too, so the whole denoise is one chain), SigLIP's residual
  adds + LayerNorms as one kernel each (docs/PERFORMANCE.md, rounds 4-5), the prefix LM's rotary
  and K/V write as one kernel (`rope_scatter`, round 14); under compile, the prefix LM's residual
  adds inside its norm kernels (`_norm_qkv`, round 14).

The API matches `Pi0Model` (encode_prefix / denoise / sample_actions / sample_with_prefix /
update_prefix / update_prefix_layers) and the caches are ordinary `PrefixCache`s (their masked
rows past the prompt's bucket aside, which the eager model fills): encode_prefix returns copies
the caller owns, denoise copies the prefix K/V into its buffer once per call (never per Euler
step) and never writes the caller's cache. Everything else is delegated to the eager model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache import PrefixCache, Span, new_snapshot_id
from ..observation import Observation, upload, version
from . import cublaslt
from .graphs import Graphs
from .kernels import HAVE_TRITON, mqa_attention, pdl_supported
from .layer_norm import add_layer_norm, add_layer_norm_reference
from .layers import NEG_INF, sincos_time
from .pi0 import Pi0Model, check_keep_hidden
from .rope_scatter import rope_scatter
from .skinny_gemm import MAX_M, SKINNY_ROWS, RowNorm, fused_qkv, skinny_linear
from .vision_trt import TrtVision


# ---- fused weights ------------------------------------------------------------------------------
@dataclass
class _GemmaW:
    in_norm: torch.Tensor | None  # (1 + w), or None for adaptive norms (Pi0.5 expert)
    qkv: torch.Tensor  # ((H + 2 Hkv) D, W)
    o_t: torch.Tensor  # (H D, W) = o.weight.T (a view)
    post_norm: torch.Tensor | None
    gate_up: torch.Tensor  # (2 M, W)
    down_t: torch.Tensor  # (M, W)


@dataclass
class _SiglipW:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    o_w: torch.Tensor
    o_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_t: torch.Tensor  # (MLP, W): fc2.weight.T as a contiguous copy (see _fuse_siglip)
    fc2_b: torch.Tensor


def _one_plus(norm) -> torch.Tensor | None:
    return None if norm.weight is None else (1.0 + norm.weight.float()).to(norm.weight.dtype)


def _fuse_gemma(stack) -> list[_GemmaW]:
    out = []
    for layer in stack.layers:
        out.append(
            _GemmaW(
                in_norm=_one_plus(layer.in_norm),
                qkv=torch.cat([layer.q.weight, layer.k.weight, layer.v.weight]).contiguous(),
                o_t=layer.o.weight.t(),
                post_norm=_one_plus(layer.post_norm),
                gate_up=torch.cat([layer.gate.weight, layer.up.weight]).contiguous(),
                down_t=layer.down.weight.t(),
            )
        )
    return out


def _fuse_siglip(vision) -> list[_SiglipW]:
    # fc2 (K = 4304 -> N = 1152) as x @ W^T with W^T laid out (K, N): cuBLAS picks a better kernel
    # for that layout, 13.4 vs 17.8 us per layer on an H100 (scripts/gemm_shapes.py, round 11).
    return [
        _SiglipW(
            l.ln1.weight, l.ln1.bias,
            torch.cat([l.q.weight, l.k.weight, l.v.weight]).contiguous(),
            torch.cat([l.q.bias, l.k.bias, l.v.bias]).contiguous(),
            l.o.weight, l.o.bias, l.ln2.weight, l.ln2.bias, l.fc1.weight, l.fc1.bias,
            l.fc2.weight.t().contiguous(), l.fc2.bias,
        )
        for l in vision.layers
    ]


# ---- layer functions (tensors in, tensors out: one torch.compile serves every layer) ------------
def _siglip_layer(x, y, ln1_w, ln1_b, qkv_w, qkv_b, o_w, o_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_t, fc2_b,
                  heads: int, eps: float, fused_ln: bool = False, gelu_epilogue: bool = False):
    """One SigLIP layer over x + y, where y is the previous layer's MLP output whose residual add
    is still pending (None for the first layer); returns (x', y') summing to the layer's output,
    so that every residual add meets the LayerNorm after it: fused_ln does both in one Triton
    kernel (layer_norm.add_layer_norm), else torch ops. gelu_epilogue (CUDA only): fc1's bias and
    GELU in cuBLASLt's epilogue, which is tanh GELU on CUDA (torch's own decomposition of
    _addmm_activation says so) but erf GELU on the CPU, hence not used there. (The attention
    through kernels.mqa_attention instead of PyTorch's pick, cuDNN, ran slower: round 13.)"""
    add_ln = _add_ln(fused_ln)
    n, p, w = x.shape
    x, h = add_ln(x, y, ln1_w, ln1_b, eps)
    q, k, v = F.linear(h, qkv_w, qkv_b).view(n, p, 3, heads, w // heads).unbind(2)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    x, h = add_ln(x, F.linear(a.transpose(1, 2).reshape(n, p, w), o_w, o_b), ln2_w, ln2_b, eps)
    if gelu_epilogue:
        a = torch._addmm_activation(fc1_b, h.reshape(n * p, w), fc1_w.t(), use_gelu=True)
    else:
        a = F.gelu(F.linear(h, fc1_w, fc1_b), approximate="tanh").view(n * p, -1)
    return x, torch.addmm(fc2_b, a, fc2_t).view(n, p, w)


def _add_ln(fused: bool):
    """SigLIP's residual add + LayerNorm: the Triton kernel or the same in torch ops."""
    return add_layer_norm if fused else add_layer_norm_reference


def _rope_tables(positions: torch.Tensor, d: int, base: float):
    """(B, S) positions -> float32 (B, S, 1, D) cos and signed sin in the rotate-half layout, so
    rope(x) = x * cos + roll(x, D/2) * sin (the eager `rope` computes the same in float32)."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d)
    ang = positions.float()[..., None] * inv
    c, s = ang.cos(), ang.sin()
    return torch.cat([c, c], -1)[:, :, None], torch.cat([-s, s], -1)[:, :, None]


def _half_tables(cos, sin):
    """(B, S, 1, D) rotate-half tables -> the Triton kernels' (B * S, D/2) cos and sin."""
    half = cos.shape[-1] // 2
    return cos[:, :, 0, :half].reshape(-1, half).contiguous(), sin[:, :, 0, half:].reshape(-1, half).contiguous()


def _prefix_tables(valid, positions, d: int, base: float, half: bool, bias_dtype: torch.dtype):
    """A prefix-LM pass's rotary tables (half: the Triton kernels' layout) and its padding mask
    as one (B, T) additive vector over the keys. Small ops that compile fuses into a few kernels
    (eager they are ~15 launches at the start of every prefix graph)."""
    cos, sin = _rope_tables(positions, d, base)
    if half:
        cos, sin = _half_tables(cos, sin)
    return cos, sin, torch.zeros(valid.shape, dtype=bias_dtype, device=valid.device).masked_fill(~valid, NEG_INF)


def _expert_tables(valid, s: int, g: int, d: int, base: float, state_sees_actions: bool, half: bool,
                   bias_dtype: torch.dtype):
    """A denoise's rotary tables for the s suffix rows after the valid prefix (half: also the
    Triton kernels' layout) and the [prefix ; suffix] mask, (B, 1, s * g, T + s) with rows in
    (token, head) order; Pi0's state token (state_sees_actions False) sees the prefix and itself
    only. Compile fuses these ~25 small ops (a reuse hit's graph starts with them)."""
    b, t = valid.shape
    pos = valid.sum(-1, keepdim=True) + torch.arange(s, device=valid.device)[None]
    cos, sin = _rope_tables(pos, d, base)
    cos_h, sin_h = _half_tables(cos, sin) if half else (None, None)
    seen = torch.ones(s, s, dtype=torch.bool, device=valid.device)
    if not state_sees_actions:
        seen[0, 1:] = False
    bias = torch.zeros(b, s, t + s, dtype=bias_dtype, device=valid.device)
    bias[:, :, :t].masked_fill_(~valid[:, None, :], NEG_INF)
    bias[:, :, t:].masked_fill_(~seen[None], NEG_INF)
    return cos, sin, cos_h, sin_h, bias[:, :, None].expand(b, s, g, t + s).reshape(b, 1, s * g, t + s)


# Expert products: cuBLAS; fused Triton QKV / MLP-in (+ Triton residual products); "chain": the
# whole layer as Triton kernels with the norms in the residual products' reduce kernels.
GEMM_KINDS = ("torch", "fused", "triton", "chain")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
ATTN_KINDS = ("sdpa", "fp32", "math", "efficient", "cudnn", "triton")


def _mqa(q, k, v, bias, kind: str = "sdpa"):
    """q (B, R, H, D); k, v (B, T, Hkv, D) (strided views of the cache buffer are fine);
    bias (B, 1, R*g, T) additive, rows in (token, head-in-group) order. The query heads of a
    KV group are folded into the query axis, a free view for Pi0's single KV head.

    kind: "sdpa" lets PyTorch pick the kernel; "math" / "efficient" / "cudnn" force one;
    "fp32" is two float32 batched matmuls around a softmax (what the eager expert does): with
    only a few hundred queries and one KV head the fused kernels get a handful of thread
    blocks, while the matmuls spread over the whole GPU. "triton" is kernels.mqa_attention (split
    over the keys for the same reason; bf16 products, fp32 softmax; one or two kernels)."""
    b, r, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    if kind == "triton":
        return mqa_attention(q, k, v, bias[:, 0, ::g])  # the mask depends on the token, not the head
    qh = q.view(b, r, hkv, g, d).transpose(1, 2).reshape(b, hkv, r * g, d)
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)
    if kind == "fp32":
        s = torch.baddbmm(
            bias.float().expand(b, hkv, r * g, -1).reshape(b * hkv, r * g, -1),
            qh.reshape(b * hkv, r * g, d).float(),
            kh.float().reshape(b * hkv, -1, d).transpose(1, 2),
            alpha=1.0 / math.sqrt(d),
        )
        o = torch.bmm(torch.softmax(s, -1), vh.float().reshape(b * hkv, -1, d)).to(q.dtype)
    elif kind == "sdpa":
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
    return o.reshape(b, hkv, r, g, d).transpose(1, 2).reshape(b, r, h * d)


def resolve_attn(kind: str, device: torch.device, expert: bool) -> str:
    """"auto" -> what measured fastest (docs/PERFORMANCE.md): the Triton kernel on a CUDA GPU when
    Triton is installed (prefix LM since round 4: 20.7 vs 50 us a layer on an H200), else fp32
    matmuls for the action expert and SDPA for the prefix."""
    if kind != "auto":
        return kind
    if device.type == "cuda" and HAVE_TRITON:
        return "triton"
    return "fp32" if expert else "sdpa"


def _check_gpu_only(device: torch.device, **opts) -> None:
    """Options only a CUDA GPU runs, refused for a model elsewhere: each failed mid-call, deep in a
    kernel launch ("0 active drivers", "No viable backend"). The Triton ones run on Triton's CPU
    interpreter (TRITON_INTERPRET=1, as the tests do)."""
    if device.type == "cuda":
        return
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    bad = [f"{n}={v!r}" for n, v in opts.items()
           if (n.endswith("_attn") and (v in ("cudnn", "efficient") or (v == "triton" and not interp)))
           or (n == "expert_gemm" and v not in ("auto", "torch") and not interp)
           or (n == "lm_down_tune" and v)
           or (n in ("fused_layer_norm", "rope_kernel") and v and not interp)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: need the model on a CUDA GPU (it is on {device})")


def resolve_gemm(kind: str, device: torch.device) -> str:
    """"auto" -> what measured fastest (docs/PERFORMANCE.md, round 4, H200): the all-Triton
    "chain" expert on a CUDA GPU with Triton, Pi0 and Pi0.5, compiled or not (Pi0 denoise 7.5 ms
    vs 8.8 for round 3's "triton"; Pi0.5 8.0 vs 9.2; round 3's cuBLAS exception for Pi0.5 under
    compile no longer wins); else cuBLAS ("torch")."""
    if kind != "auto":
        return kind
    return "chain" if device.type == "cuda" and HAVE_TRITON else "torch"


def _ada_norm(x, eps: float, scale1p, shift):
    return torch.addcmul(shift, F.rms_norm(x, (x.shape[-1],), None, eps), scale1p)


def _norm(x, weight, eps: float, scale1p=None, shift=None):
    """Gemma's RMSNorm with its (1 + w) weight, or Pi0.5's adaptive one when scale1p is given."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps) if scale1p is None else _ada_norm(x, eps, scale1p, shift)


def _gemma_qkv(x, in_norm, qkv_w, cos, sin, k_buf, v_buf, start: int, idx, heads: int, kv_heads: int, eps: float,
               scale1p=None, shift=None):
    """Norm, fused QKV, rotary on q and k together; k, v written into the cache buffer rows
    [start, start + R) or, with `idx`, the rows idx. Returns rotated q (B, R, H, D).
    (Writes go through the one buffer argument: aliased buffer arguments would confuse compile.)"""
    return _rope_write(F.linear(_norm(x, in_norm, eps, scale1p, shift), qkv_w), cos, sin, k_buf, v_buf, start, idx,
                       heads, kv_heads)


def _rope_write(qkv, cos, sin, k_buf, v_buf, start: int, idx, heads: int, kv_heads: int):
    """_gemma_qkv after its product: rotary on q and k, k and v into the cache buffer rows."""
    b, r, _ = qkv.shape
    d = k_buf.shape[-1]
    qk = qkv[..., : (heads + kv_heads) * d].view(b, r, heads + kv_heads, d)
    qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin).to(qkv.dtype)
    k = qk[:, :, heads:]
    v = qkv[..., (heads + kv_heads) * d :].view(b, r, kv_heads, d)
    if idx is None:
        k_buf[:, start : start + r].copy_(k)
        v_buf[:, start : start + r].copy_(v)
    else:
        k_buf.index_copy_(1, idx, k)
        v_buf.index_copy_(1, idx, v)
    return qk[:, :, :heads]


def _norm_qkv(x, y, in_norm, qkv_w, eps: float):
    """The prefix LM's layer input x + y (y: the previous layer's down product, whose residual
    add is still pending, or None), its norm and the fused QKV product: returns (x + y, qkv).
    Under compile the add, the norm and the sum's store are one kernel; the rotary and K/V write
    follow as rope_scatter (one Triton kernel instead of the three compile makes of them) or
    _rope_write."""
    if y is not None:
        x = x + y
    return x, F.linear(_norm(x, in_norm, eps), qkv_w)


def _flat(gate):
    """Pi0.5's (1, 1, W) gate / tables as the kernels' (W,) column vector."""
    return None if gate is None else gate.reshape(-1)


def _residual_product(x, a, w_t, gate, gemm: str = "torch"):
    """x + a @ w_t, or Pi0.5's gated x + gate * (a @ w_t); w_t (K, N). gemm="triton": one
    skinny_linear with the gate and the residual in its epilogue; else cuBLAS (addmm carries the
    plain residual in its epilogue)."""
    if gemm == "triton":
        return skinny_linear(a, w_t, residual=x, col_scale=_flat(gate))
    if gate is not None:
        return torch.addcmul(x, a @ w_t, gate)
    return torch.addmm(x.reshape(-1, x.shape[-1]), a.reshape(-1, a.shape[-1]), w_t).view(x.shape)


def _gemma_act(x, attn, o_t, post_norm, gate_up, eps: float, gate1=None, scale1p=None, shift=None, rows: int = 0,
               add_after: bool = False):
    """Output projection + residual, norm, gate/up and gated GELU: returns (x, the down product's
    input). With rows, that input comes flat as (rows, M), zero rows after x's (see _lt_residual).
    add_after (the prefix LM): the residual added after the product, not in it, so that under
    compile the add, the norm and the sum's store are one kernel (as addmm, cuBLAS first copies
    the residual into its output: a copy and a launch per layer)."""
    x = x + attn @ o_t if add_after else _residual_product(x, attn, o_t, gate1)  # (the prefix has no gates)
    h = _norm(x, post_norm, eps, scale1p, shift)
    m = gate_up.shape[0] // 2
    gu = F.linear(h, gate_up)
    act = F.gelu(gu[..., :m], approximate="tanh") * gu[..., m:]
    if rows:  # under compile the padding is written by the same kernel as the GELU
        act = F.pad(act.reshape(-1, m), (0, 0, 0, rows - x.shape[0] * x.shape[1]))
    return x, act


def _gemma_finish(x, attn, o_t, post_norm, gate_up, down_t, eps: float, gate1=None, scale1p=None, shift=None, gate2=None):
    """Output projection + residual, gated GELU MLP + residual (Pi0.5: gated residuals)."""
    x, act = _gemma_act(x, attn, o_t, post_norm, gate_up, eps, gate1, scale1p, shift)
    return _residual_product(x, act, down_t, gate2)


def _lm_rest(x, q, o_t, post_norm, gate_up, down_t, bias, k_buf, v_buf, eps: float, attn: str = "sdpa"):
    """A prefix-LM layer after its K/V were written: attention over k_buf / v_buf (this layer's
    (B, T, Hkv, D) prefix K/V), output projection, MLP. Apart from the QKV part so that other
    work can start once the K/V are written (FastPi0._sample_body). Returns (x, y): the layer's
    output is x + y, the add left to the next layer's norm kernel (_norm_qkv)."""
    x, act = _gemma_act(x, _mqa(q, k_buf, v_buf, bias, attn), o_t, post_norm, gate_up, eps, add_after=True)
    return x, act @ down_t


def _lm_act(x, q, o_t, post_norm, gate_up, bias, k_buf, v_buf, eps: float, attn: str, rows: int):
    """`_lm_rest` up to the down product, whose input comes padded to `rows` (see _lt_residual)."""
    return _gemma_act(x, _mqa(q, k_buf, v_buf, bias, attn), o_t, post_norm, gate_up, eps, rows=rows, add_after=True)


def _lt_residual(x, act, down_t, zero):
    """act @ down_t shaped as x (the residual add is left to the next layer's norm kernel), act
    (rows >= x's rows, M) flat and zero-padded. The zero (N,) bias makes
    torch run the product through cuBLASLt's bias epilogue, whatever BLAS library is preferred:
    for some row counts its kernel is much faster than cuBLAS's pick (Pi0.5's 712 rows on an H100:
    ~78 us over 768 padded rows vs ~110; scripts/gemm_shapes.py, round 12). Never compiled:
    inductor may split a bias addmm into a product and an add, which would lose that route."""
    m = x.shape[0] * x.shape[1]
    return torch.addmm(zero, act, down_t)[:m].view(x.shape)


def _median_ms(fn, reps: int = 7) -> float:
    """Median CUDA-event time of fn after one warm-up call (the bench's timer)."""
    from ..bench import time_fn  # (bench imports this module lazily too)

    return time_fn(fn, reps, 1, "cuda").median


def _expert_layer(x, in_norm, qkv_w, o_t, post_norm, gate_up, down_t, cos, sin, bias, k_buf, v_buf, start: int,
                  heads: int, kv_heads: int, eps: float, cond=None, attn: str = "sdpa"):
    """One action-expert layer: k/v of the suffix go into their rows after the prefix (from
    `start`), then the suffix attends over the whole [prefix ; suffix] buffer. `cond` = Pi0.5's
    per-step (scale1p, shift, gate) x 2 for this layer."""
    if cond is None:
        q = _gemma_qkv(x, in_norm, qkv_w, cos, sin, k_buf, v_buf, start, None, heads, kv_heads, eps)
        return _gemma_finish(x, _mqa(q, k_buf, v_buf, bias, attn), o_t, post_norm, gate_up, down_t, eps)
    s1, b1, g1, s2, b2, g2 = cond
    q = _gemma_qkv(x, None, qkv_w, cos, sin, k_buf, v_buf, start, None, heads, kv_heads, eps, s1, b1)
    return _gemma_finish(x, _mqa(q, k_buf, v_buf, bias, attn), o_t, None, gate_up, down_t, eps, g1, s2, b2, g2)


def _expert_layer_fused(x, in_norm, qkv_w, o_t, post_norm, gate_up, down_t, cos_h, sin_h, bias, k_buf, v_buf,
                        start: int, heads: int, kv_heads: int, eps: float, cond=None, attn: str = "triton",
                        gemm: str = "fused"):
    """The same layer for few rows (skinny_gemm.MAX_M) in fewer kernels, same arguments as
    _expert_layer but (rows, D/2) rotary tables: after each norm, QKV + rotary + K/V write in one
    kernel (fused_qkv) and gate/up + gated GELU in another. The residual products go through
    cuBLAS ("fused") or skinny_linear ("triton")."""
    s1, b1, g1, s2, b2, g2 = (None,) * 6 if cond is None else cond
    q = fused_qkv(_norm(x, in_norm, eps, s1, b1), qkv_w.t(), k_buf, v_buf, start, cos_h, sin_h, heads, kv_heads)
    x = _residual_product(x, _mqa(q, k_buf, v_buf, bias, attn), o_t, g1, gemm)
    act = skinny_linear(_norm(x, post_norm, eps, s2, b2), gate_up.t(), gated_gelu=True)
    return _residual_product(x, act, down_t, g2, gemm)


def _expert_layer_chain(x, xn, qkv_w, o_t, post_norm, gate_up, down_t, cos_h, sin_h, bias, k_buf, v_buf,
                        start: int, heads: int, kv_heads: int, eps: float, cond=None, next_norm: RowNorm | None = None,
                        pdl: bool = False):
    """The fused layer as 8 Triton kernels and no torch op: takes the input x and its normed copy
    xn (this layer's input norm already applied) and returns (output, output under `next_norm`:
    the next layer's input norm or the final one). Both norms come out of the residual products'
    reduce kernels. With pdl, each kernel's launch and weight prefetch overlap the previous
    kernel (a torch op in between would serialise them again)."""
    _, _, g1, s2, b2, g2 = (None,) * 6 if cond is None else cond
    q = fused_qkv(xn, qkv_w.t(), k_buf, v_buf, start, cos_h, sin_h, heads, kv_heads, pdl=pdl)
    attn = mqa_attention(q, k_buf, v_buf, bias[:, 0, :: heads // kv_heads], pdl=pdl)
    x, h = skinny_linear(attn, o_t, residual=x, col_scale=_flat(g1), norm=RowNorm(eps, post_norm, s2, b2), pdl=pdl)
    act = skinny_linear(h, gate_up.t(), gated_gelu=True, pdl=pdl)
    return skinny_linear(act, down_t, residual=x, col_scale=_flat(g2), norm=next_norm, pdl=pdl)


# ---- static buffers and graphs -------------------------------------------------------------------
class _Static:
    """Buffers for one batch size. Graphs read and write these; nothing outside FastPi0 sees them."""

    def __init__(self, cfg, b: int, dtype, device):
        c, lm = cfg, cfg.llm
        n, t, s = len(c.cameras), c.prefix_len, c.suffix_len
        size = c.vision.image_size
        kw = dict(device=device)
        self.images = torch.zeros(n * b, 3, size, size, dtype=dtype, **kw)  # camera-major
        self.image_masks = torch.ones(b, n, dtype=torch.bool, **kw)
        self.tokens = torch.zeros(b, c.max_token_len, dtype=torch.long, **kw)
        self.token_mask = torch.ones(b, c.max_token_len, dtype=torch.bool, **kw)
        self.embeds = torch.zeros(b, t, lm.width, dtype=dtype, **kw)
        self.old_embeds = torch.zeros(b, t, lm.width, dtype=dtype, **kw)  # layer-wise input
        self.hidden_in = torch.zeros(b, t, lm.width, dtype=dtype, **kw)
        self.valid = torch.ones(b, t, dtype=torch.bool, **kw)
        self.positions = torch.zeros(b, t, dtype=torch.long, **kw)
        self.k = torch.zeros(lm.depth, b, t + s, lm.num_kv_heads, lm.head_dim, dtype=dtype, **kw)
        self.v = torch.zeros_like(self.k)
        self.hidden: dict[int, torch.Tensor] = {}
        self.state = torch.zeros(b, c.max_state_dim, **kw)
        self.noise = torch.zeros(b, c.chunk_size, c.max_action_dim, **kw)
        self.idx: dict[int, torch.Tensor] = {}  # bucket size -> token indices to recompute

    def hidden_buf(self, layer: int) -> torch.Tensor:
        if layer not in self.hidden:
            self.hidden[layer] = torch.zeros_like(self.embeds)
        return self.hidden[layer]


def _bucket(r: int, total: int) -> int:
    """Recompute counts are padded up to a few sizes so partial updates reuse captured graphs."""
    return min(total, max(64, 1 << (r - 1).bit_length())) if r > 0 else 0


class _LtDown:
    """The prefix LM's down product with its residual, x + act @ down_t, through one cuBLASLt
    configuration that torch does not reach (kvreuse.model.cublaslt): on an H100, Pi0's 560 rows
    at split-K 2 reduced in place took 59 us against cuBLAS's 68 (round 13). act: (>= m, M) flat,
    its first m rows used; x (B, R, W) with B * R = m. `workspace`: a device buffer of at least
    cfg.workspace bytes (the candidates share one while they are timed; own() gives the kept
    route a buffer of its own)."""

    def __init__(self, prod, cfg, workspace: torch.Tensor):
        self.prod, self.cfg, self.workspace = prod, cfg, workspace

    def own(self) -> "_LtDown":
        self.workspace = torch.empty(max(self.cfg.workspace, 1), dtype=torch.uint8, device=self.workspace.device)
        return self

    def __call__(self, x, act, down_t):
        m = x.shape[0] * x.shape[1]
        out = torch.empty_like(x)
        self.prod.run(act[:m], down_t.t(), out.view(m, -1), self.cfg, self.workspace, residual=x.reshape(m, -1))
        return out

    def __repr__(self) -> str:
        return f"cuBLASLt {self.cfg.describe()}"

    @staticmethod
    def candidates(x, act, down_t) -> list["_LtDown"]:
        """Every configuration cuBLASLt offers for this product (its heuristic's, each with other
        split-K counts and swizzles) that computes what torch does here: none where cuBLASLt
        cannot be reached."""
        if not cublaslt.available():
            return []
        m, (k, n) = x.shape[0] * x.shape[1], down_t.shape
        try:
            prod = cublaslt.LtProduct(cublaslt.Shape(m, k, n, residual=True))
            configs = prod.configs(search=True)
        except RuntimeError:  # a library that refuses the shape or the descriptors: torch's routes only
            return []
        ref = _residual_product(x, act[None], down_t, None).float()
        scratch = torch.empty(cublaslt.MAX_WORKSPACE, dtype=torch.uint8, device=x.device)
        out = []
        for cfg in configs:
            lt = _LtDown(prod, cfg, scratch)
            try:
                got = lt(x, act, down_t).float()
            except RuntimeError:
                continue
            if float((got - ref).abs().max()) <= 1e-2 * float(ref.abs().max()):
                out.append(lt)
        return out


class FastPi0:
    """Fast drop-in for `Pi0Model` at inference (see the module docstring)."""

    def __init__(
        self,
        model: Pi0Model,
        *,
        graphs: bool | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        expert_gemm: str = "auto",
        expert_pdl: bool | None = None,
        fused_layer_norm: bool | None = None,
        prefix_attn: str = "auto",
        expert_attn: str = "auto",
        vision_trt: bool = False,
        overlap: bool = True,
        prompt_bucket: int | None = None,
        lm_down_tune: bool | None = None,
        rope_kernel: bool | None = None,
        skinny_rows: int | None = None,
    ):
        for name, kind in (("prefix_attn", prefix_attn), ("expert_attn", expert_attn)):
            if kind not in (*ATTN_KINDS, "auto"):
                raise ValueError(f"{name}: expected one of {(*ATTN_KINDS, 'auto')}, got {kind!r}")
        prefix_attn = resolve_attn(prefix_attn, model.device, expert=False)
        expert_attn = resolve_attn(expert_attn, model.device, expert=True)
        self.prefix_attn, self.expert_attn = prefix_attn, expert_attn
        if expert_gemm not in (*GEMM_KINDS, "auto"):  # before the GPU check: a typo is a typo on any device
            raise ValueError(f"expert_gemm: expected one of {(*GEMM_KINDS, 'auto')}, got {expert_gemm!r}")
        _check_gpu_only(model.device, prefix_attn=prefix_attn, expert_attn=expert_attn, expert_gemm=expert_gemm,
                        lm_down_tune=lm_down_tune, fused_layer_norm=fused_layer_norm, rope_kernel=rope_kernel)
        if model.training:
            raise ValueError("FastPi0 needs a model in eval mode (call model.eval())")
        self.model = model
        self.cfg = cfg = model.cfg
        self.use_graphs = (model.device.type == "cuda") if graphs is None else graphs
        if self.use_graphs and model.device.type != "cuda":
            raise ValueError("graphs=True needs the model on a CUDA device")
        self.graphs = Graphs(self.use_graphs)
        self.compiled = compile
        self.overlap = overlap  # sample_actions: Euler step 0 beside the prefix LM (_sample_body)
        if prompt_bucket is None:
            # Measured on an H100 (docs/PERFORMANCE.md round 12): 32-slot buckets ran Pi0.5's
            # bench prompt (200 slots) 0.3 ms faster than 64; Pi0's 48 slots trimmed to 32 ran its
            # prefix LM slower (544 rows are an awkward shape for cuBLAS), so they stay whole.
            prompt_bucket = 32 if cfg.max_token_len >= 128 else 64
        if isinstance(prompt_bucket, bool) or not isinstance(prompt_bucket, int) or prompt_bucket < 0:
            # (a float passed here and failed the first call with a slice TypeError)
            raise ValueError(f"prompt_bucket: expected an integer >= 0 (0 = always every prompt slot), "
                             f"got {prompt_bucket!r}")
        self.prompt_bucket = prompt_bucket  # see prefix_rows
        # The prefix LM's down product: cuBLAS's pick, cuBLASLt's over padded rows or one of
        # cuBLASLt's other configurations, whichever times fastest on this card for each row
        # count (_down_rows); None = on CUDA.
        self.lm_down_tune = (model.device.type == "cuda") if lm_down_tune is None else bool(lm_down_tune)
        # prefix-LM rows -> 0 (cuBLAS), padded rows through torch's cuBLASLt pick, or an _LtDown
        self.down_routes: dict[int, int | _LtDown] = {}
        self._side: torch.cuda.Stream | None = None
        self._prepared: tuple | None = None  # what prepare() read ahead, for one observation
        # Optional TensorRT engines for SigLIP + projector (untested: see vision_trt.py).
        self.trt_vision = TrtVision(model.vision, model.projector, model.dtype) if vision_trt else None
        with torch.no_grad():
            self.vis = _fuse_siglip(model.vision)
            self.llm = _fuse_gemma(model.llm)
            self.exp = _fuse_gemma(model.expert)
            self._zero_w = torch.zeros(cfg.llm.width, dtype=model.dtype, device=model.device)  # see _lt_residual
            self.exp_final = _one_plus(model.expert.norm)
        if cfg.state_token:
            ew = cfg.expert.width
            w = model.action_time_mlp_in.weight
            self._at_w_a_t = w[:, :ew].t()  # acts on action_in_proj(x_t)
            self._at_w_t = w[:, ew:]  # acts on the time embedding: folded into per-step tables
        self._statics: dict[int, _Static] = {}
        self._tables: dict[int, list] = {}
        self._glue: dict[int, tuple] = {}
        self._siglip_fn = _siglip_layer
        self._lm_rest_fn = _lm_rest
        self._lm_act_fn = _lm_act
        self._norm_qkv_fn = _norm_qkv
        self._rope_fn = _rope_write
        self._prefix_tables_fn = _prefix_tables
        self._exp_tables_fn = _expert_tables
        self._exp_fn = _expert_layer
        self._exp_fused_fn = _expert_layer_fused
        expert_gemm = resolve_gemm(expert_gemm, model.device)
        if expert_gemm != "torch" and not HAVE_TRITON:
            raise ValueError(f"expert_gemm={expert_gemm!r} needs triton (pip install triton); use 'torch'")
        self.expert_gemm = expert_gemm
        # Programmatic dependent launch for the "chain" layers: None = wherever it is supported.
        can_pdl = expert_gemm == "chain" and pdl_supported(model.device)
        if expert_pdl and not can_pdl:
            raise ValueError("expert_pdl=True needs expert_gemm='chain' on an sm_90+ GPU with Triton >= 3.4")
        self.expert_pdl = can_pdl if expert_pdl is None else bool(expert_pdl)
        # The most suffix rows (batch x suffix) the expert runs through the skinny kernels; more
        # go through cuBLAS. None = batch 1-2 (skinny_gemm.SKINNY_ROWS, measured); at most MAX_M.
        skinny_rows = SKINNY_ROWS if skinny_rows is None else skinny_rows
        if not 0 <= skinny_rows <= MAX_M:
            raise ValueError(f"skinny_rows: expected 0..{MAX_M} (what the skinny kernels take), got {skinny_rows}")
        self.skinny_rows = skinny_rows
        if expert_gemm == "chain":  # the per-step projections as skinny products, w as (K, N) views
            with torch.no_grad():
                self._w_in_t = model.action_in_proj.weight.t()
                self._w_out_t = model.action_out_proj.weight.t()
                if not cfg.adarms:
                    self._w_mlp_out_t = model.action_time_mlp_out.weight.t()
                    # action_time_mlp_in's action half after action_in_proj, as one (A, W) product
                    fold = self._at_w_a_t.float().t() @ model.action_in_proj.weight.float()
                    self._w_fold_t = fold.to(model.dtype).t()
        # SigLIP's residual adds + LayerNorms as one Triton kernel each: None = on CUDA with Triton.
        auto_ln = model.device.type == "cuda" and HAVE_TRITON
        self.fused_ln = auto_ln if fused_layer_norm is None else bool(fused_layer_norm)
        # SigLIP's fc1 bias + GELU in the product's epilogue: CUDA only (see _siglip_layer); one
        # kernel less per layer (round 11). An attribute so that scripts/vision_ab.py can A/B it.
        self.gelu_epilogue = model.device.type == "cuda"
        # The prefix LM's rotary + K/V write as one Triton kernel (rope_scatter, round 14): None =
        # on CUDA with Triton.
        self.rope_kernel = auto_ln if rope_kernel is None else bool(rope_kernel)
        if (self.fused_ln or self.rope_kernel) and not HAVE_TRITON:
            raise ValueError("fused_layer_norm=True and rope_kernel=True need triton (pip install triton)")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: expected one of {COMPILE_MODES} or None, got {compile_mode!r}")
        if compile:
            # "max-autotune-no-cudagraphs" lets inductor time Triton GEMM templates against cuBLAS
            # for the 51-row expert products (graphs are captured here, not by inductor).
            opts = dict(dynamic=False, mode=compile_mode)
            # One compiled entry per row count: prompt buckets (prefix_rows) and partial-update
            # buckets (_bucket) together can pass dynamo's default limit of 8 per function, after
            # which it would silently run those shapes uncompiled.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
            if not self.fused_ln:  # with the fused add + LayerNorm, eager SigLIP measured faster (2.0 vs 2.1 ms)
                self._siglip_fn = torch.compile(_siglip_layer, **opts)
            self._norm_qkv_fn = torch.compile(_norm_qkv, **opts)
            self._rope_fn = torch.compile(_rope_write, **opts)
            self._prefix_tables_fn = torch.compile(_prefix_tables, **opts)
            self._exp_tables_fn = torch.compile(_expert_tables, **opts)
            self._lm_rest_fn = torch.compile(_lm_rest, **opts)
            self._lm_act_fn = torch.compile(_lm_act, **opts)
            self._exp_fn = torch.compile(_expert_layer, **opts)
            self._exp_fused_fn = torch.compile(_expert_layer_fused, **opts)

    def eval(self) -> "FastPi0":  # inference only; without this, __getattr__ would hand back the eager model
        self.model.eval()
        return self

    # nn.Module calls that change weights, dtype or device: on the eager model they would leave the
    # fused copies and captured graphs FastPi0 made from it as they were (or return the eager model).
    _CHANGES_MODEL = frozenset({"load_state_dict", "to", "cuda", "cpu", "float", "half", "bfloat16", "double",
                                "type", "to_empty", "apply", "train", "requires_grad_", "share_memory",
                                "with_cameras", "with_robot_dims"})  # (these returned the eager model)

    def __getattr__(self, name):  # cfg-level helpers (spans, make_noise, dtype, device, ...)
        if "model" not in self.__dict__:  # mid-construction or mid-copy: nothing to delegate to yet
            raise AttributeError(name)
        if name in FastPi0._CHANGES_MODEL:
            raise AttributeError(f"FastPi0.{name}: FastPi0 holds fused copies of its model's weights, made for one "
                                 f"dtype and device; change the eager model, then build a new FastPi0 from it")
        return getattr(self.__dict__["model"], name)

    # ---- static state ----------------------------------------------------------------------
    def _static(self, b: int) -> _Static:
        if b not in self._statics:
            self._statics[b] = _Static(self.cfg, b, self.model.dtype, self.model.device)
        return self._statics[b]

    def _step_tables(self, steps: int) -> list:
        """Per Euler step, what depends on the time alone (computed once per step count)."""
        if steps in self._tables:
            return self._tables[steps]
        m, cfg, dt = self.model, self.cfg, self.model.dtype
        tables = []
        with torch.no_grad():
            for i in range(steps):
                t = torch.full((1,), 1.0 + i * (-1.0 / steps), device=m.device)
                te = sincos_time(t, cfg.expert.width, cfg.time_min_period, cfg.time_max_period).to(dt)
                if not cfg.adarms:
                    tables.append(F.linear(te, self._at_w_t, m.action_time_mlp_in.bias))
                    continue
                cond = F.silu(m.time_mlp_out(F.silu(m.time_mlp_in(te))))
                per_layer = []
                for layer in m.expert.layers:
                    vals = []
                    for norm in (layer.in_norm, layer.post_norm):
                        sc, sh, g = norm.dense(cond).unsqueeze(1).chunk(3, dim=-1)
                        vals += [(1.0 + sc.float()).to(dt), sh, g]
                    per_layer.append(tuple(vals))
                sc, sh, _ = m.expert.norm.dense(cond).unsqueeze(1).chunk(3, dim=-1)
                tables.append((per_layer, (1.0 + sc.float()).to(dt), sh))
        self._tables[steps] = tables
        return tables

    # ---- inputs ----------------------------------------------------------------------------
    def _load_obs(self, st: _Static, obs: Observation) -> None:
        """The masks and tokens into st (obs already checked: _embed)."""
        st.image_masks.copy_(torch.stack([obs.image_masks[c] for c in self.cfg.cameras], 1))
        st.tokens.copy_(obs.tokens)
        st.token_mask.copy_(obs.token_mask)

    # ---- graph bodies ----------------------------------------------------------------------
    def _vision(self, st: _Static, n: int):
        """SigLIP + projector over the first n cameras' images of st.images, batched in one
        pass. Returns (n * B, patches, llm width), camera-major."""
        vc, b = self.cfg.vision, st.image_masks.shape[0]
        m = self.model.vision
        # The patch embedding as one GEMM over the unfolded patches: cuDNN ran this stride-14 conv
        # in ~87 us on an H200, vs ~18 us for this (scripts/patch_embed_ab.py, round 6).
        ps, g = vc.patch_size, vc.grid
        patches = st.images[: n * b].unflatten(2, (g, ps)).unflatten(4, (g, ps)).permute(0, 2, 4, 1, 3, 5)
        x = F.linear(patches.reshape(-1, 3 * ps * ps), m.patch_embed.weight.reshape(vc.width, -1), m.patch_embed.bias)
        x = x.view(n * b, vc.num_patches, vc.width) + m.pos_embed.weight[None]
        y = None  # the pending residual (see _siglip_layer)
        for w in self.vis:
            x, y = self._siglip_fn(
                x, y, w.ln1_w, w.ln1_b, w.qkv_w, w.qkv_b, w.o_w, w.o_b, w.ln2_w, w.ln2_b,
                w.fc1_w, w.fc1_b, w.fc2_t, w.fc2_b, vc.num_heads, vc.eps, self.fused_ln, self.gelu_epilogue,
            )
        x = _add_ln(self.fused_ln)(x, y, m.post_ln.weight, m.post_ln.bias, vc.eps)[1]
        return F.linear(x, self.model.projector.weight, self.model.projector.bias)

    def _text_and_masks(self, st: _Static):
        cfg = self.cfg
        p, n = cfg.vision.num_patches, len(cfg.cameras)
        e = F.embedding(st.tokens, self.model.llm.embed.weight)
        torch.mul(e, math.sqrt(cfg.llm.width), out=st.embeds[:, n * p :])
        st.valid[:, : n * p].copy_(st.image_masks[:, :, None].expand(-1, -1, p).reshape(-1, n * p))
        st.valid[:, n * p :].copy_(st.token_mask)
        torch.sub(st.valid.long().cumsum(-1), 1, out=st.positions)

    def _bias_dtype(self, kind: str):
        return torch.float32 if kind in ("fp32", "triton") else self.model.dtype

    def _lm(self, st: _Static, x: torch.Tensor, start: int, keep_hidden: tuple[int, ...], idx=None):
        """Prefix LM layers [start, depth) over x: all tokens (idx None) or the tokens at idx,
        attending over the buffer's cached K/V of the others. K/V land in st.k / st.v."""
        for _ in self._lm_layers(st, x, start, keep_hidden, idx):
            pass

    def _lm_layers(self, st: _Static, x: torch.Tensor, start: int, keep_hidden: tuple[int, ...], idx=None):
        """`_lm` one layer at a time: issues layer i's QKV part, yields i (its K/V are then queued
        for st.k[i] / st.v[i]), then issues the rest of the layer, so that a caller can start work
        that needs those K/V in between. Without idx, x may be the first rows of the prefix only
        (prefix_rows): the rows after it are masked padding, left as they were."""
        lm = self.cfg.llm
        t = self.cfg.prefix_len if idx is not None else x.shape[1]
        g = lm.num_heads // lm.num_kv_heads
        pos = st.positions[:, :t] if idx is None else st.positions[:, idx]
        cos, sin, key_bias = self._prefix_tables_fn(st.valid[:, :t], pos, lm.head_dim, self.cfg.rope_base,
                                                    self.rope_kernel, self._bias_dtype(self.prefix_attn))
        bias = key_bias[:, None, None, :].expand(-1, 1, x.shape[1] * g, -1)
        # Some SDPA kernels want dense masks; the Triton kernel reads a stride-0 one per key.
        bias = bias if self.prefix_attn == "triton" else bias.contiguous()
        n = lm.depth
        down = self._down_rows(x.shape[0] * x.shape[1])
        y = None  # the previous layer's down product, its residual add pending (see _norm_qkv)
        for i in range(start, n):
            if i in keep_hidden:
                if y is not None:
                    x, y = x + y, None
                st.hidden_buf(i)[:, : x.shape[1]].copy_(x)
            w = self.llm[i]
            k_out, v_out = st.k[i, :, :t], st.v[i, :, :t]
            x, qkv = self._norm_qkv_fn(x, y, w.in_norm, w.qkv, lm.eps)
            rope = rope_scatter if self.rope_kernel else self._rope_fn
            q = rope(qkv, cos, sin, k_out, v_out, 0, idx, lm.num_heads, lm.num_kv_heads)
            yield i
            if i == n - 1:  # the last layer's output is never used: its K/V are enough
                break
            if down:  # the down product outside the compiled function: its input flat, over `rows` rows
                lt = isinstance(down, _LtDown)
                rows = x.shape[0] * x.shape[1] if lt else down
                x, act = self._lm_act_fn(x, q, w.o_t, w.post_norm, w.gate_up, bias, k_out, v_out, lm.eps,
                                         self.prefix_attn, rows)
                # cuBLASLt's configurations take the residual in their epilogue (C = x) for free
                x, y = (down(x, act, w.down_t), None) if lt else (x, _lt_residual(x, act, w.down_t, self._zero_w))
            else:
                x, y = self._lm_rest_fn(x, q, w.o_t, w.post_norm, w.gate_up, w.down_t, bias, k_out, v_out, lm.eps,
                                        self.prefix_attn)

    def _down_rows(self, m: int) -> int | _LtDown:
        """How the prefix LM's down product runs over m rows: 0 = cuBLAS's pick (in the compiled
        layer); rows = through torch's cuBLASLt pick (_lt_residual) over that many rows (m, or m
        padded to a multiple of 128); an _LtDown = one of cuBLASLt's other configurations
        (kvreuse.model.cublaslt), the residual in the product. The first two leave the residual
        add to the next layer's norm kernel (_norm_qkv). Timed once per m on this card over the
        real weights, before any graph of that shape is captured; another route is kept only
        when >= 3% faster than cuBLAS's pick."""
        if m not in self.down_routes:
            self.down_routes[m] = self._pick_down_rows(m) if self.lm_down_tune else 0
        return self.down_routes[m]

    def _pick_down_rows(self, m: int) -> int | _LtDown:
        ws = [w.down_t for w in self.llm]
        if ws[0].is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"FastPi0: the down-product route for {m} rows must be timed before capture")
        g = torch.Generator(ws[0].device).manual_seed(0)  # leaves the global RNG (noise) alone
        kw = dict(dtype=self.model.dtype, device=ws[0].device, generator=g)
        act = torch.randn(-(-m // 128) * 128, ws[0].shape[0], **kw)
        x = torch.randn(1, m, self.cfg.llm.width, **kw)
        plain = _median_ms(lambda: [act[:m] @ wt for wt in ws])
        best, route = plain / 1.03, 0
        for rows in dict.fromkeys((m, act.shape[0])):
            ms = _median_ms(lambda rows=rows: [_lt_residual(x, act[:rows], wt, self._zero_w) for wt in ws])
            if ms < best:
                best, route = ms, rows
        for lt in _LtDown.candidates(x, act[:m], ws[0]):
            ms = _median_ms(lambda lt=lt: [lt(x, act, wt) for wt in ws])
            if ms < best:
                best, route = ms, lt
        return route.own() if isinstance(route, _LtDown) else route

    def prefix_rows(self, token_mask: torch.Tensor) -> int:
        """How many prefix rows the LM runs for this prompt: the image tokens and the prompt up to
        its last valid token over the batch, rounded up to a multiple of `prompt_bucket` slots
        (one captured graph per bucket), at most all `max_token_len`. The rows after it are
        padding, masked for every query; their K/V are left as they were (finite, never
        attended), so caches differ from the eager model's there only. Pi0.5's 200 prompt slots
        cost ~1 ms of prefix LM on an H100 against 128 (docs/PERFORMANCE.md, rounds 11-12).
        Reads the mask on the host: a device sync when it lives on the GPU (see _rows_of)."""
        if not self._trims_prompt():
            return self.cfg.prefix_len
        n, q = self.cfg.max_token_len, self.prompt_bucket
        used = token_mask.any(0)
        last = int((used * torch.arange(1, n + 1, device=used.device)).max())
        return self.cfg.prefix_len - n + min(n, max(q, -(-last // q) * q))

    def _rows_of(self, obs: Observation) -> int:
        """prefix_rows of obs's prompt, its mask read on the host only where the bucket needs it
        (Observation.host_mask: no device read for an observation moved there by to())."""
        return self.prefix_rows(obs.host_mask("token_mask")) if self._trims_prompt() else self.cfg.prefix_len

    def _trims_prompt(self) -> bool:
        """Whether prefix_rows depends on the prompt (a bucket smaller than its slots)."""
        return 0 < self.prompt_bucket < self.cfg.max_token_len

    def _prefix_full(self, st: _Static, keep_hidden: tuple[int, ...], rows: int | None = None):
        self._text_and_masks(st)
        return self._lm(st, st.embeds[:, :rows], 0, keep_hidden)

    def _prefix_graph(self, st: _Static, keep_hidden: tuple[int, ...], rows: int):
        """The prefix LM's captured graph over `rows` prefix rows (see prefix_rows)."""
        b = st.valid.shape[0]
        return self.graphs.run(("prefix", b, keep_hidden, rows), lambda: self._prefix_full(st, keep_hidden, rows))

    def _sample_body(self, st: _Static, steps: int, rows: int | None = None, keep_hidden: tuple[int, ...] = ()):
        """Prefix LM and denoise in one body, Euler step 0 trailing the prefix layer by layer (_trail)."""
        self._text_and_masks(st)
        return self._trail(st, steps, self._lm_layers(st, st.embeds[:, :rows], 0, keep_hidden))

    def _trail(self, st: _Static, steps: int, layers, start: int = 0):
        """The denoise, Euler step 0's expert layer li queued once `layers` (an _lm_layers
        generator from layer `start`) has written the prefix's layer-li K/V: expert layer li needs
        only those, so on CUDA it runs on a second stream beside the LM's later layers
        (scripts/overlap_probe.py measured ~0.8 ms of room beside the prefix LM on an H200).
        Layers below `start` are the cache's already: step 0 starts on them at once. Each
        stream runs the same kernels on the same inputs as the LM graph + denoise, so the actions
        are bit-identical to the split API. On the CPU the same interleaving runs in order."""
        done = start - 1  # the last LM layer whose K/V are queued

        def advance(li: int) -> bool:  # queue LM layers up to li; whether any was queued
            nonlocal done
            queued = False
            while done < li:
                done = next(layers, self.cfg.llm.depth)
                queued = True
            return queued

        if not st.k.is_cuda:
            x = self._denoise_body(st, steps, advance)
        else:
            main = torch.cuda.current_stream()
            if self._side is None:
                self._side = torch.cuda.Stream(device=st.k.device)
            side = self._side

            def before_layer(li: int) -> None:  # called on the side stream
                with torch.cuda.stream(main):
                    if not advance(li):
                        return
                    ready = torch.cuda.Event()
                    ready.record(main)
                side.wait_event(ready)

            side.wait_stream(main)
            with torch.cuda.stream(side):
                x = self._denoise_body(st, steps, before_layer)
            main.wait_stream(side)
        for _ in layers:  # nothing left when the expert is as deep as the LM (Pi0 / Pi0.5)
            pass
        return x

    def _denoise_body(self, st: _Static, steps: int, before_layer=None):
        """The Euler loop over the prefix K/V in st. before_layer(li), when given, is called
        before Euler step 0's expert layer li (see _sample_body)."""
        cfg, m = self.cfg, self.model
        ex, t, s, c = cfg.expert, cfg.prefix_len, cfg.suffix_len, cfg.chunk_size
        dt = m.dtype
        b = st.valid.shape[0]
        g = ex.num_heads // ex.num_kv_heads
        tables = self._step_tables(steps)
        use_fused = self.expert_gemm != "torch" and b * s <= self.skinny_rows
        chain = use_fused and self.expert_gemm == "chain"  # Triton only (attention too), no compile
        # Once per call: positions, rotary tables, the [prefix ; suffix] mask, Pi0's state token.
        cos, sin, cos_h, sin_h, bias = self._exp_tables_fn(
            st.valid, s, g, ex.head_dim, cfg.rope_base, not cfg.state_token, use_fused,
            self._bias_dtype(self.expert_attn))
        if chain:
            return self._denoise_chain(st, steps, tables, cos_h, sin_h, bias, before_layer)
        if cfg.state_token:
            suffix = torch.empty(b, s, ex.width, dtype=dt, device=st.valid.device)
            suffix[:, 0].copy_(F.linear(st.state.to(dt), m.state_proj.weight, m.state_proj.bias))
        x = st.noise.clone()
        step = -1.0 / steps
        for i in range(steps):
            a = F.linear(x.to(dt), m.action_in_proj.weight, m.action_in_proj.bias)
            if cfg.adarms:
                per_layer, f_s, f_b = tables[i]
                h = a
            else:
                per_layer = None
                at = torch.addmm(tables[i], a.reshape(-1, ex.width), self._at_w_a_t).view(b, c, ex.width)
                suffix[:, 1:].copy_(F.linear(F.silu(at), m.action_time_mlp_out.weight, m.action_time_mlp_out.bias))
                h = suffix
            for li, w in enumerate(self.exp):
                if i == 0 and before_layer is not None:
                    before_layer(li)
                args = (h, w.in_norm, w.qkv, w.o_t, w.post_norm, w.gate_up, w.down_t)
                kw = dict(k_buf=st.k[li], v_buf=st.v[li], start=t, heads=ex.num_heads, kv_heads=ex.num_kv_heads,
                          eps=ex.eps, cond=per_layer[li] if per_layer is not None else None, attn=self.expert_attn)
                if use_fused:
                    h = self._exp_fused_fn(*args, cos_h, sin_h, bias, gemm=self.expert_gemm, **kw)
                else:
                    h = self._exp_fn(*args, cos, sin, bias, **kw)
            h = h[:, -c:]
            h = _ada_norm(h, ex.eps, f_s, f_b) if cfg.adarms else F.rms_norm(h, (ex.width,), self.exp_final, ex.eps)
            v = F.linear(h, m.action_out_proj.weight, m.action_out_proj.bias)
            x.add_(v, alpha=step)
        return x

    def _chain_glue(self, steps: int) -> tuple:
        """Per step count, for _denoise_chain: Pi0's per-step bias of the folded input projection
        (time half of action_time_mlp_in + its action half applied to action_in_proj's bias), and
        the Euler step as a column scale."""
        if steps not in self._glue:
            m, dt = self.model, self.model.dtype
            step = torch.full((self.cfg.max_action_dim,), -1.0 / steps, device=m.device)
            biases = None
            if not self.cfg.adarms:
                with torch.no_grad():
                    b_in = self._at_w_a_t.float().t() @ m.action_in_proj.bias.float()
                    biases = [(tb.float().reshape(-1) + b_in).to(dt) for tb in self._step_tables(steps)]
            self._glue[steps] = (biases, step)
        return self._glue[steps]

    def _denoise_chain(self, st: _Static, steps: int, tables, cos_h, sin_h, bias, before_layer=None) -> torch.Tensor:
        """The Euler loop with every op a Triton kernel (PDL chains them all at batch 1): per step
        an input kernel or two, the layer chain, and the output projection + Euler update into x.
        Pi0: silu(x @ (W_a W_in)^T + bias_i) (action_in_proj folded into action_time_mlp_in),
        then action_time_mlp_out writing suffix rows 1.. and their layer-0 norm; the state row and
        its norm are set once per call. Pi0.5: action_in_proj with layer 0's adaptive norm."""
        cfg, m, ex = self.cfg, self.model, self.cfg.expert
        c, s, dt, pdl = cfg.chunk_size, cfg.suffix_len, m.dtype, self.expert_pdl
        biases, step = self._chain_glue(steps)
        x = st.noise.clone()
        b = x.shape[0]
        h = torch.empty(b, s, ex.width, dtype=dt, device=x.device)
        hn = torch.empty_like(h)
        if not cfg.adarms:
            norm0 = self._in_norm(0, None, None)
            state = F.linear(st.state.to(dt), m.state_proj.weight, m.state_proj.bias)
            h[:, 0].copy_(state)
            hn[:, 0].copy_(_norm(state, norm0.weight, ex.eps))
            at = torch.empty(b, c, ex.width, dtype=dt, device=x.device)
        for i in range(steps):
            per_layer = tables[i][0] if cfg.adarms else None
            if cfg.adarms:
                skinny_linear(x, self._w_in_t, bias=m.action_in_proj.bias, out=h, normed_out=hn, pdl=pdl,
                              norm=self._in_norm(0, per_layer, tables[i]))
            else:
                skinny_linear(x, self._w_fold_t, bias=biases[i], silu=True, out=at, pdl=pdl)
                skinny_linear(at, self._w_mlp_out_t, bias=m.action_time_mlp_out.bias, out=h[:, 1:], norm=norm0,
                              normed_out=hn[:, 1:], pdl=pdl)  # rows 1.. of each batch entry, in place
            out = self._chain(h, hn, st, per_layer, tables[i], cos_h, sin_h, bias,
                              before_layer if i == 0 else None)  # final-normed
            skinny_linear(out[:, -c:], self._w_out_t, bias=m.action_out_proj.bias, col_scale=step, residual=x,
                          out=x, pdl=pdl)
        return x

    def _in_norm(self, li: int, per_layer, table) -> RowNorm:
        """Expert layer li's input norm (li = depth: the final norm); Pi0.5's adaptive ones come
        from the step's tables (per_layer, table = _step_tables(...)[i])."""
        eps = self.cfg.expert.eps
        if li == len(self.exp):
            return RowNorm(eps, None, table[1], table[2]) if per_layer else RowNorm(eps, self.exp_final)
        return RowNorm(eps, self.exp[li].in_norm, *(per_layer[li][:2] if per_layer else ()))

    def _chain(self, h, hn, st: _Static, per_layer, table, cos_h, sin_h, bias, before_layer=None):
        """The expert stack through _expert_layer_chain from h and its layer-0 norm hn; returns the
        final-normed output."""
        ex, t = self.cfg.expert, self.cfg.prefix_len
        for li, w in enumerate(self.exp):
            if before_layer is not None:
                before_layer(li)
            h, hn = _expert_layer_chain(
                h, hn, w.qkv, w.o_t, w.post_norm, w.gate_up, w.down_t, cos_h, sin_h, bias, st.k[li], st.v[li], t,
                ex.num_heads, ex.num_kv_heads, ex.eps, per_layer[li] if per_layer else None,
                self._in_norm(li + 1, per_layer, table), self.expert_pdl,
            )
        return hn

    # ---- public API ------------------------------------------------------------------------
    def _check_cams(self, cams, what: str = "run_cameras") -> None:
        unknown = [c for c in cams if c not in self.cfg.cameras]
        if unknown:
            raise ValueError(f"{what}: unknown camera(s) {unknown}; model cameras: {list(self.cfg.cameras)}")

    def _embed(self, st: _Static, obs: Observation, given: dict[str, torch.Tensor] | None,
               want_rows: bool = True) -> int | None:
        """Fill st.embeds' camera slots: the `given` embeddings by camera name (reused or
        supplied), the other cameras through the vision tower in one batched pass. Returns
        prefix_rows (None without want_rows: the partial updates run every row). The vision pass
        is queued first: it needs nothing else of obs, and the GPU runs it while the host does the
        rest (queued before it, each small copy and host read would leave the GPU waiting). Only
        a prompt mask that must be read from the device is read before it, so that its sync
        waits for nothing of this call."""
        given = {i: given[c] for i, c in enumerate(self.cfg.cameras) if c in given} if given else {}
        run = tuple(i for i in range(len(self.cfg.cameras)) if i not in given)
        self.model._check(obs)
        want = (obs.batch_size, self.cfg.vision.num_patches, self.cfg.llm.width)
        for i, e in given.items():  # copied into fixed buffers: another shape would broadcast
            if tuple(e.shape) != want:
                raise ValueError(f"image_embeds[{self.cfg.cameras[i]!r}]: expected {want}, got {tuple(e.shape)}")
        prep = self._prepared_for(obs, consume=True)
        rows = prep[2] if want_rows and prep is not None else None
        if want_rows and rows is None and not obs.on_host("token_mask"):
            rows = self._rows_of(obs)
        p, b = self.cfg.vision.num_patches, obs.batch_size
        x = self._vision_of(st, [obs.images[self.cfg.cameras[i]] for i in run]) if run else None
        if want_rows and rows is None:
            rows = self._rows_of(obs)  # from the mask's host copy, while the GPU runs the vision pass
        self._load_obs(st, obs)
        for i, e in given.items():
            st.embeds[:, i * p : (i + 1) * p].copy_(e)
        for j, i in enumerate(run):
            st.embeds[:, i * p : (i + 1) * p].copy_(x[j * b : (j + 1) * b])
        return rows

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, patches, llm width), like `Pi0Model.embed_image`."""
        self._check_images({"images": images})
        return self._vision_of(self._static(images.shape[0]), [images]).clone()

    @torch.no_grad()
    def embed_images(self, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`embed_image` of several cameras (name -> (B, 3, H, W)) in one batched pass through
        the vision tower, in the model's camera order: for all cameras this is the pass that
        sample_actions / encode_prefix run, so the embeddings are the same to the bit."""
        self._check_cams(tuple(images), "embed_images")
        self._check_images(images)
        cams = [c for c in self.cfg.cameras if c in images]
        if not cams:
            return {}
        b = images[cams[0]].shape[0]
        x = self._vision_of(self._static(b), [images[cam] for cam in cams])
        return {cam: x[j * b : (j + 1) * b].clone() for j, cam in enumerate(cams)}

    def _check_images(self, images: dict[str, torch.Tensor]) -> None:
        """(B, 3, size, size), one B for all: they are copied into fixed buffers, where another
        shape would broadcast (a grey image into three channels, one row into all)."""
        size, b = self.cfg.vision.image_size, None
        for name, x in images.items():
            if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size) or b not in (None, x.shape[0]):
                raise ValueError(f"{name}: expected ({b or 'B'}, 3, {size}, {size}), got {tuple(x.shape)}")
            b = x.shape[0]

    def _vision_of(self, st: _Static, images: list[torch.Tensor]) -> torch.Tensor:
        """Cameras' (B, 3, H, W) images, camera-major into st.images, through the vision tower in
        one pass: a TensorRT engine when vision_trt is on, else the captured graph of `_vision`."""
        b, n = images[0].shape[0], len(images)
        for j, x in enumerate(images):
            st.images[j * b : (j + 1) * b].copy_(x)
        if self.trt_vision is not None:
            return self.trt_vision(st.images[: n * b])
        return self.graphs.run(("vision", b, n), lambda: self._vision(st, n))

    def _export(self, st: _Static, obs, spans, call_index, keep_hidden, embeds=None, hidden=None):
        t = self.cfg.prefix_len
        return PrefixCache(
            k=st.k[:, :, :t].clone(), v=st.v[:, :, :t].clone(), mask=st.valid.clone(),
            positions=st.positions.clone(), embeds=st.embeds.clone() if embeds is None else embeds,
            spans=spans, tokens=obs.tokens,
            state_tokens=obs.state_token_mask,
            hidden={i: st.hidden[i].clone() for i in keep_hidden} if hidden is None else hidden,
            call_index=call_index, created=time.monotonic(),
        )

    @torch.no_grad()
    def encode_prefix(
        self,
        obs: Observation,
        *,
        snapshot: int | None = None,
        call_index: int = 0,
        keep_hidden: tuple[int, ...] = (),
        image_embeds: dict[str, torch.Tensor] | None = None,
    ) -> PrefixCache:
        check_keep_hidden(self.cfg, keep_hidden)
        st = self._static(obs.batch_size)
        spans = self._spans_early(obs, snapshot)
        self._encode(st, obs, keep_hidden, image_embeds)
        return self._export(st, obs, spans or self._spans(obs, snapshot), call_index, tuple(keep_hidden))

    def prepare(self, obs: Observation) -> None:
        """Read on the host now what a call on this very `obs` needs there: Pi0.5's state-span
        start and the prompt's rows (prefix_rows), each a device sync. A caller that queues
        other device work for obs first (ReusePolicy's vision pass) calls this before it, so
        that those syncs do not wait for that work and leave the GPU idle behind it. Used once, by
        the next call that embeds obs, and only while obs's masks are unchanged. Nothing to do
        where neither reads the device (Pi0's spans; prompts of one bucket; masks whose host
        copies Observation.to kept, read later while the GPU runs the vision pass)."""
        needs = ("state_token_mask",) if self.cfg.state_in_prompt else ()
        needs += ("token_mask",) if self._trims_prompt() else ()
        if all(obs.on_host(name) for name in needs):
            self._prepared = None
            return
        self._prepared = (obs, self.model.spans(obs, 0), self._rows_of(obs), self._versions(obs))

    @staticmethod
    def _versions(obs: Observation) -> tuple:
        """The masks prepare() read, as objects and versions: a mask replaced or written in place
        since then is not served from it."""
        return (obs.token_mask, obs.state_token_mask), (version(obs.token_mask), version(obs.state_token_mask))

    def _prepared_for(self, obs: Observation, consume: bool = False):
        p = self._prepared
        if p is None or p[0] is not obs:
            return None
        (tm, sm), versions = p[3]
        if tm is not obs.token_mask or sm is not obs.state_token_mask or versions != self._versions(obs)[1]:
            return None
        if consume:
            self._prepared = None
        return p

    def _spans_early(self, obs: Observation, snapshot: int | None):
        """The spans before any graph is queued where they read the device (see _spans), else
        None: from host copies of the masks they are read once the graphs are queued."""
        return None if obs.on_host("state_token_mask") else self._spans(obs, snapshot)

    def _spans(self, obs: Observation, snapshot: int | None):
        """The cache's spans (from prepare() when it read them). Pi0.5's read where the state
        tokens start on the host: with a device sync for a mask without a host copy, which after
        the graph would leave the GPU idle while the host copies the cache out and the caller
        does its bookkeeping; hence _spans_early."""
        snapshot = new_snapshot_id() if snapshot is None else snapshot
        p = self._prepared_for(obs)
        if p is not None:
            return tuple(dataclasses.replace(s, snapshot=snapshot) for s in p[1])
        return self.model.spans(obs, snapshot)

    def _encode(self, st, obs, keep_hidden=(), image_embeds=None):
        self._prefix_graph(st, tuple(sorted(keep_hidden)), self._embed(st, obs, image_embeds))

    @torch.no_grad()
    def denoise(self, prefix: PrefixCache, obs: Observation, noise: torch.Tensor, steps: int | None = None):
        """Euler integration; copies the prefix K/V into the static buffer once (never per step)
        and never writes `prefix`."""
        st = self._static(obs.batch_size)
        t = self.cfg.prefix_len
        self.model.check_prefix(prefix, obs.batch_size)
        st.k[:, :, :t].copy_(prefix.k)
        st.v[:, :, :t].copy_(prefix.v)
        st.valid.copy_(prefix.mask)
        return self._denoise(st, obs, noise, steps)

    def _denoise_inputs(self, st, obs, noise):
        self.model.check_noise(noise, obs.batch_size)  # copy_ would broadcast a wrong shape
        if self.cfg.state_token:
            st.state.copy_(obs.state)
        st.noise.copy_(noise)

    def _denoise(self, st, obs, noise, steps):
        steps = self.model.steps_of(steps)
        self._denoise_inputs(st, obs, noise)
        x = self.graphs.run(("denoise", obs.batch_size, steps), lambda: self._denoise_body(st, steps))
        return x.clone()

    @torch.no_grad()
    def sample_actions(self, obs: Observation, noise: torch.Tensor | None = None, steps: int | None = None):
        """Prefix and denoise through the shared buffer (no cache copies); with `overlap`, Euler
        step 0 trails the prefix LM layer by layer (`_sample_body`), else they run back to back."""
        noise = self.model.make_noise(obs.batch_size) if noise is None else noise
        st = self._static(obs.batch_size)
        if not self.overlap:
            self._encode(st, obs)
            return self._denoise(st, obs, noise, steps)
        return self._sample(st, obs, noise, steps, (), None)

    def _sample(self, st, obs, noise, steps, keep_hidden: tuple[int, ...], image_embeds):
        """Vision (cameras not in image_embeds), then the prefix and denoise graph with Euler
        step 0 beside the prefix LM; the actions as a new tensor."""
        steps = self.model.steps_of(steps)
        rows = self._embed(st, obs, image_embeds)
        self._denoise_inputs(st, obs, noise)
        return self._sample_graph(st, steps, rows, keep_hidden)

    def _sample_graph(self, st: _Static, steps: int, rows: int | None, keep_hidden: tuple[int, ...]) -> torch.Tensor:
        """The prefix + denoise graph over st as loaded (_sample_body); the actions as a new tensor."""
        b = st.valid.shape[0]
        return self.graphs.run(("sample", b, steps, rows, keep_hidden),
                               lambda: self._sample_body(st, steps, rows, keep_hidden)).clone()

    @torch.no_grad()
    def sample_with_prefix(
        self,
        obs: Observation,
        noise: torch.Tensor,
        *,
        snapshot: int | None = None,
        call_index: int = 0,
        keep_hidden: tuple[int, ...] = (),
        image_embeds: dict[str, torch.Tensor] | None = None,
        steps: int | None = None,
    ) -> tuple[torch.Tensor, PrefixCache]:
        """`Pi0Model.sample_with_prefix`: the actions and the prefix cache of encode_prefix +
        denoise, through the sample_actions graph (Euler step 0 beside the prefix LM when
        `overlap`), the cache copied out after it: what a reuse policy's full refresh runs
        (~0.5 ms less than the two calls on an H100, docs/PERFORMANCE.md round 12)."""
        check_keep_hidden(self.cfg, keep_hidden)
        st = self._static(obs.batch_size)
        kh = tuple(sorted(keep_hidden))
        spans = self._spans_early(obs, snapshot)
        if not self.overlap:
            self._encode(st, obs, kh, image_embeds)
            x = self._denoise(st, obs, noise, steps)
        else:
            x = self._sample(st, obs, noise, steps, kh, image_embeds)
        return x, self._export(st, obs, spans or self._spans(obs, snapshot), call_index, kh)

    # ---- reuse updates -----------------------------------------------------------------------
    def _given_embeds(self, cache: PrefixCache, run_cameras, fresh) -> dict[str, torch.Tensor]:
        """Cached embeddings of cameras not in `run_cameras`, plus fresh ones supplied for run cameras."""
        self._check_cams(run_cameras)
        return self.model._image_embeds(cache, run_cameras, fresh)

    @torch.no_grad()
    def update_prefix(
        self,
        cache: PrefixCache,
        obs: Observation,
        recompute: torch.Tensor,
        run_cameras: tuple[str, ...],
        spans: tuple[Span, ...],
        call_index: int,
        image_embeds: dict[str, torch.Tensor] | None = None,
    ) -> PrefixCache:
        """`Pi0Model.update_prefix` on the fast path: only the tokens marked in `recompute` go
        through the LM (their count padded up to a graph bucket with repeats of the last one;
        a repeated token computes the same K/V, so the result is unchanged). A `recompute` on the
        CPU, as ReusePolicy's plans give it, costs no device read."""
        return self._update(cache, obs, run_cameras, spans, call_index, image_embeds, recompute=recompute)[1]

    @torch.no_grad()
    def update_prefix_layers(
        self,
        cache: PrefixCache,
        obs: Observation,
        split: int,
        run_cameras: tuple[str, ...],
        spans: tuple[Span, ...],
        call_index: int,
        image_embeds: dict[str, torch.Tensor] | None = None,
    ) -> PrefixCache:
        """`Pi0Model.update_prefix_layers` on the fast path (same definition of the input of the
        recomputed layers: cached residual at `split` with the embeddings swapped)."""
        return self._update(cache, obs, run_cameras, spans, call_index, image_embeds, split=split)[1]

    @torch.no_grad()
    def sample_with_update(
        self,
        cache: PrefixCache,
        obs: Observation,
        noise: torch.Tensor,
        run_cameras: tuple[str, ...],
        spans: tuple[Span, ...],
        call_index: int,
        *,
        recompute: torch.Tensor | None = None,
        split: int | None = None,
        image_embeds: dict[str, torch.Tensor] | None = None,
        steps: int | None = None,
    ) -> tuple[torch.Tensor, PrefixCache]:
        """update_prefix (`recompute` given) or update_prefix_layers (`split` given), then the
        denoise over the updated cache: what a reuse policy's partial or layer-wise call runs. With
        `overlap`, one graph whose Euler step 0 trails the recomputed LM layers (as
        sample_with_prefix does for a refresh); else the two calls. Actions and cache are those of
        the two calls, to the bit."""
        if (recompute is None) == (split is None):
            raise ValueError("sample_with_update: give exactly one of recompute= and split=")
        if not self.overlap:
            _, out = self._update(cache, obs, run_cameras, spans, call_index, image_embeds, recompute=recompute,
                                  split=split)
            return self.denoise(out, obs, noise, steps), out
        return self._update(cache, obs, run_cameras, spans, call_index, image_embeds, recompute=recompute,
                            split=split, noise=noise, steps=steps)

    def _update(self, cache, obs, run_cameras, spans, call_index, image_embeds, *, recompute=None, split=None,
                noise=None, steps=None) -> tuple[torch.Tensor | None, PrefixCache]:
        """The updates' body: st loaded from the cache and obs, then one graph of the recomputed
        LM layers, with `noise` the denoise trailing them (_trail); -> (actions or None, cache)."""
        if split is not None and split not in cache.hidden:
            raise ValueError(f"layer-wise reuse at split {split} needs a cache encoded with keep_hidden=({split},)")
        self.model.check_prefix(cache, obs.batch_size)  # copied into fixed buffers below: never broadcast
        st = self._static(obs.batch_size)
        b, t = obs.batch_size, self.cfg.prefix_len
        full = split is None and bool(recompute.all())  # exactly encode_prefix then, keeping the same hidden layers
        rows = self._embed(st, obs, self._given_embeds(cache, run_cameras, image_embeds), want_rows=full)
        if noise is not None:
            steps = self.model.steps_of(steps)
            self._denoise_inputs(st, obs, noise)
        kh, export = (), dict(hidden={})
        if full:
            kh, export = tuple(sorted(cache.hidden)), {}
            if noise is not None:
                return self._sample_graph(st, steps, rows, kh), self._export(st, obs, spans, call_index, kh)
            self._prefix_graph(st, kh, rows)
            return None, self._export(st, obs, spans, call_index, kh)
        if split is not None:
            st.old_embeds.copy_(cache.embeds)
            st.hidden_in.copy_(cache.hidden[split])
            key, export = ("layers", b, split), dict(embeds=cache.embeds, hidden=cache.hidden)

            def layers():
                return self._lm_layers(st, st.hidden_in - st.old_embeds + st.embeds, split, ())
        else:
            idx = recompute.nonzero().squeeze(-1)
            r = idx.numel()
            rb = _bucket(r, t)
            if rb not in st.idx:
                st.idx[rb] = torch.zeros(rb, dtype=torch.long, device=st.k.device)
            st.idx[rb][:r].copy_(upload(idx, st.k.device))
            st.idx[rb][r:].fill_(int(idx[-1]) if r else 0)
            key = ("partial", b, rb)

            def layers():
                return self._lm_layers(st, st.embeds[:, st.idx[rb]], 0, (), idx=st.idx[rb])
        st.k[:, :, :t].copy_(cache.k)
        st.v[:, :, :t].copy_(cache.v)

        def body():
            self._text_and_masks(st)
            if noise is not None:
                return self._trail(st, steps, layers(), split or 0)
            for _ in layers():
                pass

        x = self.graphs.run(key + ((steps,) if noise is not None else ()), body)
        return None if noise is None else x.clone(), self._export(st, obs, spans, call_index, (), **export)
