"""Where ReusePolicy.infer (reuse off: what `kvreuse eval` / `serve` run per call) spends the time
that FastPi0.sample_actions does not: host-side profile (cProfile, cumulative) of N calls on a GPU,
beside the medians of both, and where the GPU sits idle inside one call of each (torch.profiler's
kernel and copy timeline: every gap over 10 us, with the work on either side).
Usage: PYTHONPATH=src python3 scripts/policy_overhead.py [pi0|pi05]"""

import copy
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

from kvreuse.bench import build_random, random_inputs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy


def wall_ms(fn, n=30):
    """(wall-clock, CUDA-event) medians in ms, both around each call, synchronized before and after."""
    for _ in range(3):
        fn()
    wall, ev = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
        ev.append(a.elapsed_time(b))
    return statistics.median(wall), statistics.median(ev)


class _Checked(ReusePolicy):
    """The never gate as before round 12's last change: the invalidation checks run first (their
    result is not used; the never gate refreshes whatever they say)."""

    def infer(self, obs, noise, raw_shapes=None, started=None):
        if self.cache is not None:
            self.invalid_reason(obs, raw_shapes, self.call_index, time.monotonic())
        return super().infer(obs, noise, raw_shapes, started)


def gpu_gaps(tag: str, fn, min_us: float = 10.0) -> None:
    """GPU idle time inside one call: from the first to the last kernel / copy of the call, the
    gaps between consecutive device activities (overlapping streams merged)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        fn()
        torch.cuda.synchronize()
    ev = sorted((e.time_range.start, e.time_range.end, e.name) for e in p.events()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    if not ev:
        print(f"{tag}: no device events recorded")
        return
    gaps, end, last = [], ev[0][1], ev[0][2]
    for s, e, name in ev[1:]:
        if s - end > min_us:
            gaps.append((s - end, last, name))
        if e > end:
            end, last = e, name
    span = (end - ev[0][0]) / 1e3
    cpu = [e.time_range for e in p.events() if e.device_type == torch.autograd.DeviceType.CPU]
    lead = (ev[0][0] - min(r.start for r in cpu)) / 1e3 if cpu else float("nan")
    tail = (max(r.end for r in cpu) - end) / 1e3 if cpu else float("nan")
    print(f"{tag}: host ops before the first device work {lead:.3f} ms; device busy span {span:.3f} ms "
          f"({len(ev)} device events; idle gaps > {min_us:g} us: {len(gaps)}, "
          f"{sum(g for g, _, _ in gaps) / 1e3:.3f} ms in all); host ops after the last device work {tail:.3f} ms")
    for g, a, b in sorted(gaps, reverse=True)[:12]:
        print(f"  {g:8.1f} us  after {a[:60]!r}  before {b[:60]!r}")


def main(name="pi0", n=30):
    cfg = preset(name).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    fast = FastPi0(model, compile=True)
    pol = ReusePolicy(fast, ReuseConfig())
    old = _Checked(fast, ReuseConfig())
    unprepared = copy.copy(fast)  # same weights, buffers and graphs; prepare() does nothing
    unprepared.prepare = lambda obs: None
    late = ReusePolicy(unprepared, ReuseConfig())
    print(torch.cuda.get_device_name(), name)
    for _ in range(2):  # alternate, in case the card's state drifts
        for tag, fn in (("sample_actions", lambda: fast.sample_actions(obs, noise)),
                        ("ReusePolicy.infer, reuse off", lambda: pol.infer(obs, noise)),
                        ("  same, invalidation checked", lambda: old.infer(obs, noise)),
                        ("  same, no prepare()", lambda: late.infer(obs, noise))):
            w, e = wall_ms(fn)
            print(f"{tag:<30} median {w:7.3f} ms wall-clock, {e:7.3f} ms CUDA events")
    for tag, fn in (("sample_actions", lambda: fast.sample_actions(obs, noise)),
                    ("ReusePolicy.infer, reuse off", lambda: pol.infer(obs, noise))):
        gpu_gaps(tag, fn)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        pol.infer(obs, noise)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
    print(f"cProfile of {n} calls (cumulative):")
    print(s.getvalue())


if __name__ == "__main__":
    main(*sys.argv[1:])
