"""Where each part of an inference spends its GPU time, kernel by kernel: FastPi0 as the bench
builds it (compile on) but with CUDA graphs off, so that torch.profiler sees every kernel, and
each part run alone: the vision tower (both cameras), the prefix LM, the denoise (= a reuse
hit). Prints per part the kernels' total, then each kernel name's count, total and mean (us),
largest first. Kernel times without graphs include no launch gaps; the graphs' wall time is the
bench's.

    PYTHONPATH=src python3 scripts/part_kernels.py [pi0|pi05] [rows per table] [kernels to list in order]
"""

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from kvreuse.bench import build_random, random_inputs
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def kernel_table(fn, reps: int = 3, order: int = 0) -> dict[str, list[float]]:
    """name -> [count, total us] per call of fn, averaged over reps calls; with order, also
    prints the first `order` kernels of one call in the order they ran."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    evs = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    for ev in evs:
        out[ev.name][0] += 1 / reps
        out[ev.name][1] += ev.time_range.elapsed_us() / reps
    for ev in sorted(evs, key=lambda e: e.time_range.start)[:order]:
        print(f"  {ev.time_range.elapsed_us():7.2f} us  {ev.name[:100]}")
    return out


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 14
    order = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # kernels of each part to list in order
    print(torch.cuda.get_device_name(), torch.__version__, variant, flush=True)
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    fast = FastPi0(model, compile=True, graphs=False)
    with torch.no_grad():
        cache = fast.encode_prefix(obs)
        st = fast._static(1)
        rows = fast._rows_of(obs)
        parts = {"vision (2 cameras)": lambda: fast._embed(st, obs, {}),
                 f"prefix LM ({rows} rows)": lambda: fast._prefix_graph(st, (), rows),
                 "denoise (= reuse hit)": lambda: fast.denoise(cache, obs, noise)}
        fast._down_rows(rows)  # (timed before the prefix graph's first capture, as in a run)
        print(f"prefix LM down-product route: {fast.down_routes}")
        for name, fn in parts.items():
            print(f"\n{name}, its first {order} kernels in order:" if order else "")
            tab = kernel_table(fn, order=order)
            total = sum(t for _, t in tab.values())
            print(f"\n{name}: {total / 1e3:.3f} ms of kernels, {sum(c for c, _ in tab.values()):.0f} launches")
            print("| kernel | count | total us | mean us |\n|---|---|---|---|")
            for k, (c, t) in sorted(tab.items(), key=lambda kv: -kv[1][1])[:top]:
                print(f"| {k[:90]} | {c:.0f} | {t:.1f} | {t / c:.2f} |")


if __name__ == "__main__":
    main()
