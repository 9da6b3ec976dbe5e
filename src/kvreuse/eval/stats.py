"""Statistics for success rates and latencies.

- Wilson score interval (95%) for a success rate: well behaved at 0% and 100% and small n,
  unlike the normal approximation.
- Exact McNemar test for a paired difference (reuse setting vs baseline on the same episodes):
  only discordant pairs carry information; under H0 each is equally likely to go either way,
  so the two-sided p-value is a binomial(b + c, 1/2) tail.
- Newcombe's score interval (1998, method 10) for the paired success difference, as a second view:
  built from the two rates' Wilson intervals and the pairs' correlation, it stays open when no pair
  differs (a percentile bootstrap collapses to [0, 0] there, at any n) and depends on the counts alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval; (0, 1) when n == 0 (nothing is known)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson: expected 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    den = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    # The interval always contains p; at p = 0 or 1 rounding can leave a bound a hair inside.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips (doubling the smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    # Integer division: 2.0**n overflows a float from n = 1024 discordant pairs on.
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@dataclass(frozen=True)
class Paired:
    n: int  # pairs where both episodes finished (no error on either side)
    both: int  # success in both
    only_base: int  # b: baseline succeeded, setting failed
    only_setting: int  # c: setting succeeded, baseline failed
    neither: int
    p_value: float  # exact McNemar, two-sided

    @property
    def diff(self) -> float:
        """Setting success rate minus baseline's on the paired episodes."""
        return (self.only_setting - self.only_base) / self.n if self.n else 0.0


def mcnemar(base: list[bool], setting: list[bool]) -> Paired:
    """Paired outcomes (same episodes, same order) -> exact McNemar test."""
    if len(base) != len(setting):
        raise ValueError(f"mcnemar: paired lists differ in length ({len(base)} vs {len(setting)})")
    both = sum(1 for a, b in zip(base, setting) if a and b)
    ob = sum(1 for a, b in zip(base, setting) if a and not b)
    os_ = sum(1 for a, b in zip(base, setting) if b and not a)
    n = len(base)
    return Paired(n, both, ob, os_, n - both - ob - os_, binom_two_sided(min(ob, os_), ob + os_))


def paired_interval(p: Paired, z: float = Z95) -> tuple[float, float]:
    """95% interval of the setting's success rate minus the baseline's on paired episodes: Newcombe's
    hybrid score interval for paired proportions (Statistics in Medicine 17, 1998, method 10). NaN, NaN
    without pairs."""
    n = p.n
    if n == 0:
        return float("nan"), float("nan")
    a, b, c, d = p.both, p.only_base, p.only_setting, p.neither
    p1, p2 = (a + c) / n, (a + b) / n  # setting, baseline
    l1, u1 = wilson(a + c, n, z)
    l2, u2 = wilson(a + b, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    # The pairs' correlation, continuity-corrected where positive (as Newcombe's method 10 has it)
    cross = a * d - b * c
    cross = max(cross - n / 2, 0.0) if cross > 0 else cross
    phi = cross / math.sqrt(den) if den else 0.0
    delta = p1 - p2
    lo = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = delta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lo), min(1.0, hi)


@dataclass(frozen=True)
class Latency:
    n: int
    mean: float
    p50: float
    p95: float

    @property
    def hz(self) -> float:
        """Policy calls per second at this mean latency (inference rate, not control rate)."""
        return 1000.0 / self.mean if self.mean > 0 else float("nan")


def latency(ms) -> Latency:
    a = np.asarray(list(ms), dtype=np.float64)
    if a.size == 0:
        nan = float("nan")
        return Latency(0, nan, nan, nan)
    return Latency(int(a.size), float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 95)))


def speedup(base_mean_ms: float, mean_ms: float) -> float:
    """Baseline mean latency / setting mean latency (>1 = faster)."""
    if not (mean_ms > 0) or not (base_mean_ms > 0):
        return float("nan")
    return base_mean_ms / mean_ms
