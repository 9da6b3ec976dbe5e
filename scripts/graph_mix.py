"""Does FastPi0's CUDA graph replay coexist with torch.compile(mode="reduce-overhead") (cudagraph
trees) in one process? The bench's alternating rounds beside lerobot compiled that way faulted
("unspecified launch failure", rounds 9 and 10). One configuration per process (a CUDA fault
poisons the context):
- other=mlp: a small compiled MLP in lerobot's place, alternating with ours (no fault, round 10);
- other=clear: what the bench did. A first FastPi0 captures its graphs, a second one captures
  its own, the first is dropped, then the cuBLAS workspaces are cleared as torch.compile's CUDA
  graphs clear them on every recording, and freed memory is handed out again. fix=0 turns off
  FastPi0's own clearing around each capture (the fix) to show the fault it prevents.

    PYTHONPATH=src python3 scripts/graph_mix.py [other=mlp|none|clear] [fix=1|0] [pdl=0|1] [overlap=0|1]
        [compile=0|1] [first=ours|theirs] [rounds=3] [mode=reduce-overhead]

Prints one line: the configuration and OK, or the error.
"""

import sys

import torch

from kvreuse.bench import build_random, random_inputs, side_by_side, time_fn
from kvreuse.model import preset
from kvreuse.model import graphs as graphs_mod
from kvreuse.model.fast import FastPi0


def main() -> None:
    opt = dict(other="mlp", fix="1", pdl="1", overlap="1", compile="0", first="ours", rounds="3", mode="reduce-overhead")
    for a in sys.argv[1:]:
        k, _, v = a.partition("=")
        if k not in opt:
            raise SystemExit(f"unknown option {k}; options: {', '.join(opt)}")
        opt[k] = v
    tag = " ".join(f"{k}={v}" for k, v in opt.items())
    if opt["fix"] == "0":
        graphs_mod.clear_cublas_workspaces = lambda: None
    cfg = preset("pi0").replace(cameras=("cam0", "cam1"))
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda", 1)
    kw = dict(expert_pdl=opt["pdl"] == "1", overlap=opt["overlap"] == "1", compile=opt["compile"] == "1")
    first = None
    if opt["other"] == "clear":  # the bench's order: an instance captured, then dropped
        first = FastPi0(model, **kw)
        first.sample_actions(obs, noise)
    fast = FastPi0(model, **kw)
    ref = fast.sample_actions(obs, noise).clone()
    ours = lambda: fast.sample_actions(obs, noise)  # noqa: E731
    time_fn(ours, 5, 2, "cuda")

    theirs = None
    if opt["other"] == "clear":
        first = None
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        junk = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(64)]  # freed memory, handed out again
    if opt["other"] == "mlp":  # lerobot sets this before compiling; dynamo guards on it
        torch.set_float32_matmul_precision("high")
        mlp = torch.nn.Sequential(torch.nn.Linear(2048, 8192), torch.nn.GELU(), torch.nn.Linear(8192, 2048))
        mlp = mlp.to("cuda", torch.bfloat16).requires_grad_(False)
        x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
        step = torch.compile(lambda x: mlp(mlp(x)), mode=opt["mode"])
        theirs = lambda: step(x)  # noqa: E731
        time_fn(theirs, 10, 3, "cuda")
    try:
        other = theirs or (lambda: None)
        pair = (ours, other) if opt["first"] == "ours" else (other, ours)
        with torch.no_grad():  # the bench's alternation
            side_by_side(*pair, int(opt["rounds"]), 10, 10, lambda fn, n: time_fn(fn, n, 2, "cuda"))
        same = torch.equal(fast.sample_actions(obs, noise), ref)
        if opt["other"] == "clear":
            same &= all(bool((j == 7.0).all()) for j in junk)  # nor did our replays write into others' memory
        print(f"[graph_mix] {tag}: OK (actions {'bit-identical' if same else 'CHANGED'} after the rounds)", flush=True)
    except Exception as exc:  # the finding is the error itself
        print(f"[graph_mix] {tag}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main()
