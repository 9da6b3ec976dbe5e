"""Checkpoints. Our own format is a directory:

    model.safetensors   weights (our parameter names)
    config.json         {"model": ModelConfig, "robot": robot name, ...extra metadata}
    norm_stats.json     NormStats (state and actions)

Reference checkpoints (lerobot and openpi-converted Pi0 / Pi0.5 `model.safetensors`, a file or
a directory) load through the same `load_checkpoint`: their keys are mapped to ours, the variant is
read from the keys and checked against the config, and their norm stats are read from
`norm_stats.json` (openpi) or the lerobot processor safetensors beside the weights.

Only safetensors and JSON are read: nothing is ever unpickled. Every unreadable or ill-typed file
is one ValueError naming it; `check_checkpoint` runs those checks from the headers alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model.config import ModelConfig
from .model.pi0 import Pi0Model
from .outputs import usual_mode
from .transforms.normalize import NormStats

WEIGHTS = "model.safetensors"


def save_checkpoint(path: str | Path, model: Pi0Model, stats: NormStats | None, robot: str, **extra) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    meta = {"model": model.cfg.to_dict(), "robot": robot, **extra}
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    if stats is not None:
        (path / "norm_stats.json").write_text(json.dumps(stats.to_dict(), indent=2))
    usual_mode(path / WEIGHTS)
    return path


# ---- readers: every error is one ValueError naming the file -------------------------------------


def read_json(f: Path):
    try:
        return json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {f}: not valid JSON ({e})") from None


def read_header(f: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """{key: shape}, {key: dtype} of a safetensors file, from its header only (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as sf:
            slices = {k: sf.get_slice(k) for k in sf.keys()}  # noqa: SIM118 (a safe_open handle)
            return ({k: tuple(s.get_shape()) for k, s in slices.items()},
                    {k: str(s.get_dtype()) for k, s in slices.items()})
    except (OSError, SafetensorError) as e:  # truncated, garbage, not safetensors at all
        raise ValueError(f"checkpoint {f}: not a readable safetensors file ({e})") from None


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names; ints, bools and fp8 (no scales) were cast


def check_dtypes(f: Path, dtypes: dict[str, str], skip=lambda key: False) -> None:
    """Weights of a float dtype only (keys `skip` names are not loaded)."""
    bad = {k: d for k, d in dtypes.items() if d not in FLOAT_DTYPES and not skip(k)}
    if bad:
        some = ", ".join(f"{k} {d}" for k, d in list(bad.items())[:3]) + (", ..." if len(bad) > 3 else "")
        raise ValueError(f"checkpoint {f}: {len(bad)} tensor(s) of a non-float dtype ({some}); kvreuse reads "
                         f"float weights only ({', '.join(FLOAT_DTYPES)})")


def own_weights(path: Path) -> Path:
    f = path / WEIGHTS
    if not f.is_file():
        raise ValueError(f"checkpoint {path}: no {WEIGHTS} (only safetensors weights are read, never pickles)")
    return f


def is_own_weights(keys) -> bool:
    """Our parameter names (a kvreuse model.safetensors), never a reference file's."""
    return any(k in ("vision.patch_embed.weight", "llm.embed.weight") for k in keys)


def read_meta(path: str | Path) -> dict:
    """config.json of a checkpoint directory (ours, or the lerobot/openpi one beside reference
    weights). A kvreuse-looking one must have its "model" section."""
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"checkpoint {path}: no config.json (expected a kvreuse checkpoint directory)")
    meta = read_json(f)
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {f}: expected a JSON object, got {type(meta).__name__}")  # noqa: TRY004 (bad input)
    if "model" in meta:
        if not isinstance(meta["model"], dict):
            got = type(meta["model"]).__name__
            raise ValueError(f"checkpoint {f}: \"model\" must be an object (a ModelConfig), got {got}")
    elif "robot" in meta or ((path / WEIGHTS).is_file() and is_own_weights(read_header(path / WEIGHTS)[0])):
        # Without this it would pass for a lerobot/openpi config and fail on the keys.
        raise ValueError(f"checkpoint {f}: no \"model\" section "
                         "(a kvreuse config.json is {\"model\": {...}, \"robot\": ...})")
    return meta


