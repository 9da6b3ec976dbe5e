"""`kvreuse compare actions` and `kvreuse compare deterministic` (heavy imports inside)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Annotated, Optional, Union

import tyro

from .config import ReuseConfig


@dataclass(frozen=True)
class Source:
    checkpoint: Optional[str] = None
    """A kvreuse checkpoint directory. None: for a tiny preset the shipped testbed policy if the
    package has one, else a randomly initialised `preset` (full size: pi0, pi05)."""
    preset: str = "tiny-pi05"
    """Preset of the random model (used only without a checkpoint)."""
    tokenizer: Optional[str] = None
    """tokenizer.model for full-size checkpoints."""
    device: str = "cpu"
    dtype: str = "float32"
    """The policy's weights: float32 | bfloat16 (what the GPU figures of docs/PERFORMANCE.md run)."""
    fast: bool = False
    """Run the policy through FastPi0 (CUDA graphs and Triton kernels on a GPU)."""
    stats_from: Optional[str] = None
    """A checkpoint whose norm stats the random model's inputs go through (no --checkpoint), e.g.
    the policy that recorded --stream: the cross-modal gate compares normalised states, so without
    them its schedule is not that policy's."""
    stream: Optional[str] = None
    """A recorded observation stream (.safetensors, see docs/REUSE.md), or a folder of them (all
    replayed in name order, e.g. what `kvreuse eval --streams N` records). None: a synthetic one."""
    steps: int = 40
    """Synthetic stream: steps per episode."""
    episodes: int = 2
    """Synthetic stream: episodes."""
    seed: int = 0
    """Seeds the random model, the synthetic stream and the noise (an episode recorded by `kvreuse
    eval --streams` replays with the noise seed it ran with)."""
    threads: Optional[int] = None
    """torch's intra-op threads (default: the machine's, at most 4). On a CPU shared with other
    work, 1 gives steadier latencies."""
    save_stream: Optional[str] = None
    """Write the stream that was used to this path."""


@dataclass(frozen=True)
class Actions:
    """Baseline vs a reuse setting on the same stream and noise: per-call cosine and L2 of the
    action chunks, summarized."""

    reuse: Annotated[ReuseConfig, tyro.conf.OmitArgPrefixes] = ReuseConfig(gate="threshold")
    src: Annotated[Source, tyro.conf.OmitArgPrefixes] = field(default_factory=Source)
    per_call: bool = False
    """Print one line per call."""
    json_out: Optional[str] = None
    """Also write the per-call values and the summary as JSON here."""


@dataclass(frozen=True)
class Modes:
    """Every reuse mode under one gate on the same stream and noise: reuse rate, what was
    computed (vision passes, prefix token-layers as a share of always refreshing), latency
    breakdown (warm-up calls left out) and action agreement with the baseline."""

    reuse: Annotated[ReuseConfig, tyro.conf.OmitArgPrefixes] = ReuseConfig(gate="always")
    src: Annotated[Source, tyro.conf.OmitArgPrefixes] = field(default_factory=Source)


@dataclass(frozen=True)
class Grid:
    """Several reuse settings, each replayed on the same stream and noise as the baseline (open
    loop): reuse rate, latency (warm-up calls left out), speedup over the baseline and action
    agreement per setting. What a gate's schedule costs on a recorded stream (e.g. `kvreuse eval
    --streams N`'s, replayed through a full-size model on a GPU); success needs the closed loop
    (`kvreuse sweep`)."""

    grid: tuple[str, ...] = ("gate=threshold threshold=0.9,0.95,0.98", "gate=crossmodal threshold=0.9")
    """Settings as in `kvreuse sweep --grid`: 'key=v1,v2 ...' specs over ReuseConfig fields."""
    src: Annotated[Source, tyro.conf.OmitArgPrefixes] = field(default_factory=Source)
    json_out: Optional[str] = None
    """Also write every setting's summary as JSON here (interrupted or failed: those replayed so
    far, with "complete": false)."""


