"""Where ReusePolicy.infer (reuse off; eval and serve call it through Policy.infer) spends the time
that FastPi0.sample_actions does not: host-side profile (cProfile, cumulative) of N calls on a GPU,
beside the medians of both, and where the GPU sits idle inside one call of each (torch.profiler's
kernel and copy timeline: every gap over 10 us, with the work on either side).
With `policy`: what Policy.infer (eval's and serve's call, numpy in and out) adds to that.
Usage: PYTHONPATH=src python3 scripts/policy_overhead.py [pi0|pi05] [policy]"""

import cProfile
import dataclasses
import io
import pstats
import statistics
import sys
import time

import torch

from kvreuse.bench import build_random, random_inputs, robot_inputs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0
from kvreuse.policy import Policy
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.policy import ReusePolicy
from kvreuse.reuse.signals import Reference, camera_ref


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


class _Round12(ReusePolicy):
    """The never gate's bookkeeping as in round 12: after a full refresh it built the signal
    reference (copies queued behind the graph, compared with nothing) and read the cache's valid
    rows and compared the births (a device read and a CPU op per call)."""

    def _execute(self, plan, obs, sig, call, now, raw_shapes, noise):
        out = super()._execute(plan, obs, sig, call, now, raw_shapes, noise)
        mc = self.model.cfg
        self.ref = Reference(
            cameras={c: camera_ref(obs.images[c], self.config, mc.vision.patch_size) for c in mc.cameras},
            image_masks={c: m.clone() for c, m in obs.image_masks.items()}, state=obs.state.clone(),
            prompt=obs.prompt, raw_shapes=None, dtype=self.model.dtype, device=obs.device)
        return out

    def infer(self, obs, noise, raw_shapes=None, started=None):
        out, rec = super().infer(obs, noise, raw_shapes, started)
        len(torch.unique(torch.from_numpy(self.births)[self.valid_rows]))  # (read in infer before its final sync, then)
        return out, rec


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


def host_profile(fn, n: int, what: str) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
    print(f"cProfile of {n} calls of {what} (cumulative):")
    print(s.getvalue())


def policy_wrapper(cfg, fast, noise, n: int) -> None:
    """What Policy.infer adds to ReusePolicy.infer (the robot transform, its copies, the actions
    back on the host), on the bench's raw observation (bench.robot_inputs), reuse off and hit."""
    tf, raw = robot_inputs(cfg, 1)
    obs = tf(raw, device="cuda")
    for gate in ("never", "crossmodal"):
        _wrapper_gate(gate, fast, tf, raw, obs, noise, n)


def _wrapper_gate(gate, fast, tf, raw, obs, noise, n: int) -> None:
    pol, rp = Policy(fast, tf, reuse=ReuseConfig(gate=gate)), ReusePolicy(fast, ReuseConfig(gate=gate))
    out = rp.infer(obs, noise)[0]
    for tag, fn in ((f"Policy.infer, gate {gate}", lambda: pol.infer(raw, noise)),
                    ("  ReusePolicy.infer on one transformed obs", lambda: rp.infer(obs, noise)),
                    ("  robot transform", lambda: tf(raw, device="cuda")),
                    ("  actions to the host", lambda: tf.actions(out, raw))):
        w, e = wall_ms(fn)
        print(f"{tag:<44} median {w:7.3f} ms wall-clock, {e:7.3f} ms CUDA events", flush=True)
    gpu_gaps(f"Policy.infer, gate {gate}", lambda: pol.infer(raw, noise))
    gpu_gaps(f"ReusePolicy.infer, gate {gate}", lambda: rp.infer(obs, noise))
    host_profile(lambda: pol.infer(raw, noise), n, f"Policy.infer, gate {gate}")


def main(name="pi0", what="reuse_policy", n=30):
    cfg = preset(name).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    fast = FastPi0(model, compile=True)
    if what == "policy":
        print(torch.cuda.get_device_name(), name)
        return policy_wrapper(cfg, fast, noise, n)
    pol = ReusePolicy(fast, ReuseConfig())
    old = _Round12(fast, ReuseConfig())
    print(torch.cuda.get_device_name(), name)
    dev_obs = dataclasses.replace(obs)  # the same tensors without the host copies of the masks
    for _ in range(2):  # alternate, in case the card's state drifts
        for tag, fn in (("sample_actions", lambda: fast.sample_actions(obs, noise)),
                        ("  same, masks read from the GPU", lambda: fast.sample_actions(dev_obs, noise)),
                        ("ReusePolicy.infer, reuse off", lambda: pol.infer(obs, noise)),
                        ("  same, masks read from the GPU", lambda: pol.infer(dev_obs, noise)),
                        ("  same, also round 12's bookkeeping", lambda: old.infer(dev_obs, noise))):
            w, e = wall_ms(fn)
            print(f"{tag:<36} median {w:7.3f} ms wall-clock, {e:7.3f} ms CUDA events")
    for tag, fn in (("sample_actions", lambda: fast.sample_actions(obs, noise)),
                    ("ReusePolicy.infer, reuse off", lambda: pol.infer(obs, noise))):
        gpu_gaps(tag, fn)
    host_profile(lambda: pol.infer(obs, noise), n, "ReusePolicy.infer")


if __name__ == "__main__":
    main(*sys.argv[1:])
