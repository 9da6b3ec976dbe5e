"""Checkpoints shipped inside the package: the Meta-World testbed policies.

    testbed-pi05/   tiny Pi0.5-style policy (state discretized into the prompt)
    testbed-pi0/    tiny Pi0-style policy (state as a suffix token)

Each is a kvreuse checkpoint directory (model.safetensors, config.json, norm_stats.json);
docs/TESTBED.md gives the commands that reproduce them and their measured success.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
VARIANTS = {"pi05": "testbed-pi05", "pi0": "testbed-pi0"}


def default_checkpoint(variant: str = "pi05") -> Path:
    """Path of the shipped testbed checkpoint for `variant` ("pi05" or "pi0")."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    path = ASSETS / VARIANTS[variant]
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"the shipped {variant} testbed checkpoint is missing at {path} (see docs/TESTBED.md)")
    return path


def shipped_checkpoint(preset: str = "tiny-pi05") -> Path | None:
    """The testbed policy a tiny preset stands for (tiny-pi0 / tiny-pi05): what eval, compare and
    serve run without --checkpoint on Meta-World. None for other presets or missing weights."""
    try:
        return default_checkpoint(preset.removeprefix("tiny-")) if preset.startswith("tiny-") else None
    except ValueError:  # its weights are missing
        return None
