"""`kvreuse info PATH`: what a checkpoint is, read from its headers (no weights are loaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tyro.conf import Positional

_PARTS = (
    ("vision tower (SigLIP)", ("vision.",)),
    ("projector", ("projector.",)),
    ("token embedding", ("llm.embed.",)),
    ("prefix LM (Gemma)", ("llm.",)),
    ("action expert (Gemma)", ("expert.",)),
    ("action/state/time heads", ("",)),
)


def _state_route(cfg) -> str:
    if cfg.state_token:
        return "state as a suffix token"
    if cfg.state_in_prompt:
        return "state in the prompt, adaptive RMSNorm"
    return "no state input (discrete_state_input false), adaptive RMSNorm"


def _action_route(cfg) -> str:
    dims = [i for i, d in enumerate(cfg.delta_action_mask) if d]
    if not dims:
        return "absolute"
    return f"dims {dims} as offsets from the state's (delta_action_mask; the state is added back)"


def _part_counts(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, int]]:
    counts = {name: 0 for name, _ in _PARTS}
    for key, shape in shapes.items():
        for name, prefixes in _PARTS:
            if key.startswith(prefixes):
                counts[name] += int(np.prod(shape)) if shape else 1
                break
    return list(counts.items())


def _stats_lines(stats, variant: str, fmt: str, mapping: bool = False) -> list[str]:
    """fmt: the checkpoint's format ("kvreuse", or a reference layout); mapping: the checkpoint's modes come
    from a lerobot config.json's normalization_mapping (else from our norm_stats.json)."""
    from .transforms.normalize import LEROBOT_NAMES, NEEDS, default_mode

    if stats is None:
        from .checkpoint import stats_files

        return [f"  none found (looked for {stats_files(fmt)}): states and actions would pass unnormalized"]
    modes = stats.modes(variant)
    d = default_mode(variant)
    if modes == (d, d):
        why = f"the {variant} default"
    else:
        why = "config.json normalization_mapping" if mapping else "norm_stats.json"
    out = [f"  normalization: state {LEROBOT_NAMES[modes[0]]} ({'/'.join(NEEDS[modes[0]])}), actions "
           f"{LEROBOT_NAMES[modes[1]]} ({'/'.join(NEEDS[modes[1]])}) ({why})"]
    for name in ("state", "actions"):
        s = getattr(stats, name)
        have = [k for k in ("mean", "std", "q01", "q99") if np.isfinite(getattr(s, k)).all()]
        dims = len(s.mean)
        desc = f"  {name}: {dims} dims, stats {'/'.join(have) or 'none'}"
        if "mean" in have:
            desc += f", mean in [{s.mean.min():.3g}, {s.mean.max():.3g}], std in [{s.std.min():.3g}, {s.std.max():.3g}]"
        if "q01" in have:
            desc += f", q01..q99 spans [{s.q01.min():.3g}, {s.q99.max():.3g}]"
        out.append(desc)
    return out


def _is_stream(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return "kvreuse_stream" in (f.metadata() or {})
    except (OSError, SafetensorError):
        return False  # not a safetensors file at all: the checkpoint checks name the problem


def describe(path: str | Path) -> str:
    """A multi-line description of a checkpoint (ours or a lerobot/openpi safetensors)."""
    from .checkpoint import (
        check_weights,
        checkpoint_format,
        own_weights,
        read_config,
        read_header,
        read_meta,
        read_stats,
    )

    path = Path(path)
    if path.is_file() and _is_stream(path):  # else the reference check would say "cannot tell Pi0 from Pi0.5"
        raise ValueError(f"{path}: a kvreuse observation stream, not a checkpoint; replay it with "
                         "`kvreuse compare grid --stream PATH` (docs/REUSE.md)")
    if checkpoint_format(path) == "kvreuse":
        meta = read_meta(path)
        cfg = read_config(path, meta)
        weights = own_weights(path)
        shapes, dts = read_header(weights)
        check_weights(weights, cfg, shapes, dts)  # the config must describe these weights
        dtypes = sorted(set(dts.values()))
        stats = read_stats(path, cfg.variant)
        fmt, robot = "kvreuse", meta.get("robot", "unknown")
        extra = {k: v for k, v in meta.items() if k not in ("model", "robot")}
        mapping = False
    else:
        from .ref_checkpoint import check_reference

        ref, cfg, source, stats = check_reference(path)
        shapes = {ours: ref.shapes[k] for ours, k in source.items()}
        dtypes = sorted(set(ref.dtypes.values()))
        fmt = ref.layout
        robot, weights = "not recorded (reference checkpoint)", ref.path
        extra = {"type": ref.config["type"]} if "type" in ref.config else {}
        mapping = ref.config.get("normalization_mapping") is not None
    total = sum(int(np.prod(s)) for s in shapes.values())
    p = cfg.vision.num_patches
    lines = [
        f"checkpoint: {path}",
        f"format: {fmt} ({weights.name}, {', '.join(dtypes)})",
        f"variant: {cfg.variant} "
        f"({_state_route(cfg)})",
        f"parameters: {total / 1e6:,.2f}M",
    ]
    lines += [f"  {name}: {n / 1e6:,.2f}M" for name, n in _part_counts(shapes) if n]
    lines += [
        (f"shapes: vision {cfg.vision.width}x{cfg.vision.depth}, LM {cfg.llm.width}x{cfg.llm.depth}, "
         f"expert {cfg.expert.width}x{cfg.expert.depth}, vocabulary {cfg.vocab_size}"),
        (f"prefix: {cfg.prefix_len} tokens = {len(cfg.cameras)} cameras x {p} patches "
         f"({cfg.vision.image_size}px / {cfg.vision.patch_size}) + {cfg.max_token_len} prompt tokens"),
        (f"suffix: {cfg.suffix_len} tokens ({cfg.chunk_size} actions{' + 1 state' if cfg.state_token else ''}), "
         f"{cfg.num_steps} Euler steps"),
        f"cameras: {', '.join(cfg.cameras)}",
        f"robot: {robot} (state {cfg.state_dim} of {cfg.max_state_dim} dims, actions {cfg.action_dim} of {cfg.max_action_dim})",
        f"actions: {_action_route(cfg)}",
        f"tokenizer: {cfg.tokenizer} (a prompt without the state as {cfg.prompt_style} tokenizes it)",
        "norm stats:",
        *_stats_lines(stats, cfg.variant, fmt, mapping),
    ]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def run_info(path: Positional[str]) -> None:
    """Print what a checkpoint is: variant, parameter counts per part, prefix/suffix lengths,
    cameras, robot and norm stats.

    Args:
        path: our checkpoint directory, or a lerobot/openpi model.safetensors (file or directory)."""
    print(describe(path))
