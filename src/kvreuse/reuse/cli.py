"""`kvreuse compare actions` and `kvreuse compare deterministic` (heavy imports inside)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Optional, Union

import tyro

from .config import ReuseConfig


@dataclass(frozen=True)
class Source:
    checkpoint: Optional[str] = None
    """A kvreuse checkpoint directory. None: the shipped testbed policy if the package has one,
    else a randomly initialised `preset`."""
    preset: str = "tiny-pi05"
    """Preset of the random model (used only without a checkpoint)."""
    tokenizer: Optional[str] = None
    """tokenizer.model for full-size checkpoints."""
    device: str = "cpu"
    stream: Optional[str] = None
    """A recorded observation stream (.safetensors, see docs/REUSE.md). None: a synthetic one."""
    steps: int = 40
    """Synthetic stream: steps per episode."""
    episodes: int = 2
    """Synthetic stream: episodes."""
    seed: int = 0
    """Seeds the random model, the synthetic stream and the noise."""
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
    breakdown and action agreement with the baseline."""

    reuse: Annotated[ReuseConfig, tyro.conf.OmitArgPrefixes] = ReuseConfig(gate="always")
    src: Annotated[Source, tyro.conf.OmitArgPrefixes] = field(default_factory=Source)


@dataclass(frozen=True)
class Deterministic:
    """Same inputs twice, and reuse off vs the plain model: exits non-zero unless every pair of
    action chunks is bit-identical."""

    src: Annotated[Source, tyro.conf.OmitArgPrefixes] = field(default_factory=Source)


def default_checkpoint(preset: str) -> str | None:
    """The testbed policy shipped in kvreuse.assets for this preset's variant, if any."""
    try:
        from ..assets import default_checkpoint as shipped  # type: ignore[attr-defined]
    except ImportError:
        return None
    variant = "pi0" if preset.endswith("pi0") else "pi05"
    try:
        path = shipped(variant)
    except (TypeError, ValueError, FileNotFoundError):
        return None
    return str(path) if path else None


def load(src: Source):
    """-> (baseline Policy, stream, description)."""
    import torch

    from ..model import Pi0Model
    from ..model import preset as get_preset
    from ..model.tokenizer import load_tokenizer
    from ..policy import Policy
    from ..transforms.robot import RobotTransform, robot_spec
    from .stream import ObservationStream, synthetic_stream

    ckpt = src.checkpoint or default_checkpoint(src.preset)
    if ckpt:
        policy = Policy.from_checkpoint(ckpt, device=src.device, seed=src.seed, tokenizer=src.tokenizer)
        what = f"checkpoint {ckpt}"
    else:
        torch.manual_seed(src.seed)
        with torch.device(src.device):
            model = Pi0Model(get_preset(src.preset)).eval()
        tf = RobotTransform(model.cfg, load_tokenizer(model.cfg, src.tokenizer), None, robot_spec("metaworld"))
        policy = Policy(model, tf, seed=src.seed)
        what = f"random {src.preset} (seed {src.seed})"
    spec = policy.transform.spec
    if src.stream:
        stream = ObservationStream.load(src.stream)
        if stream.robot != spec.name:
            raise ValueError(f"stream: recorded for robot {stream.robot!r}, the policy drives {spec.name!r}")
        what += f", stream {src.stream} ({len(stream)} steps)"
    else:
        size = policy.model.cfg.vision.image_size
        stream = synthetic_stream(src.steps, src.episodes, size, src.seed, spec.camera_keys, spec.state_dim, spec.name)
        what += f", synthetic stream ({src.episodes} x {src.steps} steps)"
    if src.save_stream:
        stream.save(src.save_stream)
    return policy, stream, what


