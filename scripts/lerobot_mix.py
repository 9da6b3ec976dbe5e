"""Where do the bench's alternating rounds beside lerobot compiled with CUDA graphs fault? (They
faulted with "unspecified launch failure" in rounds 9 and 10; scripts/graph_mix.py finds no fault
with a small reduce-overhead MLP in lerobot's place.) One process, as in the bench: our FastPi0
variants are built and captured first, then lerobot is compiled; then stages from the least to
the most suspect, each alternating one of ours with lerobot, stop at the first fault (it poisons
the CUDA context):
  1. lerobot alone, in rounds;  2. ours without CUDA graphs;  3. ours with graphs, no PDL, no
  overlap;  4. ours as the bench runs it.

    PYTHONPATH=src:<lerobot site> python3 scripts/lerobot_mix.py [pi0|pi05] [mode]
"""

import sys

import torch

from kvreuse.bench import build_lerobot, build_random, compile_lerobot, random_inputs, side_by_side, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    mode = sys.argv[2] if len(sys.argv) > 2 else "reduce-overhead"
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda", 1)
    ours = {
        "no graphs": FastPi0(model, graphs=False),
        "graphs, no PDL, no overlap": FastPi0(model, expert_pdl=False, overlap=False),
        "as the bench runs it": FastPi0(model),
    }
    with torch.no_grad():
        for f in ours.values():
            time_fn(lambda f=f: f.sample_actions(obs, noise), 3, 2, "cuda")
    theirs, tc = compile_lerobot(build_lerobot(variant, cfg, "cuda"), variant, cfg, obs, noise, mode, "cuda")
    with torch.no_grad():
        print(f"[lerobot_mix] {variant} lerobot compiled ({mode}) in {tc:.0f} s; "
              f"{time_fn(theirs, 10, 2, 'cuda').median:.2f} ms", flush=True)
        timer = lambda fn, n: time_fn(fn, n, 2, "cuda")  # noqa: E731
        stages = [("lerobot alone", None)] + [(name, f) for name, f in ours.items()]
        for name, f in stages:
            try:
                mine = (lambda f=f: f.sample_actions(obs, noise)) if f is not None else (lambda: None)
                o, t = (x.median for x in side_by_side(mine, theirs, 3, 10, 10, timer)[-1])  # the bench's alternation
                print(f"[lerobot_mix] stage {name!r}: OK (last round: lerobot {t:.2f} ms"
                      + (f", ours {o:.2f} ms)" if f is not None else ")"), flush=True)
            except Exception as exc:  # the finding is where it fails
                print(f"[lerobot_mix] stage {name!r}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                      flush=True)
                return


if __name__ == "__main__":
    main()
