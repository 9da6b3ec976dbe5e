"""State / action normalization: mean-std or quantiles q01/q99 -> [-1, 1]. Pi0 defaults to
mean-std and Pi0.5 to quantiles; a lerobot checkpoint may say otherwise per side (its config.json
normalization_mapping), which NormStats then carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

NormMode = Literal["meanstd", "quantile"]
NORM_MODES: tuple[NormMode, ...] = ("meanstd", "quantile")
LEROBOT_NAMES: dict[NormMode, str] = {"meanstd": "MEAN_STD", "quantile": "QUANTILES"}  # lerobot's names
NEEDS: dict[NormMode, tuple[str, str]] = {"meanstd": ("mean", "std"), "quantile": ("q01", "q99")}


def default_mode(variant: str) -> NormMode:
    return "quantile" if variant == "pi05" else "meanstd"


@dataclass
class Stats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @staticmethod
    def of(x: np.ndarray) -> "Stats":
        """Stats over all rows of x (N, D)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        return Stats(x.mean(0), x.std(0), np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0))

    def to_dict(self) -> dict[str, list[float]]:
        return {k: np.asarray(getattr(self, k), dtype=np.float64).tolist() for k in ("mean", "std", "q01", "q99")}

    @staticmethod
    def from_dict(d: dict) -> "Stats":
        return Stats(*(np.asarray(d[k], dtype=np.float64) for k in ("mean", "std", "q01", "q99")))

    def check(self, mode: NormMode) -> None:
        """The two stats `mode` applies are finite 1-D arrays of one length (a null or NaN inside one
        passed every check, and the first call blamed the observation)."""
        a, b = (np.asarray(getattr(self, k)) for k in NEEDS[mode])
        for name, v in zip(NEEDS[mode], (a, b), strict=True):
            if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
                what = f"shape {v.shape}" if v.ndim != 1 or v.size == 0 else "non-finite values (null or NaN)"
                raise ValueError(f"{name} ({mode}): expected a non-empty list of finite numbers, got {what}")
        if a.shape != b.shape:
            raise ValueError(f"{NEEDS[mode][0]} ({mode}): {a.size} values, but {NEEDS[mode][1]} has {b.size}")


@dataclass
class NormStats:
    state: Stats
    actions: Stats
    # The mode each side was trained with, where the checkpoint says (lerobot's normalization_mapping);
    # None: the variant's default. Kept with the stats so that every loader applies them.
    state_mode: NormMode | None = None
    actions_mode: NormMode | None = None

    def to_dict(self) -> dict:
        modes = {f"{k}_mode": m for k, m in (("state", self.state_mode), ("actions", self.actions_mode)) if m}
        return {"state": self.state.to_dict(), "actions": self.actions.to_dict(), **modes}

    @staticmethod
    def from_dict(d: dict) -> "NormStats":
        modes = {k: d.get(k) for k in ("state_mode", "actions_mode")}
        check_modes(modes)
        return NormStats(Stats.from_dict(d["state"]), Stats.from_dict(d["actions"]), **modes)

    def check(self, variant: str) -> None:
        """Each side's stats for its mode (Stats.check), the side named in the error."""
        for side, st, mode in zip(("state", "actions"), (self.state, self.actions), self.modes(variant), strict=True):
            try:
                st.check(mode)
            except ValueError as e:
                raise ValueError(f"{side}.{e}") from None

    def modes(self, variant: str) -> tuple[NormMode, NormMode]:
        """(state mode, actions mode) these stats are applied with under a `variant` model."""
        return self.state_mode or default_mode(variant), self.actions_mode or default_mode(variant)


def check_modes(modes: dict[str, object]) -> None:
    """One error naming every mode that is neither None nor in NORM_MODES (normalize() would
    take any other string as quantiles)."""
    bad = {k: m for k, m in modes.items() if m is not None and m not in NORM_MODES}
    if bad:
        raise ValueError(f"{', '.join(f'{k} {m!r}' for k, m in bad.items())}: expected one of {NORM_MODES}")


def normalize(x: np.ndarray, s: Stats, mode: NormMode) -> np.ndarray:
    d = x.shape[-1]
    if mode == "meanstd":
        return (x - s.mean[:d]) / (s.std[:d] + 1e-6)
    lo, hi = s.q01[:d], s.q99[:d]
    return (x - lo) / (hi - lo + 1e-6) * 2.0 - 1.0


def unnormalize(x: np.ndarray, s: Stats, mode: NormMode) -> np.ndarray:
    d = x.shape[-1]
    if mode == "meanstd":
        return x * (s.std[:d] + 1e-6) + s.mean[:d]
    lo, hi = s.q01[:d], s.q99[:d]
    return (x + 1.0) / 2.0 * (hi - lo + 1e-6) + lo


def pad_to(x: np.ndarray, dim: int) -> np.ndarray:
    if x.shape[-1] > dim:
        raise ValueError(f"vector of {x.shape[-1]} dims does not fit the model's {dim}")
    out = np.zeros(x.shape[:-1] + (dim,), dtype=np.float32)
    out[..., : x.shape[-1]] = x
    return out
