"""Round 7: the persistent CUDA kernel for the expert's layer chain (kvreuse.model.megakernel)
against a float32 torch reference of the same layers (correctness) and against the Triton chain
FastPi0 runs today (time), at Pi0's full-size expert shapes with random weights.

    PYTHONPATH=src python3 scripts/megakernel_ab.py            # one sm_90 GPU with nvcc
    NSTAGES=6,8 PADS=8,16 ...                                  # ring depths, slot row padding
    BOUNDS=SAME_LAYER,NO_STAGE,NO_GFENCE,FULL_UNROLL ...       # compile-time variants (.cu)

SAME_LAYER: every layer streams layer 0's weights, which stay in L2 (wrong numbers). NO_STAGE: the
products skip staging their activations (wrong numbers). NO_GFENCE: no fence.proxy.async.global
before the TMA staging. FULL_UNROLL: the products' fragment loop fully unrolled. WGMMA: the
products on wgmma (operands from shared memory). (Earlier
versions' variants -- NO_MMA, A_BATCH, SMALL_TILE -- are in the round-7 logs and git history.)

Prints: max |diff| / max |x| after 18 layers (one Euler step's stack) and the median ms of 10
steps x 18 layers for both: the kernel timed with CUDA events around its (cooperative) launches,
the Triton chain with attn_tune._time_us (one CUDA graph per call, as the other tuning scripts)."""

import math
import os

import torch
import torch.nn.functional as F
from attn_tune import _time_us  # same CUDA-graph timing

from kvreuse.bench import time_fn
from kvreuse.model.fast import _expert_layer_chain, _norm, _rope_tables
from kvreuse.model.layers import rope
from kvreuse.model.megakernel import ExpertChain
from kvreuse.model.skinny_gemm import RowNorm

dev, dt = "cuda", torch.bfloat16
L, W, FF, H, D, T, R, STEPS = 18, 1024, 4096, 8, 256, 560, 51, 10
EPS = 1e-6
g = torch.Generator(device=dev).manual_seed(0)


def rn(*s, scale=0.02):
    return (torch.randn(*s, device=dev, generator=g) * scale).to(dt)


layers = [dict(qkv=rn((H + 2) * D, W), o=rn(W, H * D), gate_up=rn(2 * FF, W), down=rn(W, FF),
               in_norm=(1 + rn(W)).float(), post_norm=(1 + rn(W)).float()) for _ in range(L)]
