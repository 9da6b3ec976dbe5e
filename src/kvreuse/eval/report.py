"""Tables, CSV and plots from a results DB.

Settings are grouped by (policy, env, replan, protocol: step limit and env options); inside a group every reuse setting is compared
with the group's baseline on the episodes both finished (paired: same task, init state, seed).
Table layout follows the TurboPi log (threshold | success | latency | Hz | reuse rate |
speedup) plus n, the 95% Wilson interval and the exact McNemar p-value against the baseline.
Latency is per policy call (ms, all calls of all finished episodes); Hz = 1000 / mean latency.
Speedup divides the baseline's mean latency by the setting's, both on the episodes both finished
(the pairs of Δ and p): the baseline may have run more tasks than the setting.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..outputs import md_cell, os_reason
from .stats import Latency, Paired, latency, mcnemar, paired_interval, speedup, wilson
from .store import open_existing, setting_group

ALL = "(all tasks)"


@dataclass
class Row:
    group: str
    setting: str
    task: str
    is_baseline: bool
    n: int
    successes: int
    errors: int
    ci: tuple[float, float]
    lat: Latency
    parts: dict[str, float]  # mean ms per call of vision / prefix / denoise / sample where recorded
    reuse_rate: float
    mixed_rate: float
    speedup: float
    paired: Paired | None
    diff_ci: tuple[float, float] | None
    key: str = ""  # the setting's key in the DB (store.Setting.key)

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else float("nan")


def _episodes_by_setting(store, only=None):
    settings = store.settings()
    eps = defaultdict(list)
    for e in store.episodes():
        if only is None or _key(e) in only:
            eps[e["setting_id"]].append(e)
    return settings, eps


def compute_rows(db: str | Path, only: set[tuple[str, int, int]] | None = None) -> list[Row]:
    """only: the (task, init id, seed) episodes to count (a sweep's own list), else all in the DB."""
    with open_existing(db) as store:
        settings, eps = _episodes_by_setting(store, only)
    groups: dict[tuple, list] = defaultdict(list)
    for s in settings:
        groups[setting_group(s)].append(s)
    rows: list[Row] = []
    for (policy, env, replan, protocol), ss in groups.items():
        gname = f"{env} | policy {policy} | replan {replan}" + _protocol_text(protocol, env)
        base = next((s for s in ss if s["is_baseline"]), None)
        base_eps = eps.get(base["id"], []) if base is not None else []
        tasks = sorted({e["task"] for s in ss for e in eps.get(s["id"], [])})
        # Two settings of one name (a DB written before label() named every field read): told apart by
        # their keys, or their rows looked the same and the plots gave both one number and colour.
        seen = Counter(s["name"] for s in ss)
        names = {s["id"]: s["name"] + (f" [{s['key'][:8]}]" if seen[s["name"]] > 1 else "") for s in ss}
        for task in [ALL, *tasks]:
            pick = (lambda e: True) if task == ALL else (lambda e, t=task: e["task"] == t)
            b_sel = [e for e in base_eps if pick(e)]
            for s in ss:
                sel = [e for e in eps.get(s["id"], []) if pick(e)]
                if sel:
                    rows.append(_row(gname, s, task, sel, b_sel if base is not None else None, names[s["id"]]))
    return rows


def _key(e) -> tuple[str, int, int]:
    return e["task"], e["init_id"], e["seed"]


def _protocol_text(protocol: str, env: str = "") -> str:
    p = json.loads(protocol)
    out = f" | step limit {p['max_steps']}" if p.get("max_steps") is not None else ""
    opts = dict(p.get("env") or {})
    if env.startswith("libero:"):  # recorded before scenes were named: every episode in episode 0's layout
        opts.setdefault("scenes", "first")
    if opts:
        out += " | env " + ", ".join(f"{k}={v}" for k, v in sorted(opts.items()))
    return out


def _calls(eps, part: str = "total") -> list[float]:
    out: list[float] = []
    for e in eps:
        if e["status"] != "error":
            out += json.loads(e["timings"]).get(part, [])
    return out


def _row(gname, s, task, sel, base_sel, name: str) -> Row:
    fin = [e for e in sel if e["status"] != "error"]
    k = sum(e["status"] == "success" for e in fin)
    lat = latency(_calls(sel))
    parts = {}
    for p in ("vision", "prefix", "denoise", "sample"):
        ms = _calls(sel, p)
        if ms:
            parts[p] = sum(ms) / len(ms)
    calls = sum(e["calls"] for e in fin)
    paired = diff_ci = None
    sp = 1.0 if s["is_baseline"] and lat.n else float("nan")  # a baseline with no timed call has no speed either
    if base_sel is not None and not s["is_baseline"]:
        # Pairs: the episodes both finished (same task, init state, seed). The baseline may also have
        # run other episodes, and an episode one side lost to an env error has nothing to compare.
        b = {_key(e): e for e in base_sel if e["status"] != "error"}
        both = [e for e in fin if _key(e) in b]
        if both:
            bb = [b[_key(e)]["status"] == "success" for e in both]
            ss = [e["status"] == "success" for e in both]
            paired = mcnemar(bb, ss)
            diff_ci = paired_interval(paired)
            sp = speedup(latency(_calls(b[_key(e)] for e in both)).mean, latency(_calls(both)).mean)
    return Row(
        group=gname,
        setting=name,
        task=task,
        is_baseline=bool(s["is_baseline"]),
        n=len(fin),
        successes=k,
        errors=len(sel) - len(fin),
        ci=wilson(k, len(fin)),
        lat=lat,
        parts=parts,
        reuse_rate=sum(e["reuses"] for e in fin) / calls if calls else float("nan"),  # no call: unknown, not 0%
        mixed_rate=sum(e["mixed"] for e in fin) / calls if calls else float("nan"),
        speedup=sp,
        paired=paired,
        diff_ci=diff_ci,
        key=s["key"],
    )


# ---- Markdown ------------------------------------------------------------------------------

_HEAD = (
    "| setting | success | latency (mean) | p50 / p95 | Hz | reuse rate | speedup | n | 95% CI | "
    "Δ vs baseline (paired) | p (McNemar) | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f}%"


def _md_row(r: Row) -> str:
    name = f"**{md_cell(r.setting)}**" if r.is_baseline else md_cell(r.setting)
    lat = "–" if r.lat.n == 0 else f"{r.lat.mean:.1f} ms"
    pp = "–" if r.lat.n == 0 else f"{r.lat.p50:.1f} / {r.lat.p95:.1f} ms"
    hz = "–" if r.lat.n == 0 else f"{r.lat.hz:.1f}"
    sp = "–" if r.speedup != r.speedup else f"{r.speedup:.2f}x"
    if r.paired is None:
        diff = p = "–"
    else:
        lo, hi = r.diff_ci
        diff = f"{100 * r.paired.diff:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] (n={r.paired.n})"
        p = f"{r.paired.p_value:.3g}"
    ci = f"[{_pct(r.ci[0])}, {_pct(r.ci[1])}]"
    return (
        f"| {name} | {_pct(r.rate)} | {lat} | {pp} | {hz} | {_pct(r.reuse_rate)} | {sp} | {r.n} | {ci} | "
        f"{diff} | {p} | {r.errors} |\n"
    )


def markdown(rows: list[Row]) -> str:
    out = []
    by_group: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_group[r.group].append(r)
    for g, rs in by_group.items():
        out.append(f"## {g}\n\n")
        out.append("Success = the env's own signal; errors (env crashes) are excluded from n. Latency per "
                   "policy call, warm-up calls (graph capture, a model's first call) left out; Hz = 1000 / "
                   "mean latency; speedup = baseline mean / setting mean, Δ and p: all three on the episodes "
                   "both the setting and the baseline finished.\n\n")
        for task in [ALL, *sorted({r.task for r in rs} - {ALL})]:
            t_rows = [r for r in rs if r.task == task]
            out.append(f"### {'All tasks' if task == ALL else task}\n\n" + _HEAD + "".join(map(_md_row, t_rows)))
            note = _table_note(t_rows)
            out.append("\n" + (note + "\n\n" if note else ""))
            if task == ALL:
                out.append(worst_tasks(rs))
    return "".join(out) if out else "No episodes in this DB yet.\n"


WORST = ("Worst task per setting (paired Δ against the baseline on that task). An all-task mean can hide one "
         "task's loss: rerun a setting's worst task on more seeds (`kvreuse sweep --tasks T --seed N`) "
         "before trusting the setting there.")


def worst_tasks(rows: list[Row]) -> str:
    """Each setting's task with the lowest paired Δ, listed under the all-task table of a group that
    ran several tasks: on the testbed, settings that kept the all-task mean at n = 500 lost 6-13
    points on one task (docs/RESULTS.md, "Push on two more seeds")."""
    per_task = [r for r in rows if r.task != ALL and not r.is_baseline and r.paired is not None and r.paired.n]
    if len({r.task for r in per_task}) < 2:
        return ""
    lines = []
    for name in dict.fromkeys(r.setting for r in per_task):
        w = min((r for r in per_task if r.setting == name), key=lambda r: (r.paired.diff, r.paired.p_value))
        if w.paired.diff >= 0:
            lines.append(f"- {md_cell(name)}: no task below the baseline\n")
            continue
        lo, hi = w.diff_ci
        lines.append(f"- {md_cell(name)}: {w.task} {100 * w.paired.diff:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                     f"(n={w.paired.n}, p={w.paired.p_value:.3g})\n")
    return WORST + "\n\n" + "".join(lines) + "\n"


UNEQUAL = ("Not every row here counts the same finished episodes (other runs into this DB, or env errors): "
           "compare a setting with the baseline through Δ and p (on the episodes both finished, n= in Δ's "
           "column), not the success columns side by side.")


NO_BASELINE = ("No baseline in this table: speedup, Δ and p compare a setting with the baseline of its policy, env, "
               "replan and step limit on the episodes both finished; run one on these tasks with `kvreuse eval "
               "--with-baseline` or `kvreuse sweep`.")
NO_PAIRS = ("A row with Δ and p \"–\" shares no finished episode with the baseline: nothing compares them.")


def _table_note(rows: list[Row]) -> str:
    """What a table's numbers cannot tell: no baseline (every speedup, Δ and p blank), rows on other
    episodes than the baseline's (side by side, the success columns compare different episodes)."""
    if not any(r.is_baseline for r in rows):
        return NO_BASELINE
    if same_episodes(rows):
        return ""
    unpaired = any(not r.is_baseline and r.paired is None for r in rows)
    return UNEQUAL + (" " + NO_PAIRS if unpaired else "")


def same_episodes(rows: list[Row]) -> bool:
    """Whether every row counts the same finished episodes as the baseline: the pairs are a subset of
    both sides, so equal counts mean equal sets. False without a baseline to pair with."""
    base = next((r for r in rows if r.is_baseline), None)
    if base is None:
        return len(rows) <= 1
    return all(r.is_baseline or (r.paired is not None and r.paired.n == r.n == base.n) for r in rows)


# ---- CSV -----------------------------------------------------------------------------------

CSV_FIELDS = (
    "group", "setting", "task", "is_baseline", "n", "successes", "success_rate", "ci_low", "ci_high",
    "errors", "lat_mean_ms", "lat_p50_ms", "lat_p95_ms", "hz", "vision_ms", "prefix_ms", "denoise_ms",
    "sample_ms", "reuse_rate", "mixed_rate", "speedup", "paired_n", "only_baseline", "only_setting", "diff",
    "diff_ci_low", "diff_ci_high", "p_mcnemar", "lat_calls", "paired_both", "paired_neither", "key",
)
# What every results.csv report ever wrote has (sample_ms and the last four came later): `report --csv`
# rebuilds the rows from these.
CSV_REQUIRED = tuple(f for f in CSV_FIELDS if f not in ("sample_ms", "lat_calls", "paired_both", "paired_neither",
                                                         "key"))


def write_csv(rows: list[Row], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            pr = r.paired
            w.writerow([
                r.group, r.setting, r.task, int(r.is_baseline), r.n, r.successes, r.rate, r.ci[0], r.ci[1],
                r.errors, r.lat.mean, r.lat.p50, r.lat.p95, r.lat.hz, r.parts.get("vision", ""),
                r.parts.get("prefix", ""), r.parts.get("denoise", ""), r.parts.get("sample", ""), r.reuse_rate,
                r.mixed_rate, "" if r.speedup != r.speedup else r.speedup,  # no matched baseline: blank
                pr.n if pr else "", pr.only_base if pr else "", pr.only_setting if pr else "",
                pr.diff if pr else "", r.diff_ci[0] if r.diff_ci else "", r.diff_ci[1] if r.diff_ci else "",
                pr.p_value if pr else "", r.lat.n, pr.both if pr else "", pr.neither if pr else "", r.key,
            ])
    return path


def read_csv(path: str | Path) -> list[Row]:
    """The rows of a results.csv that `report` wrote, to redraw its plots and tables. A CSV written
    before lat_calls, paired_both, paired_neither and key has no counts of calls, of pairs both
    succeeded or both failed: those are -1 (unknown; no table or plot shows them)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"results CSV {path}: no such file" + (" (a folder)" if path.is_dir() else ""))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"results CSV {path}: not a results.csv written by `kvreuse report` ({e})") from None
    except OSError as e:
        raise ValueError(f"results CSV {path}: cannot read it ({os_reason(e)})") from None
    head = lines[0] if lines else []
    missing = [c for c in CSV_REQUIRED if c not in head]
    if missing:
        raise ValueError(f"results CSV {path}: not a results.csv written by `kvreuse report` (no column "
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    rows = []
    for ln, vals in enumerate(lines[1:], start=2):
        if not vals:
            continue
        if len(vals) != len(head):
            raise ValueError(f"results CSV {path} line {ln}: {len(vals)} values for {len(head)} columns")
        try:
            rows.append(_csv_row(dict(zip(head, vals, strict=True))))
        except ValueError as e:
            raise ValueError(f"results CSV {path} line {ln}: {e}") from None
    return rows


def _csv_row(d: dict[str, str]) -> Row:
    def num(col, kind=float, blank=float("nan")):
        v = d.get(col, "")
        if v == "":
            return blank
        try:
            return kind(v)
        except ValueError:
            raise ValueError(f"{col} is {v!r}, not a {'whole ' if kind is int else ''}number") from None

    paired = diff_ci = None
    if d["paired_n"] != "":
        paired = Paired(num("paired_n", int), num("paired_both", int, -1), num("only_baseline", int),
                        num("only_setting", int), num("paired_neither", int, -1), num("p_mcnemar"))
    if d["diff_ci_low"] != "":
        diff_ci = (num("diff_ci_low"), num("diff_ci_high"))
    mean = num("lat_mean_ms")
    calls = num("lat_calls", int, 0 if mean != mean else -1)  # no mean: no call; else unknown in an old CSV
    if num("is_baseline", int) not in (0, 1):
        raise ValueError(f"is_baseline is {d['is_baseline']!r}, not 0 or 1")
    return Row(
        group=d["group"], setting=d["setting"], task=d["task"], is_baseline=d["is_baseline"] == "1",
        n=num("n", int), successes=num("successes", int), errors=num("errors", int),
        ci=(num("ci_low"), num("ci_high")), lat=Latency(calls, mean, num("lat_p50_ms"), num("lat_p95_ms")),
        parts={p: num(f"{p}_ms") for p in ("vision", "prefix", "denoise", "sample") if d.get(f"{p}_ms", "") != ""},
        reuse_rate=num("reuse_rate"), mixed_rate=num("mixed_rate"), speedup=num("speedup"), paired=paired,
        diff_ci=diff_ci, key=d.get("key", ""),
    )


# ---- plots ---------------------------------------------------------------------------------


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (latency, success) not dominated by one with lower-or-equal latency and
    higher-or-equal success (one strictly better), sorted by latency. A point without a finite
    latency (no timed call) is on no front: NaN sorted anywhere and broke the order."""
    idx = sorted((i for i, (lat, ok) in enumerate(points) if math.isfinite(lat) and math.isfinite(ok)),
                 key=lambda i: (points[i][0], -points[i][1]))
    out, best = [], -1.0
    for i in idx:
        if points[i][1] > best:
            out.append(i)
            best = points[i][1]
    return out


PLOT_NAMES = ("success_vs_reuse", "success_vs_latency", "per_task")  # + an optional _<group> and .png
# Exactly the names write_plots writes: a prefix match deleted a user's per_task_annotated.png.
_PLOT_FILE = re.compile(rf"({'|'.join(PLOT_NAMES)})(_\d+)?\.png")


def write_plots(rows: list[Row], out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    by_group: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_group[r.group].append(r)
    for gi, (g, rs) in enumerate(by_group.items()):
        sfx = "" if len(by_group) == 1 else f"_{gi}"
        overall = [r for r in rs if r.task == ALL and r.n > 0]
        if not overall:  # said, or the missing plots (and a gap in the numbering) would go unexplained
            print(f"no plots for {g}: no finished episode (every one an env error)", file=sys.stderr)
            continue
        no_base = not any(r.is_baseline for r in rs)  # the usual advice would point at blank Δ
        note = ("\nno baseline in this group: run one (`kvreuse eval --with-baseline`) to compare with" if no_base
                else "\nsettings on different episodes: compare through the report's paired Δ")
        g_all = g + note if no_base or not same_episodes([r for r in rs if r.task == ALL]) else g
        names = list(dict.fromkeys(r.setting for r in overall))
        gone = [r.setting for r in rs if r.task == ALL and r.n == 0]  # every episode an env error: no point
        missing = f"\nnot shown (no finished episode): {', '.join(gone)}" if gone else ""
        g_all += missing
        colour = _colours(names)
        # success vs reuse rate
        fig, ax = plt.subplots(figsize=(9, 4.8))
        _scatter(ax, overall, lambda r: 100 * r.reuse_rate, colour)
        lo, hi = ax.get_xlim()  # the label margin, but no ticks below 0% or above 100%
        if hi - lo < 10.0:  # every point at one rate (a baseline alone): not a +-0.05% axis
            mid = min(max((lo + hi) / 2, 0.0), 100.0)
            lo, hi = mid - 5.0, mid + 5.0
        ax.set_xlim(max(lo, -5.0), min(hi, 105.0))
        ax.set_xlabel("reuse rate (% of policy calls)")
        ax.set_ylabel("success (%), 95% Wilson interval")
        ax.set_title(f"Success vs reuse rate\n{g_all}", fontsize=9)
        _legend_outside(ax)
        _number_points(fig, ax, overall, lambda r: 100 * r.reuse_rate, names, colour)
        files.append(_save(fig, out_dir / f"success_vs_reuse{sfx}.png"))
        # success vs latency with the Pareto front
        fig, ax = plt.subplots(figsize=(9, 4.8))
        _scatter(ax, overall, lambda r: r.lat.mean, colour)
        pts = [(r.lat.mean, r.rate) for r in overall]
        front = pareto(pts)
        ax.plot([pts[i][0] for i in front], [100 * pts[i][1] for i in front], "--", color="gray", lw=1,
                label="Pareto front")
        ax.set_xlabel("mean latency per policy call (ms)")
        ax.set_ylabel("success (%), 95% Wilson interval")
        ax.set_title(f"Success vs latency\n{g_all}", fontsize=9)
        _legend_outside(ax)
        _number_points(fig, ax, overall, lambda r: r.lat.mean, names, colour,
                       [(pts[i][0], 100 * pts[i][1]) for i in front])
        files.append(_save(fig, out_dir / f"success_vs_latency{sfx}.png"))
        per_task = [r for r in rs if r.task != ALL and r.n > 0]
        tasks = sorted({r.task for r in per_task})
        if tasks:
            equal = not no_base and all(same_episodes([r for r in rs if r.task == t]) for t in tasks)
            title = f"Success per task\n{g if equal else g + note}{missing}"
            fig = _per_task(rs, per_task, tasks, names, colour, title)
            files.append(_save(fig, out_dir / f"per_task{sfx}.png"))
    return files


def _colours(names: list[str]) -> dict[str, tuple]:
    """One colour per setting, the same in every plot; tab20's dark shades first past 10 settings
    (the default cycle repeats its 10 colours: an 11th setting looked like the baseline)."""
    import matplotlib

    if len(names) <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return {n: cmap(i) for i, n in enumerate(names)}
    cmap = matplotlib.colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {n: cmap(order[i % 20]) for i, n in enumerate(names)}


def _key_label(i: int, name: str) -> str:
    return f"{i + 1}  {name}"


def _scatter(ax, rows: list[Row], x_of, colour) -> None:
    """The points with their intervals; the names go in the legend, keyed by number (a name printed
    beside its point overlapped the next one's and two settings at one spot printed on each other)."""
    for i, r in enumerate(rows):
        x, y = x_of(r), 100 * r.rate
        err = [[y - 100 * r.ci[0]], [100 * r.ci[1] - y]]
        ax.errorbar([x], [y], yerr=err, fmt="s" if r.is_baseline else "o", capsize=3, color=colour[r.setting],
                    label=_key_label(i, r.setting))
    ax.set_ylim(-4, 106)
    ax.margins(x=0.08)  # room for the numbers of the outermost points
    ax.grid(alpha=0.3)


def _number_points(fig, ax, rows: list[Row], x_of, names: list[str], colour, line=()) -> None:
    """Each point's number beside it, where it overlaps no other number, marker, error bar or the
    line (data points, the Pareto front); points at one spot (within a marker) share one label, "2,7"."""
    import numpy as np

    fig.tight_layout()
    fig.canvas.draw()
    rend = fig.canvas.get_renderer()
    xy = ax.transData.transform(np.array([[x_of(r), 100 * r.rate] for r in rows], dtype=float))
    px = fig.dpi / 72  # pixels per point
    obstacles = []  # display boxes (x0, y0, x1, y1): the markers and the error bars
    for (x, y), r in zip(xy, rows, strict=True):
        lo, hi = ax.transData.transform([[0, 100 * r.ci[0]], [0, 100 * r.ci[1]]])[:, 1]
        obstacles += [(x - 4 * px, y - 4 * px, x + 4 * px, y + 4 * px), (x - 3.5 * px, lo, x + 3.5 * px, hi)]
    line = ax.transData.transform(np.array(line, dtype=float).reshape(-1, 2))
    for a, b in zip(line[:-1], line[1:], strict=True):
        for t in np.linspace(0, 1, 25):
            x, y = a + t * (b - a)
            obstacles.append((x - px, y - px, x + px, y + px))
    clusters: list[list[int]] = []
    for i in range(len(rows)):
        near = next((c for c in clusters if np.hypot(*(xy[c[0]] - xy[i])) < 6 * px), None)
        near.append(i) if near is not None else clusters.append([i])
    area = ax.get_window_extent(rend)
    placed: list[tuple] = []
    dirs = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for c in sorted(clusters, key=lambda c: -len(c)):
        text = ",".join(str(names.index(rows[i].setting) + 1) for i in c)
        best = None
        for d in (4, 10, 17, 25, 34):
            for dx, dy in dirs:
                ann = ax.annotate(
                    text, tuple(ax.transData.inverted().transform(xy[c[0]])), xytext=(dx * d, dy * d),
                    textcoords="offset points", fontsize=7, fontweight="bold",
                    color=colour[rows[c[0]].setting] if len(c) == 1 else "black",
                    ha={1: "left", -1: "right", 0: "center"}[dx], va={1: "bottom", -1: "top", 0: "center"}[dy],
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="gray", shrinkA=0, shrinkB=2) if d > 4 else None,
                )
                ann.set_in_layout(False)  # the layout is fixed already; a label must not shift it
                b = ann.get_window_extent(rend)
                box = (b.x0, b.y0, b.x1, b.y1)
                inside = area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1
                cost = sum(_overlap(box, o) for o in placed) * 10 + sum(_overlap(box, o) for o in obstacles)
                cost += 0 if inside else 1e6
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, ann, box)
                else:
                    ann.remove()
                if cost == 0:
                    break
            if best[0] == 0:
                break
        placed.append(best[2])


def _overlap(a: tuple, b: tuple) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _per_task(rs, per_task, tasks, names, colour, title):
    """One small panel per task, the settings as horizontal bars (named on each row's first panel),
    the 95% Wilson interval as error bars: one axes of 10 tasks x 11 settings was 4174 px wide."""
    import matplotlib.pyplot as plt
    import numpy as np

    ncols = min(len(tasks), 5)
    nrows = -(-len(tasks) // ncols)
    panel_h = 0.16 * len(names) + 0.7
    name_w = 0.065 * max(len(_key_label(i, n)) for i, n in enumerate(names))
    width = max(6.5, name_w + 2.1 * ncols + 0.4)  # 6.5 in: room for the title beside one panel
    fig, axes = plt.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False,
                             figsize=(width, panel_h * nrows + 1.0))
    y = np.arange(len(names))
    for ax, t in zip(axes.flat, tasks, strict=False):
        for si, name in enumerate(names):
            r = next((x for x in per_task if x.task == t and x.setting == name), None)
            if r is None:  # no finished episode: a row of n = 0 means every episode was an env error
                errs = any(x.task == t and x.setting == name for x in rs)
                ax.text(2, si, "errors only" if errs else "not run", va="center", ha="left", fontsize=6.5,
                        color=colour[name])
                continue
            v = 100 * r.rate
            ax.barh(si, v, 0.75, xerr=[[v - 100 * r.ci[0]], [100 * r.ci[1] - v]], capsize=1.5,
                    color=colour[name], error_kw=dict(lw=0.8), label=name)
            if v == 0:  # a 0% bar has no length: a mark of its colour tells it from an empty slot
                ax.vlines(0, si - 0.3, si + 0.3, colors=[colour[name]], lw=3)
        ax.set_title(t, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    ax0 = axes[0, 0]
    ax0.set_xlim(-3, 105)  # room left of 0 for the mark of a 0% bar
    ax0.set_ylim(len(names) - 0.5, -0.5)  # every slot, the first setting on top
    ax0.set_yticks(y)
    ax0.set_yticklabels([_key_label(i, n) for i, n in enumerate(names)])
    base = next((r.setting for r in rs if r.is_baseline), None)
    for row in axes:  # each row's first panel names the settings, in their colours, the baseline in bold
        for lab, name in zip(row[0].get_yticklabels(), names, strict=True):
            lab.set_color(colour[name])
            lab.set_fontweight("bold" if name == base else "normal")
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("success (%), 95% Wilson interval", fontsize=8)
    return fig


def _legend_outside(ax) -> None:
    """Right of the axes: inside, it hid points and bars (a baseline at 100%, a front's corner)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              ncol=1 if len(ax.get_legend_handles_labels()[0]) <= 22 else 2)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(db: str | Path, out_dir: str | Path | None = None, plots: bool = True) -> tuple[str, list[Path]]:
    """-> (Markdown text, files written: report.md, results.csv and the plots)."""
    rows = compute_rows(db)
    md = f"# kvreuse results: {Path(db).name}\n\n" + markdown(rows)
    return md, ([] if out_dir is None else _write_out(Path(out_dir), md, rows, plots, csv_too=True))


def write_report_from_csv(csv_path: str | Path, out_dir: str | Path, plots: bool = True) -> tuple[str, list[Path]]:
    """The tables and plots again from a results.csv (its DB need not be kept): -> (Markdown text,
    files written: report.md and the plots; the CSV is the input, left as it is)."""
    rows = read_csv(csv_path)
    md = (f"# kvreuse results: {csv_path}\n\nRedrawn from that CSV: its numbers are as the report that wrote it "
          "computed them; the notes under each heading describe this version's method.\n\n" + markdown(rows))
    return md, _write_out(Path(out_dir), md, rows, plots, csv_too=False)


def _write_out(out: Path, md: str, rows: list[Row], plots: bool, csv_too: bool) -> list[Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(md)
        files = [out / "report.md"] + ([write_csv(rows, out / "results.csv")] if csv_too else [])
        for old in out.glob("*.png"):  # an earlier report's plots would sit beside other numbers
            if _PLOT_FILE.fullmatch(old.name):
                old.unlink()
        if plots and rows:
            files += write_plots(rows, out)
    except OSError as e:  # a file in the way, no permission, a read-only file system
        raise ValueError(f"report folder {out}: cannot write there ({os_reason(e)}); "
                         "give a writable folder") from None
    return files