@dataclass(frozen=True)
class Deterministic:
    """Same inputs twice, and reuse off vs the plain model: exits non-zero unless every pair of
    action chunks is bit-identical."""

    src: Annotated[Source, tyro.conf.OmitArgPrefixes] = field(default_factory=Source)


def load(src: Source):
    """-> (baseline Policy, stream, description)."""
    import torch

    from ..assets import shipped_checkpoint
    from ..bench import build_random
    from ..devices import check_device, check_dtype
    from ..model import Pi0Model
    from ..model import preset as get_preset
    from ..policy import Policy, check_runtime, check_seed, random_model_config, robot_runtime
    from ..transforms.robot import robot_spec
    from .stream import load_streams, synthetic_stream

    check_device(src.device)  # before the stream or a model is loaded
    check_seed(src.seed)
    dtype = check_dtype(src.dtype)
    if src.stream is None and (src.steps < 1 or src.episodes < 1):
        raise ValueError(f"steps, episodes: the synthetic stream needs >= 1 of each, "
                         f"got {src.steps} and {src.episodes}")
    stream = load_streams(src.stream) if src.stream else None
    if stream is not None and len(stream) == 0:
        raise ValueError(f"stream {src.stream}: no steps recorded; nothing to compare")
    # A folder's settings (load_streams), e.g. the streams/ folder of an eval run with --with-baseline:
    # every episode twice. A single file's meta is whatever JSON it recorded.
    meta = stream.meta if stream is not None and isinstance(stream.meta, dict) else {}
    settings = meta.get("settings")
    if isinstance(settings, list) and len(settings) > 1:
        print(f"note: stream {src.stream} holds the recordings of {len(settings)} eval settings "
              f"({', '.join(settings)}), all replayed as one stream; to replay one, give its "
              "folder (named by its key) under it", file=sys.stderr)
    robot = stream.robot if stream is not None else "metaworld"
    tiny = get_preset(src.preset).tokenizer == "bytes"
    # The shipped testbed policies are tiny presets that drive Meta-World.
    shipped = shipped_checkpoint(src.preset) if robot == "metaworld" else None
    ckpt = src.checkpoint or (str(shipped) if shipped else None)

    def check_stream(spec) -> None:  # the stream against the policy's robot, before a model is made or loaded
        if stream is None:
            return
        if stream.robot != spec.name:
            raise ValueError(f"stream: recorded for robot {stream.robot!r}, the policy drives {spec.name!r}")
        for i, st in enumerate(stream):  # every step: a folder's later file may lack one
            missing = [k for k in spec.camera_keys if k not in st.raw]
            if missing:
                at = f" at step {i}" if i else ""
                raise ValueError(f"stream {src.stream}: no {missing}{at}; the policy's robot {spec.name!r} has "
                                 f"cameras {list(spec.camera_keys)}")

    if ckpt:
        if src.stats_from is not None:
            shipped = "" if src.checkpoint else f" (without --checkpoint, {src.preset} runs the shipped {ckpt})"
            raise ValueError(f"stats_from: only for a random full-size model (--preset pi0 / pi05, no --checkpoint): "
                             f"a checkpoint brings its own{shipped}")
        from ..checkpoint import checkpoint_format, read_meta, print_checkpoint_notes

        # A reference (lerobot / openpi) checkpoint names no robot: the stream's (else Meta-World's).
        named = checkpoint_format(ckpt) == "kvreuse" and read_meta(ckpt).get("robot") is not None
        check_stream(robot_spec(read_meta(ckpt)["robot"] if named else robot))
        policy = Policy.from_checkpoint(ckpt, device=src.device, seed=src.seed, tokenizer=src.tokenizer, dtype=dtype,
                                        fast=src.fast, robot=None if named else robot)
        what = f"checkpoint {ckpt}"
        print_checkpoint_notes(ckpt)
    else:
        # A random model over the robot's cameras and dims. A full-size preset is made on the device
        # in its dtype (its latency does not depend on the values), with the byte tokenizer standing
        # in for PaliGemma's unless --tokenizer is given (other token counts: other prompt rows).
        spec, cfg = robot_spec(robot), get_preset(src.preset)
        check_stream(spec)
        what = f"random {src.preset} (seed {src.seed})"
        if cfg.tokenizer != "bytes" and src.tokenizer is None:
            cfg = cfg.replace(tokenizer="bytes")
            what += ", the byte tokenizer standing in for PaliGemma's"
        cfg = random_model_config(cfg, spec)
        stats = None
        if src.stats_from is not None:
            from ..checkpoint import load_norm_stats

            stats = load_norm_stats(src.stats_from)
        # the stats' dims and --tokenizer, before a full-size model is made (minutes, 12 GB on a CPU)
        check_runtime(cfg, spec, src.tokenizer, stats=stats, where=f"stats_from {src.stats_from}: norm stats")
        if tiny and src.dtype == "float32":  # as before the full-size presets came in
            torch.manual_seed(src.seed)
            with torch.device(src.device):
                model = Pi0Model(cfg).eval()
        else:
            model = build_random(cfg, src.device, dtype, src.seed)
        if stats is not None:
            what += f", norm stats of {src.stats_from}"
        model, tf = robot_runtime(model, spec, stats, tokenizer=src.tokenizer, fast=src.fast)
        policy = Policy(model, tf, seed=src.seed)
    # `kvreuse eval --streams` names the weights that ran: another policy replays other decisions
    recorded = meta.get("policies") if "policies" in meta else [meta.get("policy")]
    theirs = sorted({r for r in recorded if isinstance(r, str)}) if isinstance(recorded, list) else []
    if theirs:
        from ..eval.sweep import weights_identity

        mine = weights_identity(ckpt, src.preset) if ckpt else f"random:{src.preset}:seed{src.seed}"
        # a policy id is the weights' id, then "+"-joined tags (device, dtype, stats...); a folder may hold "+"
        if not any(r == mine or r.startswith(mine + "+") for r in theirs):
            print(f"note: stream {src.stream} was recorded through {', '.join(theirs)}, replayed through {mine}: "
                  "the live run's decisions replay only through the policy that ran it (--checkpoint / --preset)",
                  file=sys.stderr)
    spec = policy.transform.spec
    if stream is not None:  # checked against this spec above, before the model
        what += f", stream {src.stream} ({len(stream)} steps, {stream.episodes} episodes)"
    else:
        size = policy.model.cfg.vision.image_size
        stream = synthetic_stream(src.steps, src.episodes, size, src.seed, spec.camera_keys, spec.state_dim, spec.name)
        what += f", synthetic stream ({src.episodes} x {src.steps} steps)"
    if src.fast or src.dtype != "float32":
        what += f" [{src.dtype}{', FastPi0' if src.fast else ''}, {src.device}]"
    if src.save_stream:
        stream.save(src.save_stream)
    return policy, stream, what


