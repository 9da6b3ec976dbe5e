"""Honesty of the report's numbers: statistics at their edges, pairing, what the summary shows."""

from __future__ import annotations

import math

import pytest

from kvreuse.eval import stats


def test_exact_mcnemar_with_more_than_1023_discordant_pairs():
    """2.0**n overflows a float at n = 1024: a large sweep's report must not crash there."""
    assert stats.binom_two_sided(0, 1024) == pytest.approx(2 * 2.0**-1024, rel=1e-9, abs=0)
    assert stats.binom_two_sided(0, 5000) == 0.0  # underflows to 0, no error
    n = 2000  # 1000 vs 1000: balanced -> 1; 950 vs 1050: p from the exact tail
    assert stats.binom_two_sided(1000, n) == 1.0
    tail = sum(math.comb(n, i) for i in range(951)) * 2 / 2**n
    assert stats.binom_two_sided(950, n) == pytest.approx(tail, rel=1e-12)
    r = stats.mcnemar([True] * 1100, [False] * 1100)
    assert r.only_base == 1100 and r.p_value == 0.0
