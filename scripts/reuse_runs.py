"""How long one cache served: per setting of a results DB, the longest run of consecutive reuses in
each episode (calls between two refreshes), its mean and max over the episodes, and the reuse rate.

A gate can reuse 50% of the calls in runs of 1 or keep one snapshot for half an episode; success
depends on which (docs/RESULTS.md, "Pi0.5's state tokens recomputed on a reuse").

Usage: python scripts/reuse_runs.py DB [--task T]
"""

from __future__ import annotations

import argparse
import json
import sys

from kvreuse.eval.store import open_existing


def longest_run(decisions: list[str]) -> int:
    """The most consecutive calls that reused the cache ("reuse:<mode>") in one episode."""
    best = run = 0
    for d in decisions:
        run = run + 1 if d.startswith("reuse") else 0
        best = max(best, run)
    return best


def runs(db: str, task: str | None = None) -> list[tuple[str, int, float, int, float]]:
    """[(setting name, episodes, mean longest run, max longest run, reuse rate)], errors left out."""
    out = []
    with open_existing(db) as st:
        for r in st.settings():
            eps = [e for e in st.episodes(r["id"]) if e["status"] != "error" and (task is None or e["task"] == task)]
            if not eps:
                continue
            longest = [longest_run(json.loads(e["decisions"])) for e in eps]
            calls, reused = sum(e["calls"] for e in eps), sum(e["reuses"] for e in eps)  # as the report pools them
            out.append((r["name"], len(eps), sum(longest) / len(eps), max(longest), reused / max(calls, 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--task", default=None, help="one task (default: all tasks)")
    a = ap.parse_args(argv)
    try:
        rows = runs(a.db, a.task)
    except ValueError as e:
        print(f"reuse_runs: {e}", file=sys.stderr)
        return 2
    print("| setting | episodes | longest run of reuses: mean / max (calls) | reuse rate |\n|---|---|---|---|")
    for name, n, mean, most, rate in rows:
        print(f"| {name} | {n} | {mean:.1f} / {most} | {rate:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