def run_compare(
    cmd: Annotated[
        Union[
            Annotated[Actions, tyro.conf.subcommand("actions")],
            Annotated[Deterministic, tyro.conf.subcommand("deterministic")],
            Annotated[Modes, tyro.conf.subcommand("modes")],
            Annotated[Grid, tyro.conf.subcommand("grid")],
        ],
        tyro.conf.OmitSubcommandPrefixes,
        tyro.conf.arg(name=""),
    ],
) -> None:
    """Compare reuse settings with the baseline on one observation stream (actions, grid, modes), or check
    bit-identity (deterministic)."""
    import torch

    from .compare import compare_actions, compare_deterministic

    threads = cmd.src.threads
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected an integer >= 1, got {threads}")
    torch.set_num_threads(threads or min(torch.get_num_threads(), 4))
    from ..outputs import check_file_out

    for option, path in (("json_out", getattr(cmd, "json_out", None)), ("save_stream", cmd.src.save_stream)):
        if path:  # before the model and the replays
            check_file_out(path, option)
    if isinstance(cmd, Actions):
        base, stream, what = load(cmd.src)
        cand = base.fork(cmd.reuse)
        res = compare_actions(base, cand, stream, cmd.src.seed)
        print(f"{what}\nsetting: {cmd.reuse.label()}")
        if cmd.per_call:
            for i, (c, d, dec) in enumerate(zip(res.cosine, res.l2, res.decisions)):
                print(f"  call {i:4d}  {dec:7s}  cos {c:.6f}  l2 {d:.5f}")
        s = res.summary()
        on_reuse = s["cos_mean_on_reuse"]
        print(
            f"calls {s['calls']}  reuse rate {s['reuse_rate']:.1%}\n"
            f"cosine mean {s['cos_mean']:.6f}  min {s['cos_min']:.6f}  p5 {s['cos_p5']:.6f}  "
            f"mean on reuse {'n/a (nothing reused)' if on_reuse is None else f'{on_reuse:.6f}'}\n"
            f"L2 mean {s['l2_mean']:.5f}  max {s['l2_max']:.5f}\n"
            + (f"latency mean: baseline {s['baseline_ms']:.2f} ms, setting {s['candidate_ms']:.2f} ms "
               f"(x{s['speedup']:.2f})" if s["speedup"] == s["speedup"] else
               "latency: n/a (only warm-up calls on a side: replay a longer stream to time them)")
        )
        if cmd.json_out:
            with open(cmd.json_out, "w") as f:
                json.dump(_json_ready({"setting": cmd.reuse.to_dict(), "label": cmd.reuse.label(), "source": what,
                                       "cosine": res.cosine, "l2": res.l2, "decisions": res.decisions, "summary": s}),
                          f, indent=1, allow_nan=False)
        return
    if isinstance(cmd, Grid):
        run_grid(cmd)
        return
    if isinstance(cmd, Modes):
        if cmd.reuse.gate == "never":  # every row would be the baseline, each labelled 'never'
            raise ValueError("gate: 'never' never reuses, so every mode would be the baseline; "
                             "give a gate that reuses, e.g. --gate always")
        from ..outputs import stop_keeping
        from .config import MODES

        base, stream, what = load(cmd.src)
        print(what)
        rows: list[str] = []
        try:
            table = mode_table(base, stream, cmd.reuse, cmd.src.seed, rows)
        except (KeyboardInterrupt, Exception) as e:  # stopped or failed mid-table: the rows made are not lost
            done = max(len(rows) - 2, 0)  # the header's two lines
            if not done:
                raise
            print("\n".join(rows))
            names = ("baseline",) + MODES
            stop_keeping(e, f"modes: {names[done]}", f"{done} of {len(names)} rows replayed, in the table above")
        print(table)
        return
    base, stream, what = load(cmd.src)
    checks = compare_deterministic(base, stream, cmd.src.seed)
    print(f"{what}")
    for c in checks:
        print(f"  {'OK  ' if c.identical else 'FAIL'} {c.name}: max |diff| {c.max_abs_diff:.3g}")
    if not all(c.identical for c in checks):
        print("kvreuse: error: outputs are not bit-identical", file=sys.stderr)  # as every other error line
        raise SystemExit(1)
    print("all bit-identical")


