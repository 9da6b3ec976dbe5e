"""Where the GPU idles inside `ReusePolicy.infer` (round 16). For each reuse mode named (default:
partial and state_only) under the `always` gate, on observations alternating between two that
differ in one camera's top rows of patches (as `policy_hit.py --modes`): several calls under
torch.profiler: each call's host span, when the device worked in it and its idle gaps over GAP us,
and the host and device time of the policy's phases (vision, signals, plan, prefix update,
denoise, reference update; wrapped in record_function here); then the call sites that
synchronize with the device (torch's sync debug mode). A CPU run is a dry run of the script (no
device events). The profiler inflates host time (round 16): read the structure, not the sums.

    PYTHONPATH=src:scripts python3 scripts/call_gaps.py pi0|pi05 [mode ...]    # one CUDA GPU
"""

import collections
import os
import sys
import traceback
import warnings

import torch
from ab_rounds import setup
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from kvreuse.bench import moved_observation
from kvreuse.model.fast import FastPi0
from kvreuse.reuse import policy as policy_mod
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy

GAP = float(os.environ.get("GAP", "15"))  # us


def traced(obj, name: str):
    """obj.name(...) under record_function("@name") (its host range, and on the device the range of
    the work it queued); returns what undoes it."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        with record_function(f"@{name}"):
            return fn(*a, **kw)
    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, fn)


def report(prof, calls: int) -> None:
    """Per call: host span, when the device worked in it, its idle gaps, and each traced phase's
    host time and device range / busy time."""
    evs = prof.events()
    cpu = [e for e in evs if e.device_type == DeviceType.CPU]
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in cpu if e.name.startswith("call "))
    kern = sorted((e.time_range.start, e.time_range.end, e.name) for e in evs
                  if e.device_type == DeviceType.CUDA and not e.name.startswith(("call ", "@")))
    dranges = [e for e in evs if e.device_type == DeviceType.CUDA and e.name.startswith("@")]
    for c0, c1, name in spans[:calls]:
        work = [d for d in kern if c0 <= d[0] <= c1]
        busy, end, idle = 0.0, c0, []
        for s, e, kname in work:
            if s - end > GAP:
                idle.append((end - c0, s - end, kname))
            busy += max(0.0, e - max(s, end))
            end = max(end, e)
        print(f"{name}: host span {c1 - c0:.0f} us; " + (
            f"device {work[0][0] - c0:.0f} .. {end - c0:.0f} us, busy {busy:.0f}; host after the device's last work "
            f"{c1 - end:.0f} us" if work else "no device events"))
        for at, dur, kname in idle:
            print(f"  device idle {dur:5.0f} us at {at:6.0f}, before {kname[:60]!r}")
        for e in sorted((e for e in cpu if e.name.startswith("@") and c0 <= e.time_range.start <= c1),
                        key=lambda e: e.time_range.start):
            h0, h1 = e.time_range.start - c0, e.time_range.end - c0
            d = [x for x in dranges if x.name == e.name and c0 <= x.time_range.start <= c1 + 20000]
            d = min(d, key=lambda x: abs(x.time_range.start - e.time_range.start), default=None)
            if d is None:
                print(f"  {e.name:<16} host {h0:7.0f} +{h1 - h0:6.0f} us")
                continue
            g0, g1 = d.time_range.start, d.time_range.end
            kb = sum(max(0.0, min(ke, g1) - max(ks, g0)) for ks, ke, _ in work)
            print(f"  {e.name:<16} host {h0:7.0f} +{h1 - h0:6.0f} us; device {g0 - c0:7.0f} +{g1 - g0:6.0f} us"
                  f" (kernels {kb:6.0f})")


def sync_sites(pol, obs, moved, noise, calls: int = 6) -> None:
    """Call sites of device syncs (torch.cuda.set_sync_debug_mode) over `calls` calls."""
    sites = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-2] if "kvreuse" in f.filename or "scripts" in f.filename]
        sites[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(stack[-3:]))] += 1

    old = warnings.showwarning
    warnings.showwarning = show
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(calls):
                pol.infer(moved if i % 2 else obs, noise)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    warnings.showwarning = old
    print(f"syncs per call ({calls} calls):")
    for k, n in sites.most_common():
        print(f"  {n / calls:4.1f}  {k}")


def main() -> None:
    variant, modes = sys.argv[1], sys.argv[2:] or ["partial", "state_only"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _, model, obs, noise = setup(variant, device=dev)
    fast = FastPi0(model, compile=dev == "cuda")
    moved = moved_observation(obs, fast.cfg.vision.patch_size)
    with torch.no_grad():
        for mode in modes:
            pol = ReusePolicy(fast, ReuseConfig(gate="always", mode=mode))
            undos = [traced(pol, n) for n in ("_measure", "_vision", "_update_ref", "_sync")]
            undos += [traced(fast, n) for n in ("update_prefix", "update_prefix_layers", "denoise", "embed_images")]
            undos.append(traced(policy_mod, "plan_reuse"))
            for i in range(8):
                pol.infer(moved if i % 2 else obs, noise)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
            with profile(activities=acts) as prof:
                for i in range(6):
                    with record_function(f"call {i} ({mode}, {'moved' if i % 2 else 'first'})"):
                        _, rec = pol.infer(moved if i % 2 else obs, noise)
            print(f"== {mode}: plan {rec.plan}, timings " + ", ".join(f"{k} {v:.2f}" for k, v in rec.timings.items()))
            report(prof, 6)
            if dev == "cuda":
                sync_sites(pol, obs, moved, noise)
            for undo in undos:  # the next mode's policy runs unwrapped until it is traced
                undo()


if __name__ == "__main__":
    main()
