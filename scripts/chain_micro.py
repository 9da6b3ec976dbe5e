"""Micro-benchmark of the expert's "chain" layer kernels in CUDA graphs: PDL off / on, L2 weight
prefetch in every product or only in fused_qkv, the attention's K/V prefetch, fp8 weights; then
(SWEEP=1, default) tiling sweeps per kernel with NORM_ROWS=1. Pi0 expert shapes, random weights;
`same` = bit-identical to the first variant (fp8 variants: rel. L2 error vs it instead).
Usage (one sm_90 GPU): PYTHONPATH=src python3 scripts/chain_micro.py"""

import functools
import os

import torch
from attn_tune import _time_us  # same CUDA-graph timing

from kvreuse.model import fast as fast_mod
from kvreuse.model import skinny_gemm as sg
from kvreuse.model.fast import _expert_layer_chain
from kvreuse.model.kernels import mqa_attention
from kvreuse.model.skinny_gemm import RowNorm, fused_qkv, quantize_fp8, skinny_linear

dev, dt = "cuda", torch.bfloat16
L, W, F, H, D, T, R, STEPS = 18, 1024, 4096, 8, 256, 560, 51, 10
g = torch.Generator(device=dev).manual_seed(0)


def rn(*s, scale=0.02):
    return (torch.randn(*s, device=dev, generator=g) * scale).to(dt)


layers = [dict(qkv=rn((H + 2) * D, W), o_t=rn(W, H * D).t(), gate_up=rn(2 * F, W), down_t=rn(W, F).t(),
               in_norm=1 + rn(W), post_norm=1 + rn(W)) for _ in range(L)]