def run_grid(cmd: Grid) -> None:
    from ..eval.sweep import canonical_grid, parse_grid, reuse_config
    from ..outputs import stop_keeping
    from .compare import compare_actions, grid_table, replay

    settings = canonical_grid(parse_grid(list(cmd.grid)))  # bad specs fail before any work
    if not settings:
        raise ValueError("grid: no settings given; e.g. --grid 'gate=crossmodal threshold=0.9'")
    base, stream, what = load(cmd.src)
    for params, label in settings:  # what only the model checks (its dims, depth): before any replay
        _check_setting(base, reuse_config(params), f"grid: setting {label}")
    print(what, flush=True)
    ref = replay(base, stream, cmd.src.seed)
    # The first replay is the reference every speedup divides by; a second one shows the spread.
    again = compare_actions(base, base, stream, cmd.src.seed, reference=ref)
    rows, dumps = [("**baseline** (reference)", compare_actions(base, base, stream, cmd.src.seed, reference=ref,
                                                                candidate_replay=ref)),
                   ("baseline, replayed again", again)], []
    cfg = base.model.cfg

    def write(complete: bool) -> None:
        with open(cmd.json_out, "w") as f:
            json.dump(_json_ready({"source": what, "baseline": again.baseline, "baseline_again": again.candidate,
                                   "settings": dumps, "complete": complete, "settings_total": len(settings)}),
                      f, indent=1, allow_nan=False)

    label = ""
    try:
        for params, label in settings:
            res = compare_actions(base, base.fork(reuse_config(params)), stream, cmd.src.seed, reference=ref)
            rows.append((label, res))
            vis, tl = res.work(cfg)
            dumps.append({"setting": params, "label": label, "summary": res.summary(), "latency": res.candidate,
                          "vision_passes_per_call": vis, "prefix_token_layer_share": tl})
            print(f"  {label}: reuse {res.summary()['reuse_rate']:.1%}, x{res.summary()['speedup']:.2f}", flush=True)
    except (KeyboardInterrupt, Exception) as e:  # a long grid, stopped or failed: what was replayed is not lost
        print(grid_table(rows, cfg))
        if cmd.json_out:
            write(False)
        kept = f"{len(dumps)} of {len(settings)} settings replayed" + (
            f", written to {cmd.json_out} (\"complete\": false)" if cmd.json_out else ", in the table above")
        stop_keeping(e, f"grid: setting {label}", kept)
    print("open-loop replay (success is not measured here); latency without warm-up calls")
    print(grid_table(rows, cfg))
    if cmd.json_out:
        write(True)