def read_config(path: str | Path, meta: dict | None = None) -> ModelConfig:
    """The ModelConfig of our checkpoint directory, types checked."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    try:
        return ModelConfig.from_dict(meta["model"])
    except ValueError as e:
        raise ValueError(f"checkpoint {path / 'config.json'}: {e}") from None


def read_stats(path: str | Path, variant: str | None = None) -> NormStats | None:
    """norm_stats.json of our checkpoint directory; the stats its modes use (variant: the model's,
    default from its config.json) must be finite 1-D arrays."""
    f = Path(path) / "norm_stats.json"
    if not f.is_file():
        return None
    d = read_json(f)
    try:
        if not isinstance(d, dict):
            raise TypeError(f"got {type(d).__name__}")  # noqa: TRY301 - one message for every ill-typed file
        stats = NormStats.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        problem = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"checkpoint {f}: expected \"state\" and \"actions\", each with mean/std/q01/q99 "
                         f"number arrays ({problem})") from None
    try:
        stats.check(variant or read_config(path).variant)
    except ValueError as e:
        raise ValueError(f"checkpoint {f}: {e}") from None
    return stats


def checkpoint_stats(path: str | Path) -> NormStats | None:
    """The norm stats of a checkpoint (ours, or a reference one) or None, without its weights."""
    if checkpoint_format(path) == "kvreuse":
        return read_stats(path)
    from .ref_checkpoint import check_reference

    return check_reference(path)[3]


def load_norm_stats(path: str | Path) -> NormStats:
    """The norm stats of a checkpoint (ours, or a reference one), without its weights."""
    stats = checkpoint_stats(path)
    if stats is None:
        raise ValueError(f"checkpoint {path}: has no norm stats")
    return stats


def checkpoint_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(the ModelConfig its weights load into, our config.json or {} for a reference checkpoint),
    from config.json and the weights' header alone: what a load would be, before the load."""
    if checkpoint_format(path) == "kvreuse":
        meta = read_meta(path)
        return read_config(path, meta), meta
    from .ref_checkpoint import check_reference

    return check_reference(path)[1], {}


def stats_files(fmt: str) -> str:
    """Where a checkpoint of this format ("kvreuse", else a reference one) has its norm stats read from."""
    if fmt == "kvreuse":  # read_stats reads this one file, in kvreuse's layout
        return 'norm_stats.json as kvreuse writes it: {"state": {...}, "actions": {...}}'
    return ("norm_stats.json (openpi; also assets/<asset id>/norm_stats.json), lerobot's "
            "policy_preprocessor_*_normalizer_processor.safetensors, or old lerobot's buffers in the weights")


def missing_stats_warning(path: str | Path) -> str | None:
    """A warning line if a checkpoint has no norm stats: it runs, but the robot's states reach the
    model and its actions leave it unnormalized, which only an untrained model does not mind."""
    if checkpoint_stats(path) is not None:
        return None
    return (f"warning: checkpoint {path} has no norm stats beside its weights "
            f"({stats_files(checkpoint_format(path))}): states and "
            "actions pass unnormalized; copy its stats there if it was trained")


def print_checkpoint_notes(path: str | Path) -> None:
    """What eval, serve and compare print on stderr once a checkpoint is checked: missing norm
    stats, and where its config.json does not say so, a Pi0.5 that runs without its state, a Pi0
    whose actions are offsets from the state, or the action chunk it runs."""
    notes = [missing_stats_warning(path)]
    if checkpoint_format(path) != "kvreuse":
        from .ref_checkpoint import default_horizon, delta_action_mask, discrete_state_input, inspect_reference

        ref = inspect_reference(path)
        notes += [discrete_state_input(ref)[1], delta_action_mask(ref)[1], default_horizon(ref)[1]]
    for note in filter(None, notes):
        print(note, file=sys.stderr)


def check_weights(f: Path, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
    """The file's keys, shapes and dtypes against a `cfg` model (built on the meta device: free)."""
    check_dtypes(f, dtypes)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Pi0Model(cfg).state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k}: file {shapes[k]} vs config {s}" for k, s in expected.items() if k in shapes and shapes[k] != s]
    problems = [f"{label} {items[:5]}" + (f" and {len(items) - 5} more" if len(items) > 5 else "")
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected)) if items]
    if wrong:
        problems.append(f"wrong shape {wrong[0]}")
    if problems:
        raise ValueError(f"checkpoint {f} does not fit its config.json ({cfg.variant}): " + "; ".join(problems))


def check_checkpoint(path: str | Path) -> None:
    """Validate a checkpoint cheaply, before any work: config readable and typed, weights header
    readable and fitting the config, norm stats readable, nothing but safetensors/JSON. Reads
    headers only (no tensor of the model). Raises one ValueError naming the file."""
    path = Path(path)
    if checkpoint_format(path) != "kvreuse":
        from .ref_checkpoint import check_reference

        check_reference(path)
        return
    cfg = read_config(path)
    f = own_weights(path)
    check_weights(f, cfg, *read_header(f))
    read_stats(path, cfg.variant)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Pi0Model, NormStats | None, dict]:
    """Load a checkpoint -> (model in eval mode, norm stats or None, metadata). Our own format,
    or a reference (lerobot / openpi) `model.safetensors` file or directory."""
    from safetensors import SafetensorError

    path = Path(path)
    if checkpoint_format(path) != "kvreuse":
        from .ref_checkpoint import load_reference

        return load_reference(path, device=device, dtype=dtype)
    meta = read_meta(path)
    cfg = read_config(path, meta)
    f = own_weights(path)
    check_weights(f, cfg, *read_header(f))  # before building anything
    stats = read_stats(path, cfg.variant)
    with torch.device(device):
        model = Pi0Model(cfg)
    try:
        weights = load_file(str(f), device=str(device))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"checkpoint {f}: not a readable safetensors file ({e})") from None
    model.load_state_dict(weights, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), stats, meta


def checkpoint_format(path: str | Path) -> str:
    """"kvreuse" (our directory format) or "reference" (a model.safetensors of lerobot/openpi)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path}: no such file or directory")
    if path.is_dir() and (path / "config.json").is_file():
        return "kvreuse" if "model" in read_meta(path) else "reference"
    return "reference"
