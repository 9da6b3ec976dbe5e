"""One connected client: its own Policy (own prefix cache, noise generator, gate state) and its
reuse / latency statistics.

Invariant 2 of the design (never reuse a cache across clients) holds by construction: a
Policy — and so every PrefixCache — belongs to exactly one connection and dies with it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..policy import Policy, StepRecord
from ..reuse.policy import AGE_REASON

_client_ids = itertools.count(1)


def _plain(x: Any, depth: int = 0) -> Any:
    """Record fields -> msgpack/JSON-safe scalars (tensors and numpy scalars become floats);
    anything large or exotic is dropped (returns None) so a reply never carries arrays of
    debugging data."""
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, np.generic):
        return _plain(x.item(), depth)
    if hasattr(x, "numel") and hasattr(x, "item"):  # torch tensor
        return _plain(x.item(), depth) if x.numel() == 1 else None
    if isinstance(x, np.ndarray):
        return _plain(x.item(), depth) if x.size == 1 else None
    if isinstance(x, dict) and depth < 2:
        out = {str(k): _plain(v, depth + 1) for k, v in x.items()}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(x, (list, tuple)) and depth < 2 and len(x) <= 64:
        return [_plain(v, depth + 1) for v in x]
    return None


def percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


@dataclass
class ClientStats:
    requests: int = 0  # observations answered with actions
    errors: int = 0  # frames answered with an error
    reuses: int = 0
    refreshes: int = 0
    mixed: int = 0  # steps whose prefix mixed snapshots
    resets: int = 0  # asked for by the client
    age_resets: int = 0  # refreshes forced by the max cache age (the reuse config's, or the server's)
    abandoned: int = 0  # requests whose client left before the reply
    warmups: int = 0  # requests that captured CUDA graphs or were the model's first: not in latency_ms
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=2048))  # server-side, per request

    @property
    def reuse_rate(self) -> float:
        return self.reuses / self.requests if self.requests else 0.0

    def summary(self) -> dict:
        lat = list(self.latency_ms)
        return {
            "requests": self.requests, "errors": self.errors, "reuses": self.reuses, "refreshes": self.refreshes,
            "reuse_rate": round(self.reuse_rate, 4), "mixed": self.mixed, "resets": self.resets,
            "age_resets": self.age_resets, "abandoned": self.abandoned, "warmups": self.warmups,
            "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                           "mean": float(np.mean(lat)) if lat else None, "window": len(lat)},
        }

    def add(self, other: "ClientStats") -> None:
        for k in ("requests", "errors", "reuses", "refreshes", "mixed", "resets", "age_resets", "abandoned", "warmups"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        # Not the latencies: each client's window would push out the others' (ClientSession's `window`)


class ClientSession:
    """State of one websocket connection. `infer` and `reset` run on the inference worker
    thread only (one job of a connection in flight at a time), so they need no lock."""

    def __init__(self, policy: Policy, remote: str, max_cache_age_s: float, policy_bounds_age: bool,
                 window: deque | None = None):
        """window: a server-wide latency window that every client's answered steps go to, in order."""
        self.id = next(_client_ids)
        self.window = window
        self.policy = policy
        self.remote = remote
        self.max_cache_age_s = max_cache_age_s
        # True when the policy's own reuse config enforces the max age (then the server need not).
        self.policy_bounds_age = policy_bounds_age
        self.stats = ClientStats()
        self.opened = time.monotonic()
        self.cache_born: float | None = None  # when the prefix cache now held was computed
        self.last: StepRecord | None = None

    def reset(self) -> None:
        self.policy.reset()
        self._was_reset()

    def _was_reset(self) -> None:
        self.cache_born = None
        self.stats.resets += 1

    def _enforce_max_age(self) -> None:
        if self.policy_bounds_age or self.cache_born is None:
            return
        if time.monotonic() - self.cache_born > self.max_cache_age_s:
            # The policy cannot be told to refresh, so start it afresh: no reuse of the old cache.
            self.policy.reset()
            self.cache_born = None
            self.stats.age_resets += 1

    def infer(self, obs: dict, reset: bool) -> tuple[np.ndarray, StepRecord]:
        if not reset:
            self._enforce_max_age()
        # The policy resets only once the observation passed its checks: a rejected one leaves
        # this client's state as it was.
        actions, rec = self.policy.infer(obs, reset=reset)
        if reset:
            self._was_reset()
        if rec.decision != "reuse":
            self.cache_born = time.monotonic()
            # `kvreuse serve` passes its max age into the reuse config, so the policy enforces it.
            self.stats.age_resets += rec.reason.startswith(AGE_REASON)
        return actions, rec

    def record(self, rec: StepRecord, server_ms: float) -> dict:
        """Count one answered step; returns the reuse part of its server_timing."""
        s = self.stats
        s.requests += 1
        s.reuses += rec.decision == "reuse"
        s.refreshes += rec.decision != "reuse"
        s.mixed += bool(rec.mixed)
        if getattr(rec, "warmup", False):  # seconds of graph capture would swamp the window's mean / p99
            s.warmups += 1
        else:
            s.latency_ms.append(server_ms)
            if self.window is not None:
                self.window.append(server_ms)
        self.last = rec
        return {
            "client": self.id, "step": s.requests, "decision": rec.decision, "mode": rec.mode, "reason": rec.reason,
            "snapshots": [int(x) for x in rec.snapshots], "mixed": bool(rec.mixed),
            "signals": _plain(rec.signals) or {},
            "reuses": s.reuses, "refreshes": s.refreshes, "reuse_rate": round(s.reuse_rate, 4),
            "resets": s.resets, "age_resets": s.age_resets,
        }

    def summary(self) -> dict:
        last = self.last
        return {
            "client": self.id, "remote": self.remote, "connected_s": round(time.monotonic() - self.opened, 3),
            **self.stats.summary(),
            "last": None if last is None else {"decision": last.decision, "mode": last.mode, "reason": last.reason},
        }
