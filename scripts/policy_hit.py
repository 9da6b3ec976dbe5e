"""Reuse as `kvreuse eval` / `serve` run it (round 15). The hit: `ReusePolicy.infer` with a
gate that reuses (the same observation every call, so every call after the first reuses the
whole prefix), against the denoise alone (what `kvreuse bench` reports as the hit), one process, one card,
compile on, timed in turn round after round. With an older commit's package beside the tree
(`version_ab.py --make REV`), the same gates through that commit's ReusePolicy over the same
FastPi0, so that only the policy's own work differs. "crossmodal eager" / "crossmodal compiled":
the working tree's crossmodal gate with its raw-image and state signals as plain torch ops or as
one torch.compile'd call instead of the CUDA graph (round 15).

    python3 scripts/version_ab.py --make REV        # optional: REV's package as kvreuse_old
    PYTHONPATH=src:scripts:scripts/_ab python3 scripts/policy_hit.py pi0|pi05 ROUNDS
    PYTHONPATH=src:scripts python3 scripts/policy_hit.py tiny-pi0 1     # CPU: a dry run
    ... policy_hit.py pi0 0 --profile     # where a hit's host time goes: cProfile and torch's op table
    ... policy_hit.py pi0 3 --modes       # the reuse modes' calls: parts and host time (below)
    ... policy_hit.py pi0 3 --modes --old-fast   # ... the older commit's policy on its own FastPi0
    ... policy_hit.py pi0 3 --old-fast           # hits likewise, and that FastPi0's denoise alone
"""

import cProfile
import pstats
import statistics
import sys
import time

import torch
from ab_rounds import setup

from kvreuse.bench import moved_observation
from kvreuse.model.fast import FastPi0
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy
from kvreuse.reuse.signals import _compiled

GATES = {  # gate settings under which the same observation is always reused
    "period": dict(gate="period", period=10**9),  # no signals: the policy's bookkeeping alone
    "threshold": dict(gate="threshold"),  # raw-image cosine per camera
    "crossmodal": dict(gate="crossmodal"),  # + the state
    "phase": dict(gate="phase", phase_threshold=0.0),  # + the last chunk's cues (read after the denoise)
}


def policies(fast, config_cls, policy_cls, tag):
    return {f"{tag} {g}": policy_cls(fast, config_cls(**kw)) for g, kw in GATES.items()}


def main() -> None:
    variant, rounds = sys.argv[1], int(sys.argv[2])
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a dry run of the script (tiny presets)
    _, model, obs, noise = setup(variant, device=dev)
    fast = FastPi0(model, compile=dev == "cuda")
    if "--modes" in sys.argv:
        return modes(fast, obs, noise, rounds, dev, model)
    pols = policies(fast, ReuseConfig, ReusePolicy, "new")
    compiled = lambda fn, fresh, cached, *s: _compiled(fn, torch.device(dev))(fresh, cached, *s)  # noqa: E731
    for name, graphs in (("eager", None), ("compiled", compiled)):
        # round 15's other ways to compute the same signals: plain ops, or one compiled call
        pols[f"new crossmodal {name}"] = p = ReusePolicy(fast, ReuseConfig(**GATES["crossmodal"]))
        p._graphs = graphs
    old_fast = fast
    try:
        from kvreuse_old.reuse.config import ReuseConfig as OldConfig
        from kvreuse_old.reuse.policy import ReusePolicy as OldPolicy
        if "--old-fast" in sys.argv:  # the older commit's FastPi0 under its policy, over the same weights
            from kvreuse_old.model.fast import FastPi0 as OldFast
            old_fast = OldFast(model, compile=dev == "cuda")
        pols = {**policies(old_fast, OldConfig, OldPolicy, "old"), **pols}
    except ImportError:
        print("no kvreuse_old beside the tree: the working tree's policy only")
    with torch.no_grad():
        cache, old_cache = fast.encode_prefix(obs), old_fast.encode_prefix(obs)
        ref = fast.denoise(cache, obs, noise)
        for name, p in pols.items():
            p.infer(obs, noise)  # the refresh that fills the cache
            out, rec = p.infer(obs, noise)
            print(f"{name}: {rec.decision} ({rec.reason}); actions == denoise: {torch.equal(out, ref)}")
    calls = {"denoise alone": lambda: fast.denoise(cache, obs, noise)}
    if old_fast is not fast:
        calls["old denoise alone"] = lambda: old_fast.denoise(old_cache, obs, noise)
    calls.update({name: (lambda p=p: p.infer(obs, noise)[1]) for name, p in pols.items()})
    with torch.no_grad():
        for r in range(rounds):  # calls interleaved one by one, so that drift meets every entry alike
            ms = {name: [] for name in calls}
            recs = {name: [] for name in pols}
            for i in range(33):
                for name, fn in calls.items():
                    t, out = timed(fn, dev)
                    if i >= 3:
                        ms[name].append(t)
                        if name in recs:
                            recs[name].append(out)
            print(f"round {r + 1} (ms, median of 30): " + " | ".join(
                f"{k} {statistics.median(v):.3f}" for k, v in ms.items()), flush=True)
            print("   its records' signals / total (ms, median): " + " | ".join(
                f"{k} {statistics.median(x.timings['signals'] for x in v):.3f} / "
                f"{statistics.median(x.timings['total'] for x in v):.3f}" for k, v in recs.items()), flush=True)
    if "--profile" in sys.argv:
        profile({k: v for k, v in pols.items() if k.startswith("new")}, obs, noise)
    for name, p in pols.items():  # every call but each policy's first must have been a hit
        print(f"{name}: {len(p.stats)} calls, {p.stats.reuses} reused")


