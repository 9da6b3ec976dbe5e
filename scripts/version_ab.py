"""A/B of the runtime at two commits in one process, one card: FastPi0 as an older commit had it
(a copy of its package, `kvreuse_old`) against the working tree's, over one model (compile on,
as the bench), timed in turn round after round: encode_prefix (vision + prefix LM), the denoise
alone (= a reuse hit) and full inference (sample_actions). Prints the actions' difference and
each instance's down-product route first.

    python3 scripts/version_ab.py --make REV            # here: REV's src/kvreuse -> scripts/_ab/kvreuse_old
    PYTHONPATH=src:scripts:scripts/_ab python3 scripts/version_ab.py pi0|pi05 ROUNDS [--tuned] [--new-first] [--batch N]

Both keep cuBLAS's down product unless --tuned (see fast_ab.py). scripts/_ab is a scratch copy:
never committed.
"""

import io
import pathlib
import subprocess
import sys
import tarfile

AB = pathlib.Path(__file__).resolve().parent / "_ab"


def make(rev: str) -> None:
    """REV's package as kvreuse_old: its absolute `kvreuse` imports renamed."""
    data = subprocess.run(["git", "archive", rev, "src/kvreuse"], capture_output=True, check=True).stdout
    out = AB / "kvreuse_old"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            if not m.isfile() or not m.name.endswith(".py"):
                continue
            dst = out / pathlib.Path(m.name).relative_to("src/kvreuse")
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = tar.extractfile(m).read().decode()
            for a, b in (("from kvreuse.", "from kvreuse_old."), ("import kvreuse.", "import kvreuse_old.")):
                text = text.replace(a, b)
            dst.write_text(text)
    print(f"{rev} -> {out}")


def main() -> None:
    if sys.argv[1] == "--make":
        return make(sys.argv[2])
    import torch
    from ab_rounds import setup, time_rounds
    from kvreuse_old.model.fast import FastPi0 as OldFast

    from kvreuse.bench import rel_err
    from kvreuse.model.fast import FastPi0

    variant, rounds, tuned = sys.argv[1], int(sys.argv[2]), "--tuned" in sys.argv
    batch = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 1
    _, model, obs, noise = setup(variant, f"batch {batch}", batch=batch)
    kw = dict(compile=True, lm_down_tune=tuned)
    # The first instance built may run its hit slower (instance_spread.py, round 14): --new-first
    # builds the working tree's first, to see whether a difference follows the code or the order.
    order = ("new", "old") if "--new-first" in sys.argv else ("old", "new")
    builders = {"old": lambda: OldFast(model, **kw), "new": lambda: FastPi0(model, **kw)}
    built = {k: builders[k]() for k in order}
    fast = {"old": built["old"], "new": built["new"]}
    with torch.no_grad():
        outs = [f.sample_actions(obs, noise) for f in fast.values()]
        caches = {k: f.encode_prefix(obs) for k, f in fast.items()}
        print(f"actions rel diff {rel_err(*outs):.2e}; down routes "
              + " | ".join(f"{k} {f.down_routes}" for k, f in fast.items()), flush=True)
        time_rounds(fast, {"encode_prefix (vision + prefix LM)": lambda k, f: f.encode_prefix(obs),
                           "denoise alone (reuse hit)": lambda k, f: f.denoise(caches[k], obs, noise),
                           "sample_actions": lambda k, f: f.sample_actions(obs, noise)}, rounds)


if __name__ == "__main__":
    main()
