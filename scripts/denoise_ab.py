"""In-process A/B of the reuse hit (FastPi0.denoise, CUDA graphs) for the chain's per-step glue:
A = the current loop (input / output projections and the Euler update as skinny PDL kernels),
B = round 4's loop (the same layer chain between torch ops). Separate processes (or FastPi0
instances built apart) differ by ~0.2 ms on an H200, so the two alternate here, 5 rounds each.
Usage (one CUDA GPU): PYTHONPATH=src python3 scripts/denoise_ab.py [pi0|pi05]"""

import statistics
import sys
import types

import torch
import torch.nn.functional as F

from kvreuse.bench import build_random, random_inputs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0, _norm


def round4_loop(self, st, steps, tables, cos_h, sin_h, bias):
    cfg, m, ex = self.cfg, self.model, self.cfg.expert
    c, dt, x = cfg.chunk_size, m.dtype, st.noise.clone()
    b = x.shape[0]
    if not cfg.adarms:
        suffix = torch.empty(b, cfg.suffix_len, ex.width, dtype=dt, device=x.device)
        suffix[:, 0].copy_(F.linear(st.state.to(dt), m.state_proj.weight, m.state_proj.bias))
    for i in range(steps):
        a = F.linear(x.to(dt), m.action_in_proj.weight, m.action_in_proj.bias)
        if cfg.adarms:
            per_layer, h = tables[i][0], a
            hn = _norm(h, None, ex.eps, *per_layer[0][:2])
        else:
            per_layer = None
            at = torch.addmm(tables[i], a.reshape(-1, ex.width), self._at_w_a_t).view(b, c, ex.width)
            suffix[:, 1:].copy_(F.linear(F.silu(at), m.action_time_mlp_out.weight, m.action_time_mlp_out.bias))
            h = suffix
            hn = _norm(h, self.exp[0].in_norm, ex.eps)
        out = self._chain(h, hn, st, per_layer, tables[i], cos_h, sin_h, bias)
        x.add_(F.linear(out[:, -c:], m.action_out_proj.weight, m.action_out_proj.bias), alpha=-1.0 / steps)
    return x


def main(name="pi0", rounds=5, iters=30):
    cfg = preset(name)
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    a, b = FastPi0(model), FastPi0(model)
    b._denoise_chain = types.MethodType(round4_loop, b)
    print(torch.cuda.get_device_name(), name, "expert:", a.expert_gemm, "pdl:", a.expert_pdl)
    cache = a.encode_prefix(obs)
    ya, yb = a.denoise(cache, obs, noise), b.denoise(cache, obs, noise)
    print(f"A vs B actions: rel. L2 {((ya - yb).norm() / yb.norm()).item():.2e}")
    times = {"A (skinny glue)": [], "B (round-4 glue)": []}
    for _ in range(rounds):
        for v, fp in zip(times.values(), (a, b), strict=True):
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for s, e in ev:
                s.record()
                fp.denoise(cache, obs, noise)
                e.record()
            torch.cuda.synchronize()
            v.append(statistics.median(s.elapsed_time(e) for s, e in ev))
    for k, v in times.items():
        print(f"{k:<18} median per round (ms): {' '.join(f'{t:.3f}' for t in v)}  -> {statistics.median(v):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
