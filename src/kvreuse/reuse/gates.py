"""Gates: given the signals, reuse the cache or refresh it, with a reason.

Gates only see calls where reuse is allowed at all: invalidation (prompt change, reset, camera
set / image size / dtype / device change, max age) is checked before, in ReusePolicy. Each gate
names the signals it needs so nothing else is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ReuseConfig
from .signals import Signals


@dataclass(frozen=True)
class Decision:
    reuse: bool
    reason: str


class Gate:
    needs: frozenset[str] = frozenset()

    def __init__(self, cfg: ReuseConfig):
        self.cfg = cfg

    def decide(self, s: Signals) -> Decision:
        raise NotImplementedError


class Never(Gate):
    def decide(self, s: Signals) -> Decision:
        return Decision(False, "gate never")


class Always(Gate):
    def decide(self, s: Signals) -> Decision:
        return Decision(True, "gate always")


class Period(Gate):
    """Refresh every `period` calls: reuse while the last refresh is fewer than `period` calls ago.
    Counted from the last refresh, not the oldest row: text_fixed's refresh keeps the text rows,
    whose age would otherwise make every call after the first period a refresh."""

    def decide(self, s: Signals) -> Decision:
        k = self.cfg.period
        if s.since_refresh < k:
            return Decision(True, f"{s.since_refresh} calls since refresh < period {k}")
        return Decision(False, f"{s.since_refresh} calls since refresh >= period {k}")


def _image_check(s: Signals, threshold: float, metric: str) -> Decision:
    """Reuse iff every present camera's similarity >= threshold."""
    if not s.image:
        return Decision(True, "no camera present")
    cam, worst = min(s.image.items(), key=lambda kv: kv[1])
    if worst >= threshold:
        return Decision(True, f"{metric} {worst:.4f} >= {threshold:g} (min over cameras: {cam})")
    return Decision(False, f"{metric} {worst:.4f} < {threshold:g} ({cam})")


class Threshold(Gate):
    """TurboPi's gate: image similarity against the cached snapshot."""

    needs = frozenset({"image"})

    def decide(self, s: Signals) -> Decision:
        return _image_check(s, self.cfg.threshold, self.cfg.image_metric)


class CrossModal(Gate):
    """Image AND state must both be close to the cached snapshot (TurboPi's priority 2)."""

    needs = frozenset({"image", "state"})

    def decide(self, s: Signals) -> Decision:
        c = self.cfg
        img = _image_check(s, c.threshold, c.image_metric)
        if not img.reuse:
            return img
        if s.state_cos is not None and s.state_cos < c.state_threshold:
            return Decision(False, f"state cos {s.state_cos:.4f} < {c.state_threshold:g}")
        if c.state_max_l2 is not None and s.state_l2 is not None and s.state_l2 > c.state_max_l2:
            return Decision(False, f"state l2 {s.state_l2:.4f} > {c.state_max_l2:g}")
        return Decision(True, f"{img.reason}; state cos {s.state_cos:.4f}")


class PhaseAware(Gate):
    """Image threshold tightened to `phase_threshold` while the last action chunk shows a
    gripper open/close transition, action variance above `variance_threshold` or trajectory
    curvature above `curvature_threshold` (TurboPi's priority 3). Before any chunk exists the
    tight threshold applies."""

    needs = frozenset({"image", "phase"})

    def active_cues(self, s: Signals) -> list[str]:
        c, p = self.cfg, s.phase
        if p is None:
            return ["no chunk yet"]
        cues = []
        if p.gripper_transition:
            cues.append("gripper transition")
        if p.variance > c.variance_threshold:
            cues.append(f"variance {p.variance:.3g}")
        if p.curvature > c.curvature_threshold:
            cues.append(f"curvature {p.curvature:.3g}")
        return cues

    def decide(self, s: Signals) -> Decision:
        c = self.cfg
        cues = self.active_cues(s)
        thr = max(c.phase_threshold, c.threshold) if cues else c.threshold
        d = _image_check(s, thr, c.image_metric)
        return Decision(d.reuse, d.reason + (f" [tight: {', '.join(cues)}]" if cues else ""))


GATE_CLASSES: dict[str, type[Gate]] = {
    "never": Never,
    "always": Always,
    "period": Period,
    "threshold": Threshold,
    "crossmodal": CrossModal,
    "phase": PhaseAware,
}


def make_gate(cfg: ReuseConfig) -> Gate:
    return GATE_CLASSES[cfg.gate](cfg)
