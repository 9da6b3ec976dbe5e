"""Per-call records and their aggregates (reuse rate, latency percentiles, Hz)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class StepRecord:
    decision: str = "refresh"  # "refresh" | "reuse"
    mode: str = "none"  # the reuse mode that shaped this call, "none" on a full refresh
    reason: str = "no reuse"
    signals: dict = field(default_factory=dict)
    snapshots: tuple[int, ...] = ()  # snapshot id of each prefix span, in span order
    mixed: bool = False  # the prefix K/V combine more than one observation
    timings: dict = field(default_factory=dict)  # ms: signals, vision, prefix, denoise, total
    # added by the reuse layer
    plan: str = "all"  # "all" (encode_prefix) | "tokens" | "layers" | "none" (denoise only)
    cost: dict = field(default_factory=dict)  # vision_cameras (signals + plan), lm_tokens, lm_token_layers
    call_index: int = 0  # calls since reset
    state_source: str = "prefix"  # Pi0.5 "prefix"; Pi0 suffix state "fresh" or "snapshot"
    # added by Policy: the call captured CUDA graphs (with any compilation) or was its model's
    # first in this process (lazy CUDA / BLAS set-up): its time is not the steady state's
    warmup: bool = False

    @property
    def reused(self) -> bool:
        return self.decision == "reuse"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["snapshots"] = list(self.snapshots)
        return d


class ReuseStats:
    """Running aggregates over records."""

    def __init__(self) -> None:
        self.totals: list[float] = []
        self.reuses = 0

    def add(self, rec: StepRecord) -> None:
        self.totals.append(float(rec.timings.get("total", 0.0)))
        self.reuses += rec.reused

    def __len__(self) -> int:
        return len(self.totals)

    def summary(self) -> dict:
        n = len(self.totals)
        if n == 0:
            return {"calls": 0, "reuse_rate": 0.0, "mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0, "hz": 0.0}
        t = np.asarray(self.totals)
        mean = float(t.mean())
        return {
            "calls": n,
            "reuse_rate": self.reuses / n,
            "mean_ms": mean,
            "p50_ms": float(np.percentile(t, 50)),
            "p95_ms": float(np.percentile(t, 95)),
            "hz": 1e3 / mean if mean > 0 else float("inf"),
        }


def summarize(records: list[StepRecord]) -> dict:
    s = ReuseStats()
    for r in records:
        s.add(r)
    return s.summary()
