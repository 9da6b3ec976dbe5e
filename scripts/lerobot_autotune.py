"""Lerobot 0.6.1 compiled with its own mode (`max-autotune`) against our fast path, side by side.

Its compile outlasts one 10-minute device call (rounds 9 and 10 of docs/PERFORMANCE.md), so this
script compiles lerobot *first* and can simply be run again on the same warm machine with the same
TORCHINDUCTOR_CACHE_DIR: inductor keeps its autotuning results and kernels there, and each run
resumes where the last one was cut off. Once lerobot's compile completes, the script times it,
builds our FastPi0 (compile on, as `kvreuse bench` times it) and alternates the two in rounds
(`bench.side_by_side`). Inputs, config and lerobot's build are the bench's own.

    TORCHINDUCTOR_CACHE_DIR=/tmp/indcache PYTHONPATH=src:<lerobot site> \
        python3 scripts/lerobot_autotune.py [pi0|pi05] [mode] [rounds]
"""

import sys
import time

import torch

from kvreuse.bench import build_lerobot, build_random, compile_lerobot, random_inputs, side_by_side, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def say(msg: str) -> None:
    print(f"[lerobot_autotune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    mode = sys.argv[2] if len(sys.argv) > 2 else "max-autotune"
    n_rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {variant}, lerobot mode {mode!r}")
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # the bench's default: 2 cameras
    obs, noise = random_inputs(cfg, 1, "cuda", 1)  # the bench's seed + 1
    timer = lambda fn, n: time_fn(fn, n, 5, "cuda")  # noqa: E731

    theirs, tc = compile_lerobot(build_lerobot(variant, cfg, "cuda"), variant, cfg, obs, noise, mode, "cuda")
    with torch.no_grad():
        say(f"lerobot compiled in {tc:.0f} s (this run; earlier runs may have filled the cache)")
        st = timer(theirs, 30)
        say(f"lerobot compiled ({mode}): median {st.median:.2f} ms (p10 {st.p10:.2f}, p90 {st.p90:.2f})")

        t0 = time.perf_counter()
        fast = FastPi0(build_random(cfg, "cuda"), compile=True)
        ours = lambda: fast.sample_actions(obs, noise)  # noqa: E731
        ours()
        torch.cuda.synchronize()
        say(f"ours (fast+compile) built and warmed in {time.perf_counter() - t0:.0f} s")
        for i, (o, t) in enumerate(side_by_side(ours, theirs, n_rounds, 30, 30, timer)):
            say(f"round {i + 1}: lerobot {t.median:.2f} ms (p10 {t.p10:.2f}), ours {o.median:.2f} ms "
                f"(p10 {o.p10:.2f}): {t.median / o.median:.2f}x")


if __name__ == "__main__":
    main()