def modes(fast, obs, noise, rounds, dev, model, n=30):
    """Each reuse mode under the `always` gate, on observations that alternate between two that
    differ in one camera's top two rows of patches: per call the records' parts (GPU time from
    CUDA events) and total (wall-clock), medians, for the working tree's policy and, with
    kvreuse_old beside the tree, the older commit's; then cProfile of the partial mode's calls."""
    moved = moved_observation(obs, fast.cfg.vision.patch_size)
    names = ("full", "vision_only", "state_only", "layer_wise", "partial")
    pols = {f"new {m}": ReusePolicy(fast, ReuseConfig(gate="always", mode=m)) for m in names}
    try:
        from kvreuse_old.reuse.config import ReuseConfig as OldConfig
        from kvreuse_old.reuse.policy import ReusePolicy as OldPolicy
        old_fast = fast
        if "--old-fast" in sys.argv:  # the older commit's FastPi0 under its policy, over the same weights
            from kvreuse_old.model.fast import FastPi0 as OldFast
            old_fast = OldFast(model, compile=dev == "cuda")
        pols.update({f"old {m}": OldPolicy(old_fast, OldConfig(gate="always", mode=m)) for m in names})
    except ImportError:
        pass
    with torch.no_grad():
        for r in range(rounds):  # calls interleaved one by one across the policies
            ms = {k: [] for k in pols}
            recs = {k: [] for k in pols}
            last = {}
            for i in range(n + 4):
                for name, p in pols.items():
                    t, (out, rec) = timed(lambda p=p, i=i: p.infer(moved if i % 2 else obs, noise), dev)
                    last[name] = out
                    if i >= 4:
                        ms[name].append(t)
                        recs[name].append(rec)
            for name in sorted(pols, key=lambda k: (k.split()[1], k)):
                parts = {k: statistics.median(x.timings.get(k, 0.0) for x in recs[name])
                         for k in ("signals", "vision", "prefix", "denoise", "sample", "total")}
                # per plan too: layer-wise alternates between updates and hits, a median over both is neither
                by_plan = {pl: statistics.median(t for t, x in zip(ms[name], recs[name], strict=True) if x.plan == pl)
                           for pl in sorted({x.plan for x in recs[name]})}
                print(f"round {r + 1} {name}: call {statistics.median(ms[name]):.3f} ms; records (median): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
                      + "; by plan " + ", ".join(f"{pl} {v:.3f}" for pl, v in by_plan.items()), flush=True)
            same = {m: torch.equal(last[f"new {m}"], last[f"old {m}"]) for m in names if f"old {m}" in last}
            if same:  # the same observations and noise in the same order: the same actions
                print(f"round {r + 1}: last call's actions new == old: {same}", flush=True)
        pr = cProfile.Profile()
        pr.enable()
        for i in range(100):
            pols["new partial"].infer(moved if i % 2 else obs, noise)
        pr.disable()
    print("== partial: cProfile of 100 calls")
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def timed(fn, dev):
    """(ms, fn's result): CUDA events around the call on a GPU (as kvreuse bench), else wall-clock."""
    if dev != "cuda":
        t = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t) * 1e3, out
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    out = fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b), out


def profile(pols, obs, noise, n=100):
    """Per gate: cProfile of n hits (host time by function, blocking waits included), then
    torch.profiler's CPU op table for the same hits."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof
    with torch.no_grad():
        for name, p in pols.items():
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(n):
                p.infer(obs, noise)
            pr.disable()
            print(f"== {name}: cProfile of {n} hits")
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)
            with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(n // 4):
                    p.infer(obs, noise)
            print(f"== {name}: torch ops, {n // 4} hits")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