kb = [rn(1, T + R, 1, D, scale=1.0) for _ in range(L)]
vb = [rn(1, T + R, 1, D, scale=1.0) for _ in range(L)]
cos = torch.rand(R, D // 2, device=dev)
sin = torch.rand(R, D // 2, device=dev)
bias = torch.zeros(1, 1, R * H, T + R, device=dev, dtype=dt)
x0 = rn(1, R, W, scale=1.0)
fp8 = []  # per layer: (qkv, o_t, gate_up, down_t) as fp8 and their scales
for w in layers:
    (a, sa), (b, sb), (c, sc), (d, sd) = (quantize_fp8(m) for m in (w["qkv"], w["o_t"].t(), w["gate_up"], w["down_t"].t()))
    fp8.append((dict(qkv=a, o_t=b.t(), gate_up=c, down_t=d.t()), (sa, sb, sc, sd)))


def timed(fn):
    """(median ms per replay of one captured call of fn, its output)."""
    us, out = _time_us(fn, reps=1, trials=20, return_out=True)
    return us / 1e3, out


def chain(pdl, use_fp8=False):
    def fn():
        h = x0.clone()
        hn = torch.nn.functional.rms_norm(h, (W,), layers[0]["in_norm"], 1e-6)
        for _ in range(STEPS):
            for li, w in enumerate(layers):
                nxt = RowNorm(1e-6, layers[(li + 1) % L]["in_norm"])
                m, sc = fp8[li] if use_fp8 else (w, None)
                h, hn = _expert_layer_chain(h, hn, m["qkv"], m["o_t"], w["post_norm"], m["gate_up"], m["down_t"],
                                            cos, sin, bias, kb[li], vb[li], T, H, 1, 1e-6, None, nxt, pdl, sc)
        return hn
    return fn


def repeat(op, pdl, n=180, **kw):
    def fn():
        for i in range(n):
            out = op(i % L, pdl, **kw)
        return out
    return fn


a_in = rn(1, R, H * D, scale=1.0)
act_in = rn(1, R, F, scale=1.0)
def q8(li, name):
    return fp8[li][0][name], fp8[li][1][("qkv", "o_t", "gate_up", "down_t").index(name)]


ops = {
    "qkv": lambda li, p, **kw: fused_qkv(x0, layers[li]["qkv"].t(), kb[li], vb[li], T, cos, sin, H, 1, pdl=p, **kw),
    "attn": lambda li, p, **kw: mqa_attention(fused_q, kb[li], vb[li], bias[:, 0, ::H], pdl=p, **kw),
    "o+norm": lambda li, p, **kw: skinny_linear(a_in, layers[li]["o_t"], residual=x0, norm=RowNorm(1e-6, layers[li]["post_norm"]), pdl=p, **kw),
    "gate_up": lambda li, p, **kw: skinny_linear(x0, layers[li]["gate_up"].t(), gated_gelu=True, pdl=p, **kw),
    "down+norm": lambda li, p, **kw: skinny_linear(act_in, layers[li]["down_t"], residual=x0, norm=RowNorm(1e-6, layers[li]["in_norm"]), pdl=p, **kw),
    "qkv8": lambda li, p, **kw: fused_qkv(x0, q8(li, "qkv")[0].t(), kb[li], vb[li], T, cos, sin, H, 1, pdl=p, w_scale=q8(li, "qkv")[1], **kw),
    "o8+norm": lambda li, p, **kw: skinny_linear(a_in, q8(li, "o_t")[0], residual=x0, norm=RowNorm(1e-6, layers[li]["post_norm"]), pdl=p, w_scale=q8(li, "o_t")[1], **kw),
    "gate_up8": lambda li, p, **kw: skinny_linear(x0, q8(li, "gate_up")[0].t(), gated_gelu=True, pdl=p, w_scale=q8(li, "gate_up")[1], **kw),
    "down8+norm": lambda li, p, **kw: skinny_linear(act_in, q8(li, "down_t")[0], residual=x0, norm=RowNorm(1e-6, layers[li]["in_norm"]), pdl=p, w_scale=q8(li, "down_t")[1], **kw),
}
fused_q = rn(1, R, H, D, scale=1.0)
real_skinny, real_attn = fast_mod.skinny_linear, fast_mod.mqa_attention
# (name, pdl, prefetch in every product, attention K/V prefetch, fp8 weights)
variants = [("off", 0, False, False, False), ("pdl", 1, False, False, False), ("pdl all-prefetch", 1, True, False, False),
            ("pdl attn-prefetch", 1, False, True, False), ("pdl fp8", 1, False, False, True),
            ("pdl fp8 attn-prefetch", 1, False, True, True)]
print(torch.cuda.get_device_name(), torch.__version__)
ref = None
for name, p, pf, apf, f8 in variants:
    fast_mod.skinny_linear = functools.partial(real_skinny, prefetch=True) if pf else real_skinny
    fast_mod.mqa_attention = functools.partial(real_attn, prefetch=True) if apf else real_attn
    ms, out = timed(chain(p, f8))
    ref = out.clone() if ref is None else ref
    same = f"err={((out.float() - ref.float()).norm() / ref.float().norm()).item():.2e}" if f8 else f"same={torch.equal(out, ref)}"
    print(f"{name:<22} chain 10 x 18 layers {ms:7.3f} ms ({ms / (STEPS * L) * 1e3:5.1f} us/layer) {same}", flush=True)
fast_mod.skinny_linear, fast_mod.mqa_attention = real_skinny, real_attn
if os.environ.get("SWEEP", "1") != "1":
    raise SystemExit


def sweep(op, grid, pdls=(0, 1)):
    for kw in grid:
        for p in pdls:
            try:
                t, _ = timed(repeat(ops[op], p, **kw))
                print(f"{op:<10} pdl={p} {kw} {t / 180 * 1e3:5.2f} us", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{op:<10} pdl={p} {kw} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)


sg.NORM_ROWS = int(os.environ.get("NORM_ROWS", "1"))
one = (1,)
sweep("attn", [dict(prefetch=pf, block_m=bm, block_n=bn, num_splits=ns) for pf in (False, True)
               for bm, bn, ns in ((16, 64, 5), (16, 64, 10), (32, 64, 5))], one)
for op in ("qkv", "o+norm", "gate_up", "down+norm", "qkv8", "o8+norm", "gate_up8", "down8+norm"):
    sweep(op, [{}], one)  # defaults, bf16 vs fp8
sweep("gate_up8", [dict(block_n=bn, block_k=bk, num_stages=st) for bn, bk, st in
                   ((32, 256, 3), (32, 256, 4), (64, 128, 4), (16, 256, 4), (32, 128, 6), (64, 256, 3))], one)
sweep("o8+norm", [dict(block_n=bn, split_k=sk, block_k=bk) for bn, sk, bk in
                  ((32, 2, 256), (32, 4, 256), (64, 4, 128), (64, 2, 256), (16, 4, 128))], one)
sweep("down8+norm", [dict(block_n=bn, split_k=sk, block_k=bk) for bn, sk, bk in
                     ((32, 2, 256), (32, 4, 256), (64, 4, 128), (64, 2, 256), (32, 8, 128))], one)
sweep("qkv8", [dict(prefetch=True, block_n=bn, block_k=bk, num_stages=st) for bn, bk, st in
               ((16, 128, 4), (32, 64, 4), (32, 128, 3), (16, 256, 3))], one)
if os.environ.get("SWEEP_BF16", "0") != "1":
    raise SystemExit
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
