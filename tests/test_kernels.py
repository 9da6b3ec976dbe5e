"""The Triton split-K attention (model/kernels.py) computes masked multi-query attention.

Runs on CPU through Triton's interpreter. Triton reads TRITON_INTERPRET when it is imported (its
own tl helpers are jit functions too), so the variable is set before anything imports triton;
kvreuse.model.kernels imports it only on the first call. GPU speed is the benchmark's business.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # tests/conftest.py does the same when there is no GPU

import math
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
if type(triton.language.zeros).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

from kvreuse.model import kernels
from kvreuse.model.kernels import mqa_attention

NEG = -2.3819763e38  # the runtime's NEG_INF



def _ref(q, k, v, bias):
    """fp32 softmax(q k^T / sqrt(D) + bias) v; query heads grouped over the KV heads."""
    b, r, h, d = q.shape
    hkv = k.shape[2]
    qf = q.float().view(b, r, hkv, h // hkv, d)
    s = torch.einsum("brkgd,btkd->bkgrt", qf, k.float()) / math.sqrt(d)
    if bias is not None:
        s = s + bias.float().expand(b, r, -1)[:, None, None]
    o = torch.einsum("bkgrt,btkd->brkgd", s.softmax(-1), v.float())
    return o.reshape(b, r, h * d)


def _qkv(b, r, h, d, t, dtype, hkv=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, r, h, d, generator=g).to(dtype)
    k = torch.randn(b, t, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, t, hkv, d, generator=g).to(dtype)
    return q, k, v


def _pi0_bias(valid_prefix: torch.Tensor, r: int, neg: float = NEG) -> torch.Tensor:
    """(B, R, P + R): padded prefix keys masked per batch row; suffix token 0 (state) cannot see
    the R - 1 action keys after it, the action tokens see the whole suffix."""
    b, p = valid_prefix.shape
    bias = torch.zeros(b, r, p + r)
    bias[:, :, :p].masked_fill_(~valid_prefix[:, None, :], neg)
    bias[:, 0, p + 1 :] = neg
    return bias


def _check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, None])
def test_splits_with_a_fully_masked_split(dtype, num_splits):
    # T = 37, BLOCK_N = 16: key blocks [0,16) [16,32) [32,37); with 3 splits the middle one sees
    # only masked keys; 20 query rows over BLOCK_M = 16 leave a partial row tile.
    b, r, h, d, t = 2, 5, 4, 32, 37
    q, k, v = _qkv(b, r, h, d, t, dtype)
    bias = torch.zeros(b, r, t)
    bias[:, :, 16:32] = NEG
    out = mqa_attention(q, k, v, bias, num_splits, block_m=16, block_n=16)
    _check(out, _ref(q, k, v, bias), dtype)


@pytest.mark.parametrize("neg", [NEG, -1e30, float("-inf")])
def test_masked_keys_contribute_exactly_zero(neg):
    b, r, h, d, t = 2, 5, 4, 32, 37
    q, k, v = _qkv(b, r, h, d, t, torch.bfloat16)
    bias = torch.zeros(b, r, t)
    bias[:, :, 16:32] = neg  # a whole split
    bias[1, :, 3:9] = neg  # keys inside mixed splits
    bias[0, 2, 33:] = neg
    masked = (bias == neg).all(1)[..., None, None].expand_as(v)  # masked for every query of a row
    v_zero = v.masked_fill(masked, 0.0)
    v_huge = v.masked_fill(masked, 3e4)
    o_zero = mqa_attention(q, k, v_zero, bias, 3, block_m=16, block_n=16)
    o_huge = mqa_attention(q, k, v_huge, bias, 3, block_m=16, block_n=16)
    assert torch.equal(o_zero, o_huge)
    _check(o_zero, _ref(q, k, v_zero, bias), torch.bfloat16)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_pi0_block_mask_and_key_padding(num_splits):
    b, r, h, d, p = 2, 5, 4, 32, 32
    valid = torch.ones(b, p, dtype=torch.bool)
    valid[1, 20:] = False  # batch row 1: 12 padded prefix keys
    valid[0, 5:9] = False
    bias = _pi0_bias(valid, r)
    q, k, v = _qkv(b, r, h, d, p + r, torch.float32, seed=1)
    out = mqa_attention(q, k, v, bias, num_splits, block_m=16, block_n=16)
    _check(out, _ref(q, k, v, bias), torch.float32)
    # The mask matters: token 0 of batch row 1 differs from an unmasked run.
    free = mqa_attention(q, k, v, torch.zeros_like(bias), num_splits, block_m=16, block_n=16)
    assert not torch.allclose(out[1, 0], free[1, 0], atol=1e-3)


@pytest.mark.parametrize("d,h,b", [(16, 1, 1), (64, 3, 2), (128, 2, 1), (256, 1, 1)])
def test_generic_small_shapes(d, h, b):
    r, t = 3, 29
    q, k, v = _qkv(b, r, h, d, t, torch.float32, seed=2)
    bias = torch.zeros(b, r, t)
    bias[:, -1, :7] = NEG
    out = mqa_attention(q, k, v, bias, 2, block_m=16, block_n=16)
    _check(out, _ref(q, k, v, bias), torch.float32)


def test_strided_views_and_broadcast_bias():
    # k, v: slices along T of a bigger [layer, batch, T_buf, 1, D] buffer; q: the first H heads
    # of a fused (H + 1)-head projection; bias (B, 1, T) broadcast over the query tokens.
    b, r, h, d, t = 2, 5, 4, 32, 37
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(2, 3, b, 50, 1, d, generator=g)  # (k/v, layer, B, T_buf, 1, D)
    k, v = buf[0, 1, :, 6 : 6 + t], buf[1, 1, :, 6 : 6 + t]
    qk = torch.randn(b, r, h + 1, d, generator=g)
    q = qk[:, :, :h]
    assert not (q.is_contiguous() or k.is_contiguous())
    bias = torch.zeros(b, 1, t)
    bias[0, 0, 30:] = NEG
    out = mqa_attention(q, k, v, bias, 3, block_m=16, block_n=16)
    _check(out, _ref(q, k, v, bias), torch.float32)


def test_per_key_bias_is_read_as_a_vector_with_the_tile_results():
    # A stride-0 row axis (the prefix LM's padding mask) takes the kernel's vector path; the
    # same values made dense take the tile path. Different holes per batch row, bf16, 3 splits.
    b, r, h, d, t = 2, 9, 4, 32, 45
    q, k, v = _qkv(b, r, h, d, t, torch.bfloat16, seed=6)
    per_key = torch.zeros(b, t)
    per_key[0, 5:11] = NEG
    per_key[1, 30:] = NEG
    view = per_key[:, None, :].expand(b, r, t)
    assert view.stride(1) == 0
    out = mqa_attention(q, k, v, view, 3, block_m=16, block_n=16)
    dense = mqa_attention(q, k, v, view.contiguous(), 3, block_m=16, block_n=16)
    assert torch.equal(out, dense)
    _check(out, _ref(q, k, v, view), torch.bfloat16)


def test_grouped_kv_heads_and_no_bias():
    b, r, h, d, t = 2, 5, 4, 32, 37
    q, k, v = _qkv(b, r, h, d, t, torch.float32, hkv=2, seed=4)
    out = mqa_attention(q, k, v, None, 3, block_m=16, block_n=16)
    _check(out, _ref(q, k, v, None), torch.float32)


def test_pi0_full_size_bf16():
    # The action expert's shape: 51 suffix tokens x 8 heads over ~800 prefix + 51 suffix keys of
    # a bigger buffer; default blocks and splits.
    b, r, h, d, p = 1, 51, 8, 256, 800
    t = p + r
    g = torch.Generator().manual_seed(5)
    buf = torch.randn(2, b, t + 16, 1, d, generator=g).to(torch.bfloat16)
    k, v = buf[0, :, :t], buf[1, :, :t]
    q = torch.randn(b, r, h, d, generator=g).to(torch.bfloat16)
    valid = torch.ones(b, p, dtype=torch.bool)
    valid[0, 700:] = False
    bias = _pi0_bias(valid, r)
    out = mqa_attention(q, k, v, bias)
    _check(out, _ref(q, k, v, bias), torch.bfloat16)


def test_default_splits_fill_the_gpu():
    # Pi0 expert, BLOCK_M 64 / BLOCK_N 32: 7 row tiles, 27 key blocks, 132 SMs -> 18 splits asked,
    # which mqa_attention rounds to 2 blocks each = 14 splits, 98 programs.
    assert kernels.default_num_splits(7, 27, 132) == 18
    assert kernels.default_num_splits(13, 14, 132) == 10
    assert kernels.default_num_splits(200, 14, 132) == 1  # already enough tiles
    assert kernels.default_num_splits(1, 3, 132) == 3  # at most one split per key block


def test_importing_kernels_does_not_import_triton():
    code = "import sys, kvreuse.model.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_inputs_and_missing_triton(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 24, 5, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        mqa_attention(q, k, v, None)
    q, k, v = _qkv(1, 2, 2, 32, 5, torch.float32)
    with pytest.raises(ValueError, match="dtypes"):
        mqa_attention(q, k.half(), v, None)
    monkeypatch.setattr(kernels, "HAVE_TRITON", False)
    with pytest.raises(RuntimeError, match="triton"):
        mqa_attention(q, k, v, None)


@pytest.mark.parametrize("name", ["tiny-pi0", "tiny-pi05"])
@torch.no_grad()
def test_fast_runtime_with_triton_attention_matches_eager(name):
    """FastPi0(prefix_attn / expert_attn = "triton") wires the kernel in with the right mask rows."""
    from kvreuse.bench import build_random, rel_err, synthetic_obs
    from kvreuse.model import preset
    from kvreuse.model.fast import FastPi0

    cfg = preset(name)
    model = build_random(cfg, "cpu", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    obs = synthetic_obs(cfg, 2, "cpu", g)
    obs.token_mask[1, -3:] = False  # padded prompt in one batch row: its keys must be masked
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, generator=g)
    ref = model.sample_actions(obs, noise)
    out = FastPi0(model, prefix_attn="triton", expert_attn="triton").sample_actions(obs, noise)
    assert rel_err(out, ref) < 1e-4


def test_triton_loads_after_an_osmesa_env():
    """kvreuse's envs load Triton before MuJoCo picks OSMesa: libtriton loaded after OSMesa's LLVM
    crashes the process (a Meta-World eval on a GPU host with OSMesa rendering and the fast path)."""
    code = ("import os; os.environ['MUJOCO_GL'] = 'osmesa'; os.environ['PYOPENGL_PLATFORM'] = 'osmesa'\n"
            "from kvreuse.envs.metaworld import MetaWorldEnv\n"
            "env = MetaWorldEnv(image_size=32); env.reset('reach-v3', 0, 0)\n"
            "import triton; print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_prefix_sized_query_sets_take_big_row_tiles(monkeypatch):
    """From 1024 query rows (the prefix LM) the defaults switch to 64-row tiles, 4 warps and, with
    few key blocks, one split (no combine kernel); the result is the same attention."""
    b, r, h, d, t = 1, 130, 8, 32, 70  # 1040 query rows, keys with padding masked
    q, k, v = _qkv(b, r, h, d, t, torch.float32, seed=3)
    bias = torch.zeros(b, r, t)
    bias[:, :, 60:] = NEG
    seen = []
    build = kernels._build

    def spy():
        split, combine = build()
        wrap = lambda kern, name: type("K", (), {  # noqa: E731  records launch options, then launches
            "__getitem__": lambda self, grid: lambda *a, **kw: seen.append((name, grid, kw)) or kern[grid](*a, **kw)})()
        return wrap(split, "split"), wrap(combine, "combine")

    monkeypatch.setattr(kernels, "_build", spy)
    out = mqa_attention(q, k, v, bias)
    _check(out, _ref(q, k, v, bias), torch.float32)
    assert [(name, grid) for name, grid, _ in seen] == [("split", (1, 17, 1))]  # 1040 / 64 -> 17 row tiles
    assert seen[0][2]["BLOCK_M"] == 64 and seen[0][2]["num_warps"] == 4


def _rope_ref(qkv, cos_h, sin_h, heads, kv_heads, d):
    """What the runtime's torch path (_gemma_qkv) computes: rotate-half rotary on q and k in
    fp32, rounded once; v as it is."""
    b, r, _ = qkv.shape
    x = qkv.view(b, r, heads + 2 * kv_heads, d).float()
    c = cos_h.view(b, r, 1, d // 2).repeat(1, 1, 1, 2)
    s = sin_h.view(b, r, 1, d // 2)
    s = torch.cat([-s, s], -1)
    rot = x * c + x.roll(d // 2, -1) * s
    out = torch.where(torch.arange(heads + 2 * kv_heads)[None, None, :, None] < heads + kv_heads, rot, x)
    out = out.to(qkv.dtype)
    return out[:, :, :heads], out[:, :, heads : heads + kv_heads], out[:, :, heads + kv_heads :]


@pytest.mark.parametrize("with_idx", [False, True])
def test_rope_scatter_rotates_q_and_k_and_writes_the_cache_rows(with_idx):
    from kvreuse.model.rope_scatter import rope_scatter

    b, r, heads, kv_heads, d, t = 2, 13, 4, 2, 16, 40
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(b, r, (heads + 2 * kv_heads) * d, generator=g).to(torch.bfloat16)
    ang = torch.rand(b * r, d // 2, generator=g) * 6
    cos_h, sin_h = ang.cos(), ang.sin()
    k_buf = torch.zeros(b, t, kv_heads, d, dtype=torch.bfloat16)
    v_buf = torch.zeros_like(k_buf)
    idx = torch.randperm(t, generator=g)[:r] if with_idx else None
    start = 5
    q = rope_scatter(qkv, cos_h, sin_h, k_buf, v_buf, start, idx, heads, kv_heads, block_m=8)
    q_ref, k_ref, v_ref = _rope_ref(qkv, cos_h, sin_h, heads, kv_heads, d)
    rows = idx if with_idx else torch.arange(start, start + r)
    # fp32 math rounded once, as the torch path: at most one bf16 step apart (fp32 order / FMA)
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(k_buf[:, rows], k_ref, atol=1e-6, rtol=2**-7)
    assert torch.equal(v_buf[:, rows], v_ref)
    untouched = torch.ones(t, dtype=torch.bool)
    untouched[rows] = False
    assert not k_buf[:, untouched].any() and not v_buf[:, untouched].any()


def test_rope_scatter_refuses_bad_shapes():
    from kvreuse.model.rope_scatter import rope_scatter

    qkv = torch.zeros(1, 4, 6 * 16)
    tab = torch.zeros(4, 8)
    k = torch.zeros(1, 10, 1, 16)
    with pytest.raises(ValueError, match="columns"):
        rope_scatter(qkv, tab, tab, k, k.clone(), 0, None, 5, 1)  # 5 + 2 heads != 6
    with pytest.raises(ValueError, match="float32"):
        rope_scatter(qkv, tab.double(), tab, k, k.clone(), 0, None, 4, 1)
    with pytest.raises(ValueError, match="do not fit"):
        rope_scatter(qkv, tab, tab, k, k.clone(), 8, None, 4, 1)


@pytest.mark.parametrize("name", ["tiny-pi0", "tiny-pi05"])
@torch.no_grad()
def test_fast_runtime_with_the_rope_kernel_matches_eager(name):
    """FastPi0(rope_kernel=True): the prefix LM's rotary and K/V writes through rope_scatter, for
    a full prefix and a partial update (cache rows by index)."""
    from kvreuse.bench import build_random, rel_err, synthetic_obs
    from kvreuse.model import preset
    from kvreuse.model.fast import FastPi0

    cfg = preset(name)
    model = build_random(cfg, "cpu", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    obs, obs2 = synthetic_obs(cfg, 2, "cpu", g), synthetic_obs(cfg, 2, "cpu", g)
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, generator=g)
    fast = FastPi0(model, rope_kernel=True)
    assert fast.rope_kernel and not FastPi0(model).rope_kernel  # auto: CUDA only
    assert rel_err(fast.sample_actions(obs, noise), model.sample_actions(obs, noise)) < 1e-5
    base_e, base_f = model.encode_prefix(obs), fast.encode_prefix(obs)
    valid = base_e.mask[None, :, :, None, None]
    assert rel_err(base_f.k * valid, base_e.k * valid) < 1e-5
    rec = torch.zeros(cfg.prefix_len, dtype=torch.bool)
    rec[3:9] = True
    ue = model.update_prefix(base_e, obs2, rec, cfg.cameras, base_e.spans, 1)
    uf = fast.update_prefix(base_f, obs2, rec, cfg.cameras, base_f.spans, 1)
    valid = ue.mask[None, :, :, None, None]
    assert rel_err(uf.k * valid, ue.k * valid) < 1e-5 and rel_err(uf.v * valid, ue.v * valid) < 1e-5


def test_default_row_tiles_grow_with_the_batch(monkeypatch):
    """16-row query tiles while 16-row tiles over batch x KV heads stay within a quarter of the
    SMs (Pi0's and Pi0.5's expert at batch 1), 32 rows beyond (batch 2); the result is the same
    attention either way."""
    assert kernels.default_block_m(1, 51 * 8, 132) == 16  # Pi0's expert, batch 1: 26 tiles
    assert kernels.default_block_m(1, 50 * 8, 132) == 16  # Pi0.5's
    assert kernels.default_block_m(2, 51 * 8, 132) == 32  # batch 2: 52 tiles of 16
    assert kernels.default_block_m(1, 64 * 8, 132) == 16  # 64 recomputed prefix tokens: 32 tiles
    assert kernels.default_block_m(1, 70 * 8, 132) == 32  # 35 tiles
    assert kernels.default_block_m(1, 560 * 8, 132) == 64  # the prefix LM: from 1024 rows on
    seen = []
    real = kernels._build()[0]

    class Spy:
        def __getitem__(self, grid):
            seen.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "_KERNELS", (Spy(), kernels._KERNELS[1]))
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 8)  # 2 x 2 tiles of 16 exceed 8 // 4
    q, k, v = _qkv(2, 4, 8, 16, 40, torch.float32, seed=5)
    bias = _pi0_bias(torch.ones(2, 36, dtype=torch.bool), 4)
    out = mqa_attention(q, k, v, bias)
    assert seen[-1][:2] == (2, 1)  # 32 query rows (4 tokens x 8 heads) in one tile per batch row
    _check(out, _ref(q, k, v, bias), torch.float32)
    assert kernels.default_block_m(2, 4 * 8, 8) == 32 and kernels.default_block_m(1, 4 * 8, 8) == 16
