"""Micro-benchmark of the expert's "chain" layer kernels in CUDA graphs: PDL off / on, L2 weight
prefetch in every product or only in fused_qkv, then (SWEEP=1, default) round 4's tiling sweeps
per kernel with NORM_ROWS=1, or one of round 5's (SWEEP=stages|attn|splits|more|bias|asplits), or
none (SWEEP=0), or round 6's bounds (SWEEP=bound: without the reduce / combine kernels, and with
one layer's weights in all 18 so that they stay in L2); several as SWEEP=stages,splits.
CHAIN=pdl times only the chain as FastPi0 runs it before the sweeps. ATTN_SPLITS=n fixes the chain's
attention key splits, ATTN_BLOCK_M=n its query rows per program. Round 18: BATCH=b runs b x 51 rows
(SWEEP=bound's fewer-rows part assumes b = 1); SKINNY_WARPS=n gives the skinny kernels' tiles over 64
rows n warps. Pi0 expert shapes, random weights; `same` = bit-identical to the first variant.
Usage (one sm_90 GPU): PYTHONPATH=src python3 scripts/chain_micro.py"""

import functools
import os
import sys

import torch
from attn_tune import _time_us  # same CUDA-graph timing

from kvreuse.model import fast as fast_mod
from kvreuse.model import skinny_gemm as sg
from kvreuse.model.fast import _expert_layer_chain
from kvreuse.model.kernels import mqa_attention
from kvreuse.model.skinny_gemm import RowNorm, fused_qkv, skinny_linear

dev, dt = "cuda", torch.bfloat16
L, W, F, H, D, T, R, STEPS = 18, 1024, 4096, 8, 256, 560, 51, 10
B = int(os.environ.get("BATCH", "1"))
g = torch.Generator(device=dev).manual_seed(0)


def rn(*s, scale=0.02):
    return (torch.randn(*s, device=dev, generator=g) * scale).to(dt)


layers = [dict(qkv=rn((H + 2) * D, W), o_t=rn(W, H * D).t(), gate_up=rn(2 * F, W), down_t=rn(W, F).t(),
               in_norm=1 + rn(W), post_norm=1 + rn(W)) for _ in range(L)]
