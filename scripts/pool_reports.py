"""Pool one setting's paired counts on one task over several `kvreuse report` CSVs: per report and
summed, n, lost, gained, the difference with its 95% interval and the exact McNemar p of the sums.

For results whose DBs are gone but whose reports are kept (docs/results/*/results.csv). A report
keeps the counts of its pairs, not the episodes, so this cannot check what `scripts/pool_paired.py`
checks on DBs: that no episode is in two of them (give reports of distinct noise seeds), that each
ran under one policy and protocol (the row's group is printed), and which setting a label names
under other defaults. The interval is Newcombe's (eval/stats.py), from the counts alone; reports
written before their paired_both / paired_neither columns have no interval ("n/a").

Usage: python scripts/pool_reports.py --setting 'period(2)/full' --task push-v3 CSV [CSV ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvreuse.eval.report import read_csv
from kvreuse.eval.stats import Paired, binom_two_sided, paired_interval


def counts(path: str, setting: str, task: str) -> tuple[str, Paired]:
    """(the row's group, its paired counts) of `setting` on `task` in one report CSV."""
    rows = [r for r in read_csv(path) if r.setting == setting and r.task == task]
    if len(rows) != 1:
        raise ValueError(f"{path}: {len(rows)} rows of {setting!r} on {task!r} (expected one)")
    p = rows[0].paired
    if p is None:
        raise ValueError(f"{path}: {setting!r} has no paired baseline on {task!r}")
    return rows[0].group.replace(" | ", ", "), p  # (the group inside a Markdown cell)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", required=True, help="the setting's name as the reports print it")
    ap.add_argument("--task", required=True, help="a task, or '(all tasks)'")
    ap.add_argument("csvs", nargs="+")
    a = ap.parse_args(argv)
    try:
        resolved = [Path(p).resolve() for p in a.csvs]
        twice = next((p for p, r in zip(a.csvs, resolved, strict=True) if resolved.count(r) > 1), None)
        if twice is not None:
            raise ValueError(f"{twice}: given twice (its pairs would count twice)")
        rows = [(p, *counts(p, a.setting, a.task)) for p in a.csvs]
    except ValueError as e:
        print(f"pool_reports: {e}", file=sys.stderr)
        return 2
    n, both, lost, gained, neither = (sum(getattr(r[2], f) for r in rows)
                                      for f in ("n", "both", "only_base", "only_setting", "neither"))
    if not all(_has_both(r[2]) for r in rows):  # a report from before those columns: not known
        both = neither = -1
    summed = Paired(n, both, lost, gained, neither, binom_two_sided(min(lost, gained), lost + gained))
    print(f"{a.setting} vs baseline, {a.task}")
    print("| report | group | n | lost | gained | Δ (pts) [95%] | p (McNemar) |\n|---|---|---|---|---|---|---|")
    for label, group, r in [*rows, ("summed", "", summed)]:
        ci = "[{:+.1f}, {:+.1f}]".format(*(100 * x for x in paired_interval(r))) if _has_both(r) else "[n/a]"
        print(f"| {label} | {group} | {r.n} | {r.only_base} | {r.only_setting} | {100 * r.diff:+.1f} {ci} "
              f"| {r.p_value:.2g} |")
    return 0


def _has_both(r: Paired) -> bool:
    """The interval needs the concordant counts, which reports before their paired_both /
    paired_neither columns lack (read_csv gives -1); lost, gained and p need only the discordant ones."""
    return r.both >= 0 and r.neither >= 0


if __name__ == "__main__":
    sys.exit(main())
