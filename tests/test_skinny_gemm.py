"""The skinny-input Triton GEMM (model/skinny_gemm.py) matches a float32 torch reference.

Runs on CPU through Triton's interpreter, set up as in test_kernels.py: TRITON_INTERPRET must be
set before anything imports triton (skinny_gemm imports it only on the first call).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # tests/conftest.py does the same when there is no GPU

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
if type(triton.language.zeros).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

from kvreuse.model import skinny_gemm
from kvreuse.model.skinny_gemm import (
    RowNorm,
    default_config,
    expert_shapes,
    skinny_linear,
    split_plan,
)


def _ref(x, w, bias=None, residual=None, gated=False):
    y = x.float() @ w.float()
    if bias is not None:
        y = y + bias.float()
    if gated:
        f = y.shape[-1] // 2
        y = F.gelu(y[..., :f], approximate="tanh") * y[..., f:]
    if residual is not None:
        y = y + residual.float()
    return y


def _check(out, ref, dtype):
    """bf16 x bf16 products are exact in fp32, so the kernel's only bf16 error is the final cast:
    under 1 ulp (2^-7 relative) as Triton 3.9's interpreter truncates fp32 -> bf16 (the GPU
    rounds to nearest). atol covers fp32 summation-order differences near zero."""
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    scale = ref.abs().max().item()
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=1e-5 * scale)


def _data(lead, k, n, dtype, *, transposed=True, n_out=None, seed=0):
    """x (*lead, K); w (K, N) as W.t() of an (N, K) tensor or contiguous; bias (N,); residual."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype).t() if transposed else torch.randn(k, n, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    residual = torch.randn(*lead, n if n_out is None else n_out, generator=g).to(dtype)
    return x, w, bias, residual