def run_compare(
    cmd: Annotated[
        Union[
            Annotated[Actions, tyro.conf.subcommand("actions")],
            Annotated[Deterministic, tyro.conf.subcommand("deterministic")],
            Annotated[Modes, tyro.conf.subcommand("modes")],
        ],
        tyro.conf.OmitSubcommandPrefixes,
        tyro.conf.arg(name=""),
    ],
) -> None:
    """Compare a reuse setting with the baseline (actions), or check bit-identity (deterministic)."""
    import torch

    from .compare import compare_actions, compare_deterministic

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    if isinstance(cmd, Actions):
        base, stream, what = load(cmd.src)
        cand = base.fork(cmd.reuse)
        res = compare_actions(base, cand, stream, cmd.src.seed)
        print(f"{what}\nsetting: {cmd.reuse.label()}")
        if cmd.per_call:
            for i, (c, d, dec) in enumerate(zip(res.cosine, res.l2, res.decisions)):
                print(f"  call {i:4d}  {dec:7s}  cos {c:.6f}  l2 {d:.5f}")
        s = res.summary()
        print(
            f"calls {s['calls']}  reuse rate {s['reuse_rate']:.1%}\n"
            f"cosine mean {s['cos_mean']:.6f}  min {s['cos_min']:.6f}  p5 {s['cos_p5']:.6f}  "
            f"mean on reuse {s['cos_mean_on_reuse']:.6f}\n"
            f"L2 mean {s['l2_mean']:.5f}  max {s['l2_max']:.5f}\n"
            f"latency mean: baseline {s['baseline_ms']:.2f} ms, setting {s['candidate_ms']:.2f} ms "
            f"(x{s['speedup']:.2f})"
        )
        if cmd.json_out:
            with open(cmd.json_out, "w") as f:
                json.dump({"setting": cmd.reuse.to_dict(), "label": cmd.reuse.label(), "source": what,
                           "cosine": res.cosine, "l2": res.l2, "decisions": res.decisions, "summary": s}, f, indent=1)
        return
    if isinstance(cmd, Modes):
        base, stream, what = load(cmd.src)
        print(what)
        print(mode_table(base, stream, cmd.reuse, cmd.src.seed))
        return
    base, stream, what = load(cmd.src)
    checks = compare_deterministic(base, stream, cmd.src.seed)
    print(f"{what}")
    for c in checks:
        print(f"  {'OK  ' if c.identical else 'FAIL'} {c.name}: max |diff| {c.max_abs_diff:.3g}")
    if not all(c.identical for c in checks):
        print("kvreuse: error: outputs are not bit-identical")
        raise SystemExit(1)
    print("all bit-identical")


def mode_table(base, stream, reuse: ReuseConfig, seed: int) -> str:
    """Markdown table: one row per mode (and the baseline) under `reuse`'s gate."""
    import numpy as np

    from .compare import compare_actions
    from .config import MODES

    cfg = base.model.cfg
    full_tl = cfg.prefix_len * cfg.llm.depth
    rows = [
        "| setting | reuse rate | vision passes / call | prefix token-layers vs baseline | vision ms | prefix ms "
        "| denoise ms | sample ms | total ms | action cos (mean / min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("baseline",) + MODES:
        rc = ReuseConfig() if mode == "baseline" else reuse.replace(mode=mode)
        cand = base.fork(rc)
        recs = []
        orig = cand.runner.infer

        def spy(*a, _orig=orig, **k):
            out, rec = _orig(*a, **k)
            recs.append(rec)
            return out, rec

        cand.runner.infer = spy
        res = compare_actions(base, cand, stream, seed)
        s = res.summary()
        mean = lambda key: float(np.mean([r.timings.get(key, 0.0) for r in recs]))  # noqa: E731
        vis = float(np.mean([r.cost["vision_cameras"] for r in recs]))
        tl = float(np.mean([r.cost["lm_token_layers"] for r in recs])) / full_tl
        rows.append(
            f"| {rc.label()} | {s['reuse_rate']:.1%} | {vis:.2f} | {tl:.1%} | {mean('vision'):.2f} | "
            f"{mean('prefix'):.2f} | {mean('denoise'):.2f} | {mean('sample'):.2f} | {mean('total'):.2f} | "
            f"{s['cos_mean']:.5f} / {s['cos_min']:.5f} |"
        )
    return "\n".join(rows)