kp = rn(L, T, D, scale=1.0)
vp = rn(L, T, D, scale=1.0)
pos = torch.arange(T, T + R, device=dev)[None]
cos, sin = _rope_tables(pos, D, 10000.0)
cos_h, sin_h = cos[0, :, 0, : D // 2].contiguous(), sin[0, :, 0, D // 2:].contiguous()  # as FastPi0 passes them
bias = torch.zeros(R, T + R, device=dev)
bias[0, T + 1:] = float("-inf")  # Pi0's state token sees the prefix and itself only
x0 = rn(R, W, scale=1.0).float()


WRONG = {"SAME_LAYER", "NO_STAGE"}  # timing bounds that compute wrong numbers on purpose
PHASES = ("norm", "qkv", "attn", "combine", "wo", "norm2", "gate_up", "down")


def reference(x, steps):
    """float32 math with bf16 rounding where the kernel rounds (normed inputs, q/k/v, P, outputs)."""
    x = x.clone()
    kc = torch.cat([kp, torch.zeros(L, R, D, device=dev, dtype=dt)], 1)
    vc = kc.clone()
    vc[:, :T] = vp
    for _ in range(steps):
        for li, w in enumerate(layers):
            qkv = (_norm(x, w["in_norm"], EPS).to(dt).float() @ w["qkv"].float().t()).view(R, H + 2, D)
            qkv = torch.cat([rope(qkv[None, :, : H + 1], pos, 10000.0)[0], qkv[:, H + 1:]], 1).to(dt)
            kc[li, T:], vc[li, T:] = qkv[:, H], qkv[:, H + 1]
            sc = torch.einsum("rhd,kd->hrk", qkv[:, :H].float(), kc[li].float()) / math.sqrt(D) + bias
            p = torch.softmax(sc, -1)
            ao = torch.einsum("hrk,kd->rhd", p.to(dt).float(), vc[li].float()).reshape(R, H * D).to(dt)
            x = x + ao.float() @ w["o"].float().t()
            gu = _norm(x, w["post_norm"], EPS).to(dt).float() @ w["gate_up"].float().t()
            act = (F.gelu(gu[:, :FF], approximate="tanh") * gu[:, FF:]).to(dt)
            x = x + act.float() @ w["down"].float().t()
    return x


print(torch.cuda.get_device_name(), torch.__version__, flush=True)
ref = reference(x0, 1)
scale = ref.abs().max().item()


def megakernel(nstage, defines=(), pad=8):
    ec = ExpertChain(layers, T, R, EPS, nstage, defines, pad)
    ec.set_inputs(kp, vp, bias, cos_h, sin_h)
    out = ec.run(x0, 1).clone()
    torch.cuda.synchronize()
    err = (out - ref).abs().max().item() / scale
    print(f"megakernel nstage={nstage} pad={pad} {defines}: 18 layers, max|diff|/max|x| = {err:.3e} (max|x| {scale:.2f})",
          flush=True)
    if not WRONG.intersection(defines) and not err < 2e-2:
        print("MISMATCH", flush=True)
        raise SystemExit(1)
    ms = time_fn(lambda: ec.run(x0, STEPS), 20, 1, "cuda").median  # the cooperative launch stays out of graphs
    print(f"megakernel nstage={nstage}: {STEPS} x {L} layers {ms:.3f} ms ({ms / (STEPS * L) * 1e3:.1f} us/layer)",
          flush=True)
    prof = torch.zeros(16, dtype=torch.int64, device=dev)
    ec.run(x0, STEPS, prof=prof)
    torch.cuda.synchronize()
    cyc = prof[:8].double()
    share = " ".join(f"{n} {ms * 1e3 * c / cyc.sum().item() / (STEPS * L):.2f}" for n, c in zip(PHASES, cyc.tolist(), strict=True))
    print(f"  per layer-step, us by phase incl. its barrier (block 0's clock, scaled to the total): {share}", flush=True)
    us = ms * 1e3 / cyc.sum().item() / (STEPS * L)
    inner = prof[8:11].double().tolist()
    print("  inside block 0's 4 products per layer-step, us: waiting for weights {:.2f}, for the staged activations "
          "{:.2f}, tensor-core loop {:.2f}".format(*(c * us for c in inner)), flush=True)
    att = prof[11:15].double().tolist()
    print("  inside block 0's attention per layer-step, us: staging wait {:.2f}, q k^T {:.2f}, softmax {:.2f}, "
          "P v + partial stores {:.2f}".format(*(c * us for c in att)), flush=True)
    bms = time_fn(lambda: ec.run(x0, STEPS, barriers_only=True), 20, 1, "cuda").median
    print(f"  bound: barriers only (8 per layer-step) {bms:.3f} ms ({bms / (STEPS * L * 8) * 1e3:.2f} us/barrier)",
          flush=True)


for nstage in [int(s) for s in os.environ.get("NSTAGES", "8").split(",")]:
    for pad in [int(s) for s in os.environ.get("PADS", "8").split(",")]:
        megakernel(nstage, pad=pad)
for bound in filter(None, os.environ.get("BOUNDS", "").split(",")):  # e.g. SAME_LAYER,NO_MMA
    megakernel(8, tuple(bound.split("+")))

# The Triton chain on the same weights (FastPi0's default expert path), PDL on.
kb = [torch.cat([kp[i], torch.zeros(R, D, device=dev, dtype=dt)])[None, :, None] for i in range(L)]
vb = [torch.cat([vp[i], torch.zeros(R, D, device=dev, dtype=dt)])[None, :, None] for i in range(L)]
tb = bias[None, None].repeat_interleave(H, 2).reshape(1, 1, R * H, T + R).to(dt)  # rows in (token, head) order
tl = [dict(qkv=w["qkv"], o_t=w["o"].t(), gate_up=w["gate_up"], down_t=w["down"].t(), in_norm=w["in_norm"].to(dt),
           post_norm=w["post_norm"].to(dt)) for w in layers]


def chain(steps):
    def fn():
        h = x0[None].to(dt)
        hn = F.rms_norm(h, (W,), tl[0]["in_norm"], EPS)
        for _ in range(steps):
            for li, w in enumerate(tl):
                nxt = RowNorm(EPS, tl[(li + 1) % L]["in_norm"])
                h, hn = _expert_layer_chain(h, hn, w["qkv"], w["o_t"], w["post_norm"], w["gate_up"], w["down_t"],
                                            cos_h, sin_h, tb, kb[li], vb[li], T, H, 1, EPS, None, nxt, True)
        return h
    return fn


one = chain(1)()
terr = (one[0].float() - ref).abs().max().item() / scale
print(f"triton chain: 18 layers, max|diff|/max|x| = {terr:.3e} (bf16 residual stream)", flush=True)
ms = _time_us(chain(STEPS), reps=1, trials=20) / 1e3
print(f"triton chain: {STEPS} x {L} layers {ms:.3f} ms ({ms / (STEPS * L) * 1e3:.1f} us/layer)", flush=True)
