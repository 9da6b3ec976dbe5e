"""Per-call records and their aggregates (reuse rate, latency percentiles, Hz)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Pi0.5 "prefix" ("none" without discrete_state_input); Pi0's suffix state "fresh" or "snapshot"
    state_source: str = "prefix"
    # the call captured CUDA graphs (with any compilation) or was its model's first in this
    # process (lazy CUDA / BLAS set-up): its time is not the steady state's (ReusePolicy.infer)
    warmup: bool = False

    @property
    def reused(self) -> bool:
        return self.decision == "reuse"


class ReuseStats:
    """Running aggregates over records. A warm-up call (StepRecord.warmup: it captured CUDA graphs
    or was its model's first) counts as a call and toward the reuse rate, but its time stays out
    of the latency figures, as in eval's rollouts."""

    def __init__(self) -> None:
        self.totals: list[float] = []  # ms of the calls that were not warm-ups
        self.calls = self.reuses = self.warmups = 0

    def add(self, rec: StepRecord) -> None:
        self.calls += 1
        self.reuses += rec.reused
        if rec.warmup:
            self.warmups += 1
        else:
            self.totals.append(float(rec.timings.get("total", 0.0)))

    def __len__(self) -> int:
        return self.calls

    def summary(self) -> dict:
        n = self.calls
        out = {"calls": n, "reuse_rate": self.reuses / n if n else 0.0, "warmups": self.warmups}
        if not self.totals:
            return {**out, "mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0, "hz": 0.0}
        t = np.asarray(self.totals)
        mean = float(t.mean())
        return {
            **out,
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