EPILOGUES = ["plain", "bias", "residual", "bias+residual", "gated", "gated+bias+residual"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_epilogues_with_and_without_split_k(epilogue, split_k, dtype):
    # K = 96 over BLOCK_K = 64: the second K block is partial (and with 2 splits it is the whole
    # second split); N = 200 (F = 100) over BLOCK_N = 32 leaves a partial column tile.
    m, k, n = 5, 96, 200
    gated = epilogue.startswith("gated")
    x, w, bias, residual = _data((m,), k, n, dtype, n_out=n // 2 if gated else n)
    bias = bias if "bias" in epilogue else None
    residual = residual if "residual" in epilogue else None
    out = skinny_linear(x, w, bias=bias, residual=residual, gated_gelu=gated, split_k=split_k, block_n=32, block_k=64)
    _check(out, _ref(x, w, bias, residual, gated), dtype)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize(
    "lead,k,n,tiling",
    [
        ((1,), 32, 48, (16, 16, 1)),
        ((5,), 96, 200, (64, 32, 3)),  # N % 64 != 0; 3 splits of one block
        ((51,), 256, 64, (32, 64, 3)),  # 4 K blocks over 3 splits: recounted to 2 splits of 2
        ((5,), 33, 48, (16, 16, 2)),  # the last K block holds a single column
        ((2, 3), 96, 200, (16, 64, 10)),  # (B, R, K) input; split_k above the K block count
        ((3, 17), 256, 64, None),  # M = 51 in two leading dims; default tiling (split-K here)
        ((), 96, 48, None),  # a single row without leading dims
        ((2, 51), 96, 80, (32, 32, 2)),  # batch 2 of the expert's rows: a 128-row tile
        ((4, 50), 64, 48, None),  # batch 4 of Pi0.5's 50 rows: a 256-row tile, 8 warps
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_tilings_and_weight_layouts(lead, k, n, tiling, transposed, dtype):
    x, w, bias, residual = _data(lead, k, n, dtype, transposed=transposed, seed=1)
    assert w.is_contiguous() != transposed
    kw = dict(zip(("block_n", "block_k", "split_k"), tiling, strict=True)) if tiling else {}
    out = skinny_linear(x, w, bias=bias, residual=residual, **kw)
    _check(out, _ref(x, w, bias, residual), dtype)


@pytest.mark.parametrize("split_k,block_k", [(1, 16), (2, 32)])  # K % block_k == 0, != 0
def test_strided_input_and_residual_views(split_k, block_k):
    # x: every other column of a wider activation; residual: a transposed buffer; bias: a strided
    # slice. Nothing is copied to contiguous form by the caller.
    k, n, m = 80, 48, 7
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, 2 * k, generator=g)[:, ::2]
    w = torch.randn(n, k, generator=g).t()
    residual = torch.randn(n, m, generator=g).t()
    bias = torch.randn(2 * n, generator=g)[::2]
    assert x.stride(-1) == 2 and not (residual.is_contiguous() or bias.is_contiguous())
    out = skinny_linear(x, w, bias=bias, residual=residual, split_k=split_k, block_n=16, block_k=block_k)
    _check(out, _ref(x, w, bias, residual), torch.float32)


@pytest.mark.parametrize("split_k", [1, 4])
def test_gated_gelu_saturates_for_large_gates(split_k):
    # |gate| ~ 1e3: gelu is 0 for the very negative ones and the identity for the positive ones.
    x, w, _, _ = _data((5,), 64, 96, torch.bfloat16, seed=3)
    x = x * 100
    out = skinny_linear(x, w, gated_gelu=True, split_k=split_k, block_n=16, block_k=16)
    ref = _ref(x, w, gated=True)
    assert (ref == 0).any()  # some gates saturate to exactly 0
    _check(out, ref, torch.bfloat16)


@pytest.mark.parametrize("gated", [False, True])
def test_full_width_bf16_default_tiling(gated):
    # The expert's 51 rows and K = 1024 over 256 columns: default blocks (64 x 128, or 64 x 64
    # gated) and split-K from the 132-SM heuristic.
    m, k, n = 51, 1024, 256
    x, w, bias, residual = _data((1, m), k, n, torch.bfloat16, n_out=n // 2 if gated else n, seed=4)
    out = skinny_linear(x, w, bias=bias, residual=residual, gated_gelu=gated)
    _check(out, _ref(x, w, bias, residual, gated), torch.bfloat16)


def test_empty_rows():
    x, w, _, _ = _data((0,), 32, 48, torch.float32)
    out = skinny_linear(x, w)
    assert out.shape == (0, 48)


def test_default_config_fills_the_gpu():
    assert expert_shapes() == [
        (51, 1024, 2560, "qkv"),
        (51, 2048, 1024, "o"),
        (51, 1024, 8192, "gate_up"),
        (51, 4096, 1024, "down"),
    ]
    programs = []
    for m, k, n, kind in expert_shapes():
        gated = kind == "gate_up"
        n_out = n // 2 if gated else n
        cfg = default_config(m, k, n_out, gated, 132)
        programs.append(-(-n_out // cfg.block_n) * cfg.split_k)
    assert programs == [160, 128, 128, 128]  # gate/up: 128 tiles of 32 (x2) columns, one split
    assert default_config(51, 2048, 1024, False, 132)[:3] == (32, 64, 4)  # Wo: 32 tiles x 4 splits
    assert default_config(51, 1024, 4096, True, 132).num_stages == 8
    # Enough column tiles already: no split; at most one split per K block; given values win.
    assert default_config(51, 1024, 16384, False, 132).split_k == 1
    assert default_config(51, 1024, 1600, False, 132).split_k == 3  # 50 tiles: 150 programs, not 100
    assert default_config(51, 256, 64, False, 132).split_k == 4  # 2 tiles; 4 K blocks of 64
    assert default_config(51, 256, 64, False, 132, block_k=128).split_k == 2
    assert default_config(51, 1024, 2560, False, 132, block_n=32, split_k=5) == (32, 64, 5, 4, 8)
    # More rows, a bigger x tile per stage: fewer stages (the shared memory), 8 warps over 128 rows.
    assert default_config(102, 2048, 1024, False, 132)[3:] == (4, 8)
    assert default_config(102, 1024, 4096, True, 132)[3:] == (4, 6)
    assert default_config(204, 2048, 1024, False, 132)[3:] == (8, 4)
    assert default_config(204, 1024, 4096, True, 132)[3:] == (8, 4)
    assert default_config(128, 32, 1024, False, 132, x_bytes=4).num_stages == 4  # Pi0's float32 noise in


def test_split_plan_launches_no_empty_split():
    assert split_plan(256, 64, 3) == (128, 2)  # 4 blocks asked in 3 splits: 2 splits of 2
    assert split_plan(1024, 128, 3) == (384, 3)  # 8 blocks: 3 + 3 + 2
    assert split_plan(96, 32, 10) == (32, 3)  # at most one split per block
    assert split_plan(33, 16, 1) == (48, 1)
    assert split_plan(0, 16, 4) == (16, 1)


def test_importing_skinny_gemm_does_not_import_triton():
    code = "import sys, kvreuse.model.skinny_gemm; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_inputs_and_missing_triton(monkeypatch):
    x, w, _, _ = _data((skinny_gemm.MAX_M + 1,), 32, 48, torch.float32)
    with pytest.raises(ValueError, match=f"at most {skinny_gemm.MAX_M} rows"):
        skinny_linear(x, w)
    x, w, _, _ = _data((2, 3), 32, 48, torch.float32)
    with pytest.raises(ValueError, match="last dim"):
        skinny_linear(x, w.t())
    with pytest.raises(ValueError, match="dtypes"):
        skinny_linear(x.to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="even number"):
        skinny_linear(x, w[:, :47], gated_gelu=True)
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x, w, bias=torch.zeros(24))
    with pytest.raises(ValueError, match="residual"):
        skinny_linear(x, w, residual=torch.zeros(6, 48))
    with pytest.raises(ValueError, match="power of two"):
        skinny_linear(x, w, block_n=24)
    with pytest.raises(ValueError, match="split_k"):
        skinny_linear(x, w, split_k=0)
    monkeypatch.setattr(skinny_gemm, "HAVE_TRITON", False)
    with pytest.raises(RuntimeError, match="triton"):
        skinny_linear(x, w)


@pytest.mark.parametrize("gemm", ["fused", "triton", "chain"])
@pytest.mark.parametrize("name", ["tiny-pi0", "tiny-pi05"])
@torch.no_grad()
def test_fast_runtime_with_fused_expert_matches_eager(name, gemm, monkeypatch):
    """FastPi0(expert_gemm="fused" / "triton" / "chain") runs every expert layer through
    fused_qkv (QKV, rotary, cache write) and skinny_linear (gate/up + GELU) [+ skinny residual
    products; chain: which also return the next norm, and the per-step input / output projections
    (Pi0: folded input + silu, time MLP out + layer-0 norm; Pi0.5: input + adaptive norm) and the
    Euler update] and still computes the eager model's actions; batches over 64 suffix rows fall
    back to cuBLAS (skinny_rows; by default batch 1-2 of the full-size experts)."""
    from kvreuse.bench import build_random, rel_err, synthetic_obs
    from kvreuse.model import fast as fast_mod
    from kvreuse.model import preset

    calls = []
    for fn in ("skinny_linear", "fused_qkv"):
        real = getattr(fast_mod, fn)
        monkeypatch.setattr(fast_mod, fn, lambda *a, real=real, fn=fn, **k: calls.append((fn, k)) or real(*a, **k))
    cfg = preset(name)
    model = build_random(cfg, "cpu", dtype=torch.float32, seed=0)
    rows = 2 * cfg.suffix_len
    fast = fast_mod.FastPi0(model, expert_gemm=gemm, skinny_rows=rows)
    g = torch.Generator().manual_seed(1)
    glue = (2 if cfg.adarms else 3) if gemm == "chain" else 0
    per_step = (2 if gemm == "fused" else 4) * cfg.expert.depth + glue
    for batch in (1, 2, 3):  # fused (<= skinny_rows suffix rows), then the cuBLAS fallback
        calls.clear()
        obs = synthetic_obs(cfg, batch, "cpu", g)
        noise = torch.randn(batch, cfg.chunk_size, cfg.max_action_dim, generator=g)
        ref = model.sample_actions(obs, noise)
        out = fast.sample_actions(obs, noise)
        assert rel_err(out, ref) < 1e-4
        fused = batch * cfg.suffix_len <= rows
        assert len(calls) == (per_step * cfg.num_steps if fused else 0)
        if fused:
            assert sum(fn == "fused_qkv" for fn, _ in calls) == cfg.expert.depth * cfg.num_steps
            assert sum(bool(k.get("gated_gelu")) for _, k in calls) == cfg.expert.depth * cfg.num_steps
            # chain: both residual products hand back the following norm (the last one the final norm)
            normed = sum(k.get("norm") is not None for _, k in calls)
            assert normed == ((2 * cfg.expert.depth + 1) * cfg.num_steps if gemm == "chain" else 0)
            if gemm == "chain":  # Euler update in place; Pi0's folded input projection ends in silu
                assert sum(k.get("out") is k.get("residual") is not None for _, k in calls) == cfg.num_steps
                assert sum(bool(k.get("silu")) for _, k in calls) == (0 if cfg.adarms else cfg.num_steps)
    assert not fast.expert_pdl  # no programmatic dependent launch off the GPU (nor in the interpreter)
    assert fast_mod.FastPi0(model, expert_gemm=gemm).skinny_rows == skinny_gemm.SKINNY_ROWS == 128
    with pytest.raises(ValueError, match="skinny_rows"):
        fast_mod.FastPi0(model, expert_gemm=gemm, skinny_rows=skinny_gemm.MAX_M + 1)


# ---- fusions for the expert's layers --------------------------------------------------------------
@pytest.mark.parametrize("split_k", [1, 3])
def test_column_gate_before_the_residual(split_k):
    x, w, _, residual = _data((5,), 96, 48, torch.bfloat16, seed=7)
    gate = torch.randn(48, generator=torch.Generator().manual_seed(8))
    out = skinny_linear(x, w, residual=residual, col_scale=gate, split_k=split_k, block_n=16, block_k=32)
    ref = (x.float() @ w.float()) * gate + residual.float()
    _check(out, ref, torch.bfloat16)


def test_column_gate_is_checked():
    x, w, _, _ = _data((5,), 64, 48, torch.float32)
    with pytest.raises(ValueError, match="col_scale"):
        skinny_linear(x, w, col_scale=torch.ones(47))


def _rope_ref(x, cos, sin):
    """rotate-half rotary, x (..., D) and cos / sin (..., D/2) broadcastable."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("b,r,heads,kv_heads,d,block_n", [(1, 51, 4, 1, 32, 16), (2, 5, 2, 2, 64, 16), (3, 3, 4, 1, 32, 32), (2, 51, 2, 1, 16, 16)])
def test_fused_qkv_matches_linear_rope_and_writes_the_cache(b, r, heads, kv_heads, d, block_n, with_bias, dtype):
    from kvreuse.model.skinny_gemm import fused_qkv

    g = torch.Generator().manual_seed(9)
    k, t, start = 96, 20 + r, 17
    x = (torch.randn(b, r, k, generator=g) * 2 + 0.5).to(dtype)
    n = (heads + 2 * kv_heads) * d
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).t()
    bias = torch.randn(n, generator=g) if with_bias else None
    pos = torch.randint(0, 300, (b, r), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = pos[..., None] * inv
    cos, sin = ang.cos().reshape(b * r, d // 2), ang.sin().reshape(b * r, d // 2)
    kb = torch.zeros(b, t, kv_heads, d, dtype=dtype)
    vb = torch.zeros_like(kb)
    kb_before, vb_before = kb.clone(), vb.clone()
    q = fused_qkv(x, w, kb, vb, start, cos, sin, heads, kv_heads, bias=bias, block_n=block_n, block_k=32)

    y = x.float() @ w.float() + (bias if with_bias else 0.0)
    y = y.view(b, r, heads + 2 * kv_heads, d)
    cs = cos.view(b, r, 1, d // 2)
    sn = sin.view(b, r, 1, d // 2)
    q_ref = _rope_ref(y[:, :, :heads], cs, sn)
    k_ref = _rope_ref(y[:, :, heads : heads + kv_heads], cs, sn)
    v_ref = y[:, :, heads + kv_heads :]
    _check(q, q_ref, dtype)
    _check(kb[:, start : start + r], k_ref, dtype)
    _check(vb[:, start : start + r], v_ref, dtype)
    # Nothing outside the written rows moved.
    for buf, before in ((kb, kb_before), (vb, vb_before)):
        assert torch.equal(buf[:, :start], before[:, :start]) and torch.equal(buf[:, start + r :], before[:, start + r :])


def test_fused_qkv_rejects_bad_shapes():
    from kvreuse.model.skinny_gemm import fused_qkv

    x = torch.randn(1, 4, 32)
    w = torch.randn(32, 6 * 16)
    kb = torch.zeros(1, 10, 1, 16)
    tab = torch.zeros(4, 8)
    fused_qkv(x, w, kb, kb.clone(), 6, tab, tab, 4, 1)  # fits: no error
    with pytest.raises(ValueError, match="columns"):
        fused_qkv(x, w[:, :80], kb, kb.clone(), 6, tab, tab, 4, 1)
    with pytest.raises(ValueError, match="do not fit"):
        fused_qkv(x, w, kb, kb.clone(), 7, tab, tab, 4, 1)
    with pytest.raises(ValueError, match="cos"):
        fused_qkv(x, w, kb, kb.clone(), 0, tab[:3], tab, 4, 1)
    with pytest.raises(ValueError, match="k_buf"):
        fused_qkv(x, w, torch.zeros(1, 10, 2, 16), kb.clone(), 0, tab, tab, 4, 1)


def test_auto_expert_gemm_follows_the_measurements(monkeypatch):
    from kvreuse.model import fast as fast_mod
    from kvreuse.model.fast import resolve_gemm

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_gemm("auto", cuda) == "chain"  # Pi0 and Pi0.5, compiled or not
    assert resolve_gemm("auto", cpu) == "torch"
    assert resolve_gemm("fused", cpu) == "fused"
    monkeypatch.setattr(fast_mod, "HAVE_TRITON", False)
    assert resolve_gemm("auto", cuda) == "torch"


# ---- norms out of the reduce kernel (the "chain" expert) ---------------------------------------------
def _rms(y, eps):
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["weight", "adaptive", "plain"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_residual_product_also_returns_the_row_norm(kind, split_k, dtype):
    """skinny_linear(norm=RowNorm) returns (out, normed): normed is the RMS norm of the rounded
    out (x weight, or x scale1p + shift per table row), even with a single split (the reduce kernel
    runs anyway)."""
    x, w, _, residual = _data((2, 3), 96, 40, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    eps = 1e-6
    weight = (1 + 0.1 * torch.randn(40, generator=g)).to(dtype)
    s1p, shift = (torch.randn(2, 1, 40, generator=g).to(dtype) for _ in range(2))  # one table per batch row
    gate = torch.randn(40, generator=g)
    norm = {"weight": RowNorm(eps, weight), "adaptive": RowNorm(eps, None, s1p, shift), "plain": RowNorm(eps)}[kind]
    out, normed = skinny_linear(x, w, residual=residual, col_scale=gate, norm=norm, split_k=split_k,
                                block_n=16, block_k=32)
    ref = (x.float() @ w.float()) * gate + residual.float()
    _check(out, ref, dtype)
    h = _rms(out.float(), eps)
    if kind == "weight":
        h = h * weight.float()
    elif kind == "adaptive":
        h = h * s1p.float() + shift.float()
    _check(normed, h, dtype)
    assert normed.shape == out.shape == (2, 3, 40)


def test_row_norm_is_checked():
    x, w, _, _ = _data((4,), 64, 48, torch.float32)
    with pytest.raises(ValueError, match="gated_gelu"):
        skinny_linear(x, w, gated_gelu=True, norm=RowNorm(1e-6))
    with pytest.raises(ValueError, match="norm weight"):
        skinny_linear(x, w, norm=RowNorm(1e-6, torch.ones(47)))
    with pytest.raises(ValueError, match="both scale1p and shift"):
        skinny_linear(x, w, norm=RowNorm(1e-6, None, torch.ones(1, 48)))
    with pytest.raises(ValueError, match="tables"):
        skinny_linear(x, w, norm=RowNorm(1e-6, None, torch.ones(3, 48), torch.ones(3, 48)))


def test_programmatic_dependent_launch_needs_a_hopper_gpu():
    from kvreuse.bench import build_random
    from kvreuse.model import preset
    from kvreuse.model.fast import FastPi0
    from kvreuse.model.kernels import pdl_supported

    assert not pdl_supported(torch.device("cpu"))
    model = build_random(preset("tiny-pi0"), "cpu", dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="expert_pdl"):
        FastPi0(model, expert_gemm="chain", expert_pdl=True)
    with pytest.raises(ValueError, match="expert_pdl"):
        FastPi0(model, expert_gemm="triton", expert_pdl=True)
    assert not FastPi0(model, expert_gemm="chain").expert_pdl


# ---- the denoise loop's own products: silu, float32 inputs, caller-given outputs -------------------
@pytest.mark.parametrize("split_k", [1, 2])
def test_silu_epilogue_and_float32_input_rounded_to_the_weights_dtype(split_k):
    x, w, bias, _ = _data((6,), 64, 48, torch.float32, seed=11)
    wb = w.to(torch.bfloat16)
    kw = dict(bias=bias, silu=True, split_k=split_k, block_n=16, block_k=32)
    # x already on the bf16 grid: exactly the bf16 product (float32 sums), then silu
    xb = x.to(torch.bfloat16).float()
    out = skinny_linear(xb, wb, **kw)
    assert out.dtype == torch.float32  # x's dtype unless out= says otherwise
    ref = F.silu(xb @ wb.float() + bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # any float32 x: within one bf16 step of each x element (the interpreter truncates, the GPU rounds)
    pre = skinny_linear(x, wb, bias=bias, split_k=split_k, block_n=16, block_k=32)
    exact = x @ wb.float() + bias
    assert ((pre - exact).abs() <= 2**-7 * (x.abs() @ wb.float().abs()) + 1e-5).all()
    assert (pre - exact).abs().max() > 0  # x really went through bf16


@pytest.mark.parametrize("split_k", [1, 3])
def test_outputs_into_caller_buffers_and_in_place_residual(split_k):
    x, w, bias, _ = _data((1, 5), 64, 32, torch.bfloat16, seed=12)
    # rows 1.. of a (1, 6, 32) buffer: one row stride; row 0 must survive
    buf, nbuf = torch.full((1, 6, 32), 7.0, dtype=torch.bfloat16), torch.full((1, 6, 32), 7.0, dtype=torch.bfloat16)
    nw = torch.rand(32) + 0.5
    out, normed = skinny_linear(x, w, bias=bias, norm=RowNorm(1e-6, nw), out=buf[:, 1:], normed_out=nbuf[:, 1:],
                                split_k=split_k, block_n=16, block_k=32)
    assert out.data_ptr() == buf[:, 1:].data_ptr() and normed.data_ptr() == nbuf[:, 1:].data_ptr()
    ref = _ref(x, w, bias)
    _check(buf[:, 1:], ref, torch.bfloat16)
    _check(nbuf[:, 1:], _rms(buf[:, 1:].float(), 1e-6) * nw, torch.bfloat16)
    assert (buf[:, 0] == 7).all() and (nbuf[:, 0] == 7).all()
    # Euler-style update: x32 += step * (h @ w + bias), in place, float32 out of bf16 products
    x32 = torch.randn(1, 5, 32)
    before = x32.clone()
    step = torch.full((32,), -0.1)
    skinny_linear(x, w, bias=bias, col_scale=step, residual=x32, out=x32, split_k=split_k, block_n=16, block_k=32)
    torch.testing.assert_close(x32, before + step * ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_k", [1, 3])
def test_outputs_into_rows_of_every_batch_entry(split_k):
    """out / normed_out as rows 1.. of each entry of a (B, S, N) buffer (Pi0's suffix at batch > 1):
    two strides, rows written in place, row 0 of every entry untouched."""
    x, w, bias, _ = _data((3, 5), 64, 32, torch.bfloat16, seed=13)
    buf, nbuf = (torch.full((3, 6, 32), 7.0, dtype=torch.bfloat16) for _ in range(2))
    nw = torch.rand(32) + 0.5
    out, normed = skinny_linear(x, w, bias=bias, norm=RowNorm(1e-6, nw), out=buf[:, 1:], normed_out=nbuf[:, 1:],
                                split_k=split_k, block_n=16, block_k=32)
    assert out.data_ptr() == buf[:, 1:].data_ptr() and normed.data_ptr() == nbuf[:, 1:].data_ptr()
    _check(buf[:, 1:], _ref(x, w, bias), torch.bfloat16)
    _check(nbuf[:, 1:], _rms(buf[:, 1:].float(), 1e-6) * nw, torch.bfloat16)
    assert (buf[:, 0] == 7).all() and (nbuf[:, 0] == 7).all()
    if split_k == 1:  # the direct epilogue (no reduce kernel) too
        buf2 = torch.full((3, 6, 32), 7.0, dtype=torch.bfloat16)
        skinny_linear(x, w, bias=bias, out=buf2[:, 1:], block_n=16, block_k=32, split_k=1)
        assert torch.equal(buf2[:, 1:], buf[:, 1:]) and (buf2[:, 0] == 7).all()


def test_output_buffers_are_checked():
    x, w, _, _ = _data((2, 5), 64, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="out must be"):
        skinny_linear(x, w, out=torch.empty(2, 5, 31, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unit last stride"):
        skinny_linear(x, w, out=torch.empty(2, 5, 64, dtype=torch.bfloat16)[..., ::2])
    # leading dims that do not merge into one batch stride
    x3 = torch.randn(2, 3, 5, 64, dtype=torch.bfloat16)
    crossed = torch.empty(3, 2, 5, 32, dtype=torch.bfloat16).transpose(0, 1)
    with pytest.raises(ValueError, match="one stride apart in each batch entry; got strides out"):
        skinny_linear(x3, w, out=crossed)
    with pytest.raises(ValueError, match="normed_out"):
        skinny_linear(x3, w, norm=RowNorm(1e-6), normed_out=crossed)
    with pytest.raises(ValueError, match="normed_out= needs norm"):
        skinny_linear(x, w, normed_out=torch.empty(2, 5, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="pick one"):
        skinny_linear(x, torch.cat([w, w], 1), gated_gelu=True, silu=True)
    with pytest.raises(ValueError, match="dtypes differ"):  # only float32 x may meet a narrower w
        skinny_linear(x, w.float())
