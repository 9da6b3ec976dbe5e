"""ReuseConfig: everything that decides whether and how the prefix KV cache is reused.

One frozen dataclass so a setting can be stored (SQLite row, JSON), compared and swept.
Semantics of every field are in docs/REUSE.md.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

import numpy as np

GateKind = Literal["never", "always", "period", "threshold", "crossmodal", "phase"]
ModeKind = Literal["full", "vision_only", "state_only", "layer_wise", "text_fixed", "partial"]
ImageMetric = Literal["raw", "patch", "siglip"]
StateReference = Literal["state", "cameras", "both"]

GATES: tuple[str, ...] = GateKind.__args__  # type: ignore[attr-defined]
MODES: tuple[str, ...] = ModeKind.__args__  # type: ignore[attr-defined]
METRICS: tuple[str, ...] = ImageMetric.__args__  # type: ignore[attr-defined]
STATE_REFERENCES: tuple[str, ...] = StateReference.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ReuseConfig:
    """A reuse setting. gate="never" (the field's default) is the baseline: every call refreshes."""

    gate: GateKind = "never"
    """never | always | period | threshold | crossmodal | phase."""
    mode: ModeKind = "full"
    """What is reused when the gate says reuse: full | vision_only | state_only | layer_wise |
    text_fixed | partial."""
    synchronized: bool = False
    """Forbid mixing snapshots: if any span must be recomputed, all are (and Pi0's suffix
    state comes from the cache's snapshot on a reuse)."""

    # image similarity (threshold, crossmodal, phase gates)
    threshold: float = 0.985
    """Reuse only if every camera's image similarity >= threshold."""
    image_metric: ImageMetric = "raw"
    """raw: cosine of a downsampled image; patch: fraction of unchanged patches;
    siglip: cosine of the vision tower's embeddings (costs the vision pass)."""
    downsample: int = 32
    """Side of the average-pooled image the raw cosine is computed on."""
    patch_threshold: float = 0.99
    """A patch is unchanged if the cosine of its pixels with the cached ones is >= this
    (patch metric and partial mode)."""
    patch_max_diff: float | None = 0.1
    """If set, a patch is also changed when any of its pixels moved by more than this (model
    input units in [-1, 1]; one 8-bit level is 2/255): a small object that shifts by a pixel or
    two barely moves the cosine of its patch."""

    # state (crossmodal gate)
    state_threshold: float = 0.99
    """Reuse only if cosine(state, cached state) >= this (crossmodal gate)."""
    state_max_l2: float | None = None
    """If set, also require ||s - s_cached|| / sqrt(state_dim) <= this (crossmodal gate); the
    state is normalized, so this is the RMS per-dim change in normalized units."""
    state_reference: StateReference = "both"
    """The state(s) the crossmodal gate's state test compares with. state: the snapshot's that set
    the cache's state information; a mode that recomputes that span on a reuse (Pi0.5's state
    tokens: vision_only, partial) moves it to each such call, so the test bounds consecutive calls
    only. cameras: the state when every camera's K/V were last computed, so the test bounds how far
    the robot moved since the images the cache holds; state_only's update moves it while the cached
    state tokens age. both: each test must pass, so the state bounds the age of either (the default
    since 2026-11-28; state before). They differ only for vision_only, state_only and partial."""

    # period gate
    period: int = 5
    """period gate: refresh every `period` calls (reuse for the period - 1 calls in between)."""

    # phase-aware gate: cues from the last action chunk
    phase_threshold: float = 0.995
    """Image threshold used instead of `threshold` while a phase cue fires (never looser than it)."""
    gripper_dim: int = -1
    """Action dim of the gripper (negative counts from the robot's last action dim)."""
    gripper_delta: float = 0.5
    """Gripper transition cue: the gripper command changes sign within the chunk, or its
    range over the chunk exceeds this (in the model's normalized action units)."""
    variance_threshold: float = 0.05
    """Variance cue: mean over motion dims of the per-dim variance across the chunk above this."""
    curvature_threshold: float = 0.3
    """Curvature cue: mean turning (1 - cosine) between consecutive motion vectors above this."""
    motion_dims: int = 3
    """The first `motion_dims` action dims are the motion (e.g. xyz) for variance/curvature."""
    phase_horizon: int | None = None
    """Cues look at the first `phase_horizon` actions of the chunk (None = whole chunk)."""

    # bounds (apply to every gate)
    max_age_calls: int | None = None
    """Never reuse K/V computed more than this many calls ago."""
    max_age_s: float | None = None
    """Never reuse K/V computed more than this many seconds ago."""

    # layer_wise mode
    layer_split: int | None = None
    """Layers < split reused, >= split recomputed; None = half the prefix LM's depth."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.gate not in GATES:
            raise ValueError(f"reuse.gate: unknown gate {self.gate!r}; expected one of {', '.join(GATES)}")
        if self.mode not in MODES:
            raise ValueError(f"reuse.mode: unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.image_metric not in METRICS:
            raise ValueError(f"reuse.image_metric: unknown metric {self.image_metric!r}; expected one of {', '.join(METRICS)}")
        if self.state_reference not in STATE_REFERENCES:
            raise ValueError(f"reuse.state_reference: expected one of {', '.join(STATE_REFERENCES)}, "
                             f"got {self.state_reference!r}")
        for name in ("threshold", "state_threshold", "phase_threshold", "patch_threshold"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"reuse.{name}: expected a similarity in [-1, 1], got {v}")
        if self.period < 1:
            raise ValueError(f"reuse.period: expected an integer >= 1, got {self.period}")
        if self.downsample < 1:
            raise ValueError(f"reuse.downsample: expected an integer >= 1, got {self.downsample}")
        if self.motion_dims < 1:
            raise ValueError(f"reuse.motion_dims: expected an integer >= 1, got {self.motion_dims}")
        for name in ("max_age_calls", "max_age_s", "state_max_l2", "phase_horizon", "patch_max_diff"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"reuse.{name}: expected a positive number or None, got {v}")
        if self.phase_horizon is not None and self.phase_horizon < 2:  # one action: no flip, spread or turn
            raise ValueError(f"reuse.phase_horizon: expected an integer >= 2 (cues compare consecutive actions) "
                             f"or None, got {self.phase_horizon}")
        if self.gate == "phase" and self.phase_threshold < self.threshold:
            # The gate applies the larger (it only tightens): the label and the identity say so (a looser
            # value named a threshold never applied, and keyed a second setting that ran the same).
            object.__setattr__(self, "phase_threshold", self.threshold)
        if self.layer_split is not None and self.layer_split < 1:
            raise ValueError(f"reuse.layer_split: expected an integer >= 1 (layer 0 is never reused alone), got {self.layer_split}")
        for name in ("variance_threshold", "curvature_threshold", "gripper_delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"reuse.{name}: expected a number >= 0, got {getattr(self, name)}")

    def _check_types(self) -> None:
        """Values from JSON or `key=value` strings can be of any type: check each field's
        annotated type (ints not bools/floats, floats any number, Optional may be None)."""
        for f in dataclasses.fields(self):
            v, tp = getattr(self, f.name), _HINTS[f.name]
            if isinstance(v, np.generic):  # np.float32(0.9) from np.arange, np.int64(3), np.bool_
                v = v.item()
                object.__setattr__(self, f.name, v)
            args = typing.get_args(tp)
            optional = type(None) in args
            if v is None and optional:
                continue
            if typing.get_origin(tp) is Literal:  # the value checks below name the choices
                if not isinstance(v, str):
                    raise ValueError(f"reuse.{f.name}: expected one of {', '.join(args)}, got {v!r}")
                continue
            base = next(a for a in args if a is not type(None)) if optional else tp
            if base is bool:
                ok = isinstance(v, bool)
            elif base is int:
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif base is float:  # NaN compares false with every bound: it would switch a check off
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
                if ok and isinstance(v, int):  # threshold=1 and threshold=1.0 are one setting (one DB key)
                    object.__setattr__(self, f.name, float(v))
            else:
                raise TypeError(f"reuse.{f.name}: no check for type {tp}")  # a new field type: add one
            if not ok:
                kind = {bool: "true or false", int: "an integer", float: "a number"}[base]
                none = " or None" if optional else ""
                raise ValueError(f"reuse.{f.name}: expected {kind}{none}, got {v!r} ({type(v).__name__})")

    @property
    def enabled(self) -> bool:
        return self.gate != "never"

    def split_for(self, depth: int) -> int:
        """The layer split for a prefix LM of `depth` layers (validated against it)."""
        s = depth // 2 if self.layer_split is None else self.layer_split
        if not 1 <= s < depth:
            raise ValueError(f"reuse.layer_split: expected 1 <= split < {depth} (the prefix LM's depth), got {s}")
        return s

    def label(self) -> str:
        """Short name for tables, e.g. 'threshold(raw>=0.985)/full+sync,age<=10'."""
        g, n = self.gate, _num
        if g == "period":
            g = f"period({self.period})"
        elif g == "threshold":
            g = f"threshold({self.image_metric}>={n(self.threshold)})"
        elif g == "crossmodal":
            st = f"state>={n(self.state_threshold)}" + (f",l2<={n(self.state_max_l2)}" if self.state_max_l2 else "")
            g = f"crossmodal({self.image_metric}>={n(self.threshold)},{st})"
        elif g == "phase":
            g = f"phase({self.image_metric}>={n(self.threshold)}|{n(self.phase_threshold)})"
        if not self.enabled:
            return g
        m = self.mode
        if m == "layer_wise":
            m = f"layer_wise({'half' if self.layer_split is None else self.layer_split})"
        elif m == "partial":
            d = f",d<={n(self.patch_max_diff)}" if self.patch_max_diff else ""
            m = f"partial(p>={n(self.patch_threshold)}{d})"
        out = f"{g}/{m}" + ("+sync" if self.synchronized else "")
        bounds = [f"age<={self.max_age_calls}" for _ in [0] if self.max_age_calls] + [
            f"age<={n(self.max_age_s)}s" for _ in [0] if self.max_age_s
        ]
        # What the setting reads away from its default that the name above leaves out (downsample=16,
        # the phase cues): without it, two settings of a sweep were two rows of one name.
        shown = {"gate", "mode", "synchronized", "max_age_calls", "max_age_s", "period", "threshold", "image_metric",
                 "state_threshold", "state_max_l2", "phase_threshold", "layer_split"}
        if self.mode == "partial":
            shown |= {"patch_threshold", "patch_max_diff"}
        bounds += [f"{k}={v}" for k, v in sorted(self.diff_from(ReuseConfig().to_dict()).items()) if k not in shown]
        return out + ("," + ",".join(bounds) if bounds else "")

    def read_fields(self) -> set[str]:
        """The fields this gate and mode read (every field for the baseline)."""
        if not self.enabled:
            return {f.name for f in dataclasses.fields(self)}
        reads = set(_GATE_READS[self.gate]) | {"gate", "mode", "synchronized", "max_age_calls", "max_age_s"}
        if self.mode == "partial" or (self.gate in _IMAGE_GATES and self.image_metric == "patch"):
            reads |= {"patch_threshold", "patch_max_diff"}
        if self.mode == "layer_wise":
            reads.add("layer_split")
        if self.mode not in _STATE_SPAN_MODES or self.synchronized:  # the state and cameras references
            reads.discard("state_reference")  # only part on these modes, and never under sync (all or nothing)
        if self.image_metric != "raw":  # the raw cosine is then recorded, never decided on
            reads.discard("downsample")
        return reads

    def state_references(self) -> tuple[str, ...]:
        """The snapshots the crossmodal gate's state test compares with ("state", "cameras"): one
        where the mode never parts them (a whole-prefix reuse moves neither, a refresh both)."""
        if self.mode not in _STATE_SPAN_MODES:
            return ("state",)
        return ("state", "cameras") if self.state_reference == "both" else (self.state_reference,)

    def unused_fields(self) -> list[str]:
        """Fields set away from their defaults that this gate and mode never read (e.g. a
        threshold for the period gate): in a sweep they would make a second setting that runs
        the same thing under the same label."""
        reads, default = self.read_fields(), ReuseConfig()
        return [f.name for f in dataclasses.fields(self)
                if f.name not in reads and getattr(self, f.name) != getattr(default, f.name)]

    def diff_from(self, defaults: dict) -> dict:
        """The fields this setting reads whose values differ from `defaults` (all fields' values):
        its identity relative to those defaults, as a results DB stores it. A field it never
        reads is no part of it (with it, the same runs would be stored twice under one label)."""
        reads = self.read_fields()
        return {k: v for k, v in self.to_dict().items() if k in reads and defaults[k] != v}

    def replace(self, **kw) -> "ReuseConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ReuseConfig":
        if not isinstance(d, dict):
            raise ValueError(f"reuse config: expected an object of fields, got {d!r}")  # noqa: TRY004 (bad input)
        known = {f.name for f in dataclasses.fields(ReuseConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"reuse config: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return ReuseConfig(**d)


# Every change of a field's default, oldest first: (unix time of the commit, field, old, new). A
# results DB records the defaults its settings are relative to (eval/store.py); this history is how
# the rows of a DB written before it did (schema version 2) keep their meaning. Add a line for each
# change (tests/test_reuse_defaults.py fails until then).
DEFAULT_CHANGES: tuple[tuple[float, str, object, object], ...] = (
    (1795688246.0, "patch_max_diff", None, 0.1),  # af0067e, 2026-11-26 10:17:26 UTC
    (1795865281.0, "state_reference", "state", "cameras"),  # 37826f2, 2026-11-28 11:28:01 UTC
    (1795865695.0, "state_reference", "cameras", "both"),  # 2026-11-28 11:34:55 UTC
)


def _num(v: float) -> str:
    """A number for a label: `:g` showed 0.9999995 as 1, the label of another gate."""
    return f"{v:.12g}"


def defaults_at(t: float) -> dict:
    """Every field's default as kvreuse had it at unix time t (a field added since: today's)."""
    d = ReuseConfig().to_dict()
    for when, name, old, _ in sorted(DEFAULT_CHANGES, key=lambda c: c[0], reverse=True):
        if t < when:
            d[name] = old
    return d


_IMAGE = ("threshold", "image_metric", "downsample")
_GATE_READS: dict[str, tuple[str, ...]] = {  # the fields each gate's decision reads (gates.py, signals.py)
    "never": (), "always": (), "period": ("period",),
    "threshold": _IMAGE,
    "crossmodal": (*_IMAGE, "state_threshold", "state_max_l2", "state_reference"),
    "phase": (*_IMAGE, "phase_threshold", "gripper_dim", "gripper_delta", "variance_threshold",
              "curvature_threshold", "motion_dims", "phase_horizon"),
}
_IMAGE_GATES = ("threshold", "crossmodal", "phase")
# Modes whose reuse recomputes the state's span or every camera but not both (ReusePolicy._update_ref):
# only there can the state and the cameras' snapshots differ.
_STATE_SPAN_MODES = ("vision_only", "state_only", "partial")
_HINTS = typing.get_type_hints(ReuseConfig)  # field name -> evaluated annotation