def _json_ready(x):
    """`x` with NaN / inf (a speedup without timed calls) as null: JSON has no NaN, and strict
    readers (JavaScript's JSON.parse, jq < 1.7) refuse the file Python writes with it."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def _check_setting(base, reuse: ReuseConfig, what: str) -> None:
    """`reuse` against `base`'s model (what a ReuseConfig cannot check alone), as one ValueError."""
    try:
        base.fork(reuse)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def mode_table(base, stream, reuse: ReuseConfig, seed: int, rows: list[str] | None = None) -> str:
    """Markdown table: one row per mode (and the baseline) under `reuse`'s gate. rows: a list the
    table's lines are appended to as they are made (what is left of it if a replay stops)."""
    import numpy as np

    from ..outputs import md_cell
    from .compare import compare_actions
    from .config import MODES

    cfg = base.model.cfg
    configs = [ReuseConfig() if mode == "baseline" else reuse.replace(mode=mode) for mode in ("baseline",) + MODES]
    for rc in configs[1:]:  # e.g. a layer_split past the depth fails here, not after four replays
        _check_setting(base, rc, f"modes: {rc.mode}")
    rows = [] if rows is None else rows
    rows += [
        "| setting | reuse rate | vision passes / call | prefix token-layers vs baseline | vision ms | prefix ms "
        "| denoise ms | sample ms | total ms | action cos (mean / min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rc in configs:
        res = compare_actions(base, base.fork(rc), stream, seed)
        s, recs = res.summary(), [r for r in res.records if not r.warmup]  # as grid and actions: no warm-ups
        vis, tl = res.work(cfg)
        means = [float(np.mean([r.timings.get(k, 0.0) for r in recs])) if recs else float("nan")
                 for k in ("vision", "prefix", "denoise", "sample", "total")]
        ms = " | ".join("n/a" if m != m else f"{m:.2f}" for m in means)
        rows.append(f"| {md_cell(rc.label())} | {s['reuse_rate']:.1%} | {vis:.2f} | {tl:.1%} | {ms} | "
                    f"{s['cos_mean']:.5f} / {s['cos_min']:.5f} |")
    return "\n".join(rows)
