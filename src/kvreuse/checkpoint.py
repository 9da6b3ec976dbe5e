"""Checkpoints. Our own format is a directory:

    model.safetensors   weights (our parameter names)
    config.json         {"model": ModelConfig, "robot": robot name, ...extra metadata}
    norm_stats.json     NormStats (state and actions)

Reference checkpoints (lerobot and openpi-converted Pi0 / Pi0.5 `model.safetensors`, a file or
a directory) load through the same `load_checkpoint`: their keys are mapped to ours, the variant is
read from the keys and checked against the config, and their norm stats are read from
`norm_stats.json` (openpi) or the lerobot processor safetensors beside the weights.

Only safetensors and JSON are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model.config import ModelConfig
from .model.pi0 import Pi0Model
from .transforms.normalize import NormStats


def save_checkpoint(path: str | Path, model: Pi0Model, stats: NormStats | None, robot: str, **extra) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    meta = {"model": model.cfg.to_dict(), "robot": robot, **extra}
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    if stats is not None:
        (path / "norm_stats.json").write_text(json.dumps(stats.to_dict(), indent=2))
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"checkpoint {path}: no config.json (expected a kvreuse checkpoint directory)")
    return json.loads(f.read_text())


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Pi0Model, NormStats | None, dict]:
    """Load a checkpoint -> (model in eval mode, norm stats or None, metadata). Our own format,
    or a reference (lerobot / openpi) `model.safetensors` file or directory."""
    path = Path(path)
    if checkpoint_format(path) != "kvreuse":
        from .ref_checkpoint import load_reference

        return load_reference(path, device=device, dtype=dtype)
    meta = read_meta(path)
    cfg = ModelConfig.from_dict(meta["model"])
    with torch.device(device):
        model = Pi0Model(cfg)
    weights = load_file(str(path / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing keys {missing}, unexpected keys {unexpected}")
    if dtype is not None:
        model = model.to(dtype)
    stats_file = path / "norm_stats.json"
    stats = NormStats.from_dict(json.loads(stats_file.read_text())) if stats_file.is_file() else None
    return model.eval(), stats, meta


def checkpoint_format(path: str | Path) -> str:
    """"kvreuse" (our directory format) or "reference" (a model.safetensors of lerobot/openpi)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path}: no such file or directory")
    f = path / "config.json"
    if path.is_dir() and f.is_file():
        try:
            if "model" in json.loads(f.read_text()):
                return "kvreuse"
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint {path}: config.json is not valid JSON ({e})") from None
    return "reference"