kb = [rn(B, T + R, 1, D, scale=1.0) for _ in range(L)]
vb = [rn(B, T + R, 1, D, scale=1.0) for _ in range(L)]
cos = torch.rand(B * R, D // 2, device=dev)
sin = torch.rand(B * R, D // 2, device=dev)
bias = torch.zeros(B, 1, R * H, T + R, device=dev, dtype=dt)
x0 = rn(B, R, W, scale=1.0)


def timed(fn):
    """(median ms per replay of one captured call of fn, its output)."""
    us, out = _time_us(fn, reps=1, trials=20, return_out=True)
    return us / 1e3, out


def chain(pdl, same_weights=False):
    def fn():
        h = x0.clone()
        hn = torch.nn.functional.rms_norm(h, (W,), layers[0]["in_norm"], 1e-6)
        for _ in range(STEPS):
            for li, w in enumerate(layers):
                w = layers[0] if same_weights else w  # one layer's 35 MB, L2-resident: a bound
                nxt = RowNorm(1e-6, layers[(li + 1) % L]["in_norm"])
                h, hn = _expert_layer_chain(h, hn, w["qkv"], w["o_t"], w["post_norm"], w["gate_up"], w["down_t"],
                                            cos, sin, bias, kb[li], vb[li], T, H, 1, 1e-6, None, nxt, pdl)
        return hn
    return fn


def repeat(op, pdl, n=180, one_layer=False, **kw):
    def fn():
        for i in range(n):
            out = op(0 if one_layer else i % L, pdl, **kw)
        return out
    return fn


a_in = rn(B, R, H * D, scale=1.0)
act_in = rn(B, R, F, scale=1.0)
ops = {
    "qkv": lambda li, p, **kw: fused_qkv(x0, layers[li]["qkv"].t(), kb[li], vb[li], T, cos, sin, H, 1, pdl=p, **kw),
    "attn": lambda li, p, **kw: mqa_attention(fused_q, kb[li], vb[li], bias[:, 0, ::H], pdl=p, **kw),
    "o+norm": lambda li, p, **kw: skinny_linear(a_in, layers[li]["o_t"], residual=x0, norm=RowNorm(1e-6, layers[li]["post_norm"]), pdl=p, **kw),
    "gate_up": lambda li, p, **kw: skinny_linear(x0, layers[li]["gate_up"].t(), gated_gelu=True, pdl=p, **kw),
    "down+norm": lambda li, p, **kw: skinny_linear(act_in, layers[li]["down_t"], residual=x0, norm=RowNorm(1e-6, layers[li]["in_norm"]), pdl=p, **kw),
}
fused_q = rn(B, R, H, D, scale=1.0)
ops["attn-keybias"] = lambda li, p, **kw: mqa_attention(fused_q, kb[li], vb[li], bias[:, 0, :1].expand(B, R, T + R),
                                                        pdl=p, **kw)  # one mask row for every token
ops["attn-nobias"] = lambda li, p, **kw: mqa_attention(fused_q, kb[li], vb[li], None, pdl=p, **kw)


def sweep(op, grid, pdls=(0, 1)):
    for kw in grid:
        for p in pdls:
            try:
                t, _ = timed(repeat(ops[op], p, **kw))
                print(f"{op:<10} pdl={p} {kw} {t / 180 * 1e3:5.2f} us", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{op:<10} pdl={p} {kw} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)


real_skinny, real_attn = fast_mod.skinny_linear, fast_mod.mqa_attention
# (name, pdl, L2 prefetch in every product, attention without its mask: a timing bound, wrong numbers)
variants = [("off", 0, False, False), ("pdl", 1, False, False), ("pdl all-prefetch", 1, True, False),
            ("pdl no-mask (bound)", 1, False, True)]
if os.environ.get("CHAIN") == "pdl":  # only the chain as FastPi0 runs it
    variants = variants[1:2]
if os.environ.get("SKINNY_WARPS"):
    sg._warps = lambda bm, n=int(os.environ["SKINNY_WARPS"]): 4 if bm <= 64 else n
if os.environ.get("ATTN_SPLITS"):  # the chain with the attention's key splits fixed (default: 5 for Pi0)
    real_attn = functools.partial(real_attn, num_splits=int(os.environ["ATTN_SPLITS"]))
if os.environ.get("ATTN_BLOCK_M"):  # the chain with the attention's query rows per program fixed
    real_attn = functools.partial(real_attn, block_m=int(os.environ["ATTN_BLOCK_M"]))
print(torch.cuda.get_device_name(), torch.__version__, f"batch {B} ({B * R} rows)")
ref = None
for name, p, pf, nomask in variants:
    fast_mod.skinny_linear = functools.partial(real_skinny, prefetch=True) if pf else real_skinny
    fast_mod.mqa_attention = (lambda q, k, v, b, **kw: real_attn(q, k, v, None, **kw)) if nomask else real_attn
    ms, out = timed(chain(p))
    ref = out.clone() if ref is None else ref
    same = torch.equal(out, ref)
    print(f"{name:<20} chain 10 x 18 layers {ms:7.3f} ms ({ms / (STEPS * L) * 1e3:5.1f} us/layer) same={same}", flush=True)
fast_mod.skinny_linear, fast_mod.mqa_attention = real_skinny, real_attn


class _Skip:
    """A kernel stand-in whose launches do nothing (timing bounds only)."""

    def __getitem__(self, grid):
        return lambda *a, **kw: None


def _unsplit(bn):
    """Residual products + norm as one unsplit product without the norm (a bound: wrong norms)."""
    def lin(*a, norm=None, **kw):
        if norm is None:
            return real_skinny(*a, **kw)
        out = real_skinny(*a, split_k=1, block_n=bn, **kw)
        return out, out
    return lin


if os.environ.get("SWEEP") == "bound":  # round 6: what removing the reduce / combine kernels could save
    kern, skin = sys.modules["kvreuse.model.kernels"], sg
    real_k, real_s = kern._KERNELS, skin._KERNELS
    for name, no_reduce, no_combine, lin in (
        ("no reduce (bound)", True, False, real_skinny), ("no combine (bound)", False, True, real_skinny),
        ("neither (bound)", True, True, real_skinny), ("unsplit bn32 no norm", False, False, _unsplit(32)),
        ("unsplit bn16 no norm", False, False, _unsplit(16)), ("baseline again", False, False, real_skinny),
        ("L2-resident weights", False, False, real_skinny),
    ):
        skin._KERNELS = (real_s[0], _Skip(), real_s[2]) if no_reduce else real_s
        kern._KERNELS = (real_k[0], _Skip()) if no_combine else real_k
        fast_mod.skinny_linear = lin
        ms, _ = timed(chain(1, same_weights=name == "L2-resident weights"))
        print(f"{name:<20} chain 10 x 18 layers {ms:7.3f} ms ({ms / (STEPS * L) * 1e3:5.1f} us/layer)", flush=True)
    skin._KERNELS, kern._KERNELS, fast_mod.skinny_linear = real_s, real_k, real_skinny
    for op in ("qkv", "attn", "o+norm", "gate_up", "down+norm"):  # each kernel: 18 layers' weights vs one's
        t18, _ = timed(repeat(ops[op], 1))
        t1, _ = timed(repeat(ops[op], 1, one_layer=True))
        print(f"{op:<10} pdl=1 18 layers {t18 / 180 * 1e3:5.2f} us, one layer (L2) {t1 / 180 * 1e3:5.2f} us", flush=True)
    # Fewer rows, same weights: what re-reading the activations (every column tile reads all of x) costs.
    for rows in (32, 16):
        few = {
            "qkv": lambda li, p, r=rows: fused_qkv(
                x0[:, :r], layers[li]["qkv"].t(), kb[li], vb[li], T, cos[:r], sin[:r], H, 1, pdl=p),
            "o+norm": lambda li, p, r=rows: skinny_linear(
                a_in[:, :r], layers[li]["o_t"], residual=x0[:, :r], norm=RowNorm(1e-6, layers[li]["post_norm"]), pdl=p),
            "gate_up": lambda li, p, r=rows: skinny_linear(x0[:, :r], layers[li]["gate_up"].t(), gated_gelu=True, pdl=p),
            "down+norm": lambda li, p, r=rows: skinny_linear(
                act_in[:, :r], layers[li]["down_t"], residual=x0[:, :r], norm=RowNorm(1e-6, layers[li]["in_norm"]), pdl=p),
        }
        for op, fn in few.items():
            t18, _ = timed(repeat(fn, 1))
            print(f"{op:<10} pdl=1 {rows} rows (x {rows}/{R}) {t18 / 180 * 1e3:5.2f} us", flush=True)

# Round 5 (SWEEP=<name>; docs/PERFORMANCE.md): (op, tilings) pairs, each timed with PDL.
ROUND5 = {
    "stages": [  # more weight bytes in flight per program
        *((op, [dict(num_stages=st, block_k=bk, num_warps=nw) for bk in (128, 64) for st in (3, 4, 5, 6, 8)
                for nw in (4, 8)]) for op in ("o+norm", "down+norm")),
        ("gate_up", [dict(num_stages=st, block_k=bk) for bk, st in ((128, 4), (128, 5), (128, 6), (64, 6), (64, 8))]),
        ("qkv", [dict(num_stages=st, block_k=bk) for bk, st in ((64, 4), (64, 6), (64, 8), (128, 4), (128, 5))]),
    ],
    "attn": [  # attention stages / splits after the unrolled combine
        ("attn", [dict(num_stages=st, block_m=bm, block_n=bn, num_splits=ns) for bm, bn, ns in
                  ((16, 64, 5), (16, 64, 10), (16, 32, 10), (32, 64, 5)) for st in (2, 3, 4)]),
        ("o+norm", [{}]), ("down+norm", [{}]),
    ],
    "splits": [  # two programs per SM (smaller K slices) vs one
        *((op, [dict(split_k=sk, num_stages=st, block_n=bn) for bn, sk, st in
                ((32, 4, 8), (32, 8, 4), (32, 8, 8), (16, 4, 8), (16, 8, 4), (64, 8, 4), (64, 8, 8))])
          for op in ("o+norm", "down+norm")),
        ("gate_up", [dict(block_n=bn, num_stages=st, split_k=sk) for bn, st, sk in
                     ((32, 8, 1), (16, 8, 1), (32, 4, 2), (32, 8, 2), (64, 8, 2))]),
        ("qkv", [dict(block_n=bn, num_stages=st) for bn, st in ((16, 6), (8, 6), (16, 8), (32, 6))]),
    ],
    "more": [  # one attention step per program, warps, combine rows, QKV prefetch
        ("attn", [dict(num_stages=st, block_m=16, block_n=bn, num_splits=ns, num_warps=nw, combine_rows=cr)
                  for bn, ns, st, nw, cr in ((64, 5, 2, 8, 8), (128, 5, 1, 8, 8), (64, 5, 2, 4, 8), (64, 5, 2, 8, 4),
                                              (64, 5, 2, 8, 16), (128, 5, 1, 4, 8))]),
        ("qkv", [dict(prefetch=pf, num_stages=st) for pf, st in ((True, 6), (False, 6), (False, 8))]),
        ("gate_up", [dict(num_warps=nw, num_stages=st) for nw, st in ((4, 8), (8, 8), (8, 6))]),
    ],
    "bias": [("attn", [{}]), ("attn-keybias", [{}]), ("attn-nobias", [{}])],  # what the per-row mask costs
    "asplits": [("attn", [dict(num_splits=ns) for ns in (3, 4, 5, 6)])],  # key splits, after the cheaper combine
    "asplits2": [("attn", [dict(num_splits=ns, block_m=bm) for bm in (16, 32) for ns in (None, 2, 3, 4, 5, 6, 8)])],
}
modes = os.environ.get("SWEEP", "1").split(",")  # one or more, comma-separated
for mode in modes:
    for op, grid in ROUND5.get(mode, []):
        sweep(op, grid, (1,))
if "1" not in modes:
    raise SystemExit

sg.NORM_ROWS = int(os.environ.get("NORM_ROWS", "1"))
one = (1,)
sweep("qkv", [dict(prefetch=True, block_n=bn, block_k=bk, num_stages=st)
              for bn, bk, st in ((16, 64, 4), (16, 128, 4), (16, 64, 5), (8, 64, 4), (32, 64, 4), (16, 64, 3))], one)
sweep("attn", [dict(block_m=bm, block_n=bn, num_splits=ns) for bm, bn, ns in
               ((16, 64, 5), (64, 32, 10), (64, 32, 19), (32, 32, 10), (32, 32, 19), (64, 64, 10), (16, 32, 10),
                (32, 64, 10), (64, 16, 19))], one)
sweep("o+norm", [dict(block_n=bn, split_k=sk, prefetch=f) for f in (False, True)
                 for bn, sk in ((64, 8), (32, 4), (16, 2), (32, 2), (16, 4), (64, 4))], one)
sweep("down+norm", [dict(block_n=bn, split_k=sk, prefetch=f) for f in (False, True)
                    for bn, sk in ((64, 8), (32, 4), (16, 2), (32, 8), (16, 4), (64, 4))], one)
sweep("gate_up", [dict(block_n=bn, block_k=bk, num_stages=st, num_warps=nw) for bn, bk, st, nw in
                  ((32, 128, 3, 4), (32, 128, 4, 4), (16, 128, 4, 4), (32, 256, 2, 4), (64, 128, 3, 8), (32, 64, 3, 4))], one)
