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


def _ep(task, i, status="success", ms=10.0, calls=4):
    from kvreuse.eval.rollout import EpisodeResult

    return EpisodeResult(task, i, i, status, steps=10, calls=calls, reuses=0, decisions=["refresh"] * calls,
                         reasons=["x"] * calls, timings={} if status == "error" else {"total": [ms] * calls})


def _baseline_and_thr(st):
    """The setting ids of a baseline and a threshold setting ("thr") of one policy on the fake env."""
    from kvreuse.eval.store import Setting

    return st.setting_id(Setting("p", "fake", 5)), st.setting_id(Setting("p", "fake", 5, {"threshold": 0.98}, "thr"))


def test_speedup_compares_the_same_episodes_as_the_paired_test(tmp_path):
    """An episode only one side finished (an env error on the other, or one the baseline never ran)
    is in neither mean of the speedup: before, the baseline's mean kept the episodes the setting
    lost to errors and the setting's kept episodes the baseline never ran."""
    from kvreuse.eval.report import ALL, compute_rows
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "s.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        for i in range(4):  # the pairs: baseline 40 ms, setting 20 ms -> 2x
            st.add(base, _ep("reach", i, ms=40.0))
            st.add(thr, _ep("reach", i, ms=20.0))
        st.add(base, _ep("reach", 4, ms=400.0))  # the setting lost this one to an env error
        st.add(thr, _ep("reach", 4, "error"))
        st.add(thr, _ep("reach", 5, ms=2.0))  # the baseline lost this one
        st.add(base, _ep("reach", 5, "error"))
        st.add(thr, _ep("reach", 6, ms=2.0))  # the baseline never ran this one
    for r in compute_rows(db):
        if r.setting == "thr":
            assert r.paired.n == 4 and r.speedup == pytest.approx(2.0), r.task
            assert r.n == 6 and r.lat.mean == pytest.approx((4 * 4 * 20 + 2 * 4 * 2) / 24)  # all it finished
        elif r.task == ALL:
            assert r.n == 5 and r.speedup == 1.0


def test_summary_counts_only_the_episodes_just_run(tmp_path, capsys):
    """A baseline stored earlier on more episodes (and another task) is shown, in the summary, on
    this run's episodes only: every row side by side on the same episodes (`report` shows all)."""
    from kvreuse.cli import main

    common = ["--env", "fake", "--workers", "0", "--no-progress", "--max-steps", "5", "--db", str(tmp_path / "e.db")]
    main(["eval", *common, "--tasks", "reach", "reach-far", "--episodes", "3"])
    capsys.readouterr()
    main(["eval", *common, "--tasks", "reach", "--episodes", "1", "--reuse", "gate=threshold threshold=0.98",
          "--with-baseline"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [r for r in rows if r[0] != "| setting"]
    assert len(rows) == 4  # baseline and the setting, all tasks and reach
    assert [r[7] for r in rows] == ["1"] * 4  # n: the one episode just run, also for the baseline
    assert "(n=1)" in out


def test_tables_and_plots_say_when_rows_count_different_episodes(tmp_path, monkeypatch):
    """A baseline over 3 episodes beside a setting over 2 of them: side by side the success columns
    (and the plotted points, the Pareto front) compare different episodes, so the report says so;
    a table whose rows all count the same finished episodes (an error episode aside) says nothing."""
    import matplotlib.axes
    import matplotlib.figure

    from kvreuse.eval.report import UNEQUAL, compute_rows, markdown, write_plots
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "u.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        for i in range(2):
            for task in ("a", "b"):
                st.add(base, _ep(task, i))
                st.add(thr, _ep(task, i, "failure"))
        st.add(thr, _ep("a", 9, "error"))  # errors are out of n on both sides: still the same episodes
    md = markdown(compute_rows(db))
    assert UNEQUAL not in md
    with ResultStore(db) as st:
        st.add(base, _ep("b", 2))  # now the baseline counts one episode of b more than the setting
    md = markdown(compute_rows(db))
    tables = md.split("### ")[1:]
    assert [UNEQUAL in t for t in tables] == [True, False, True]  # all tasks, a, b
    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, **kw: titles.append(t))
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: titles.append(t))
    write_plots(compute_rows(db), tmp_path / "plots")
    titles = [t for t in titles if t.startswith("Success")]  # not the per-task panels' task names
    assert len(titles) == 3 and all("settings on different episodes" in t for t in titles)


def test_a_setting_with_no_finished_episode_shows_no_rates(tmp_path):
    """Every episode an env error: success, latency and reuse rate are unknown ("–"), not 0%; the
    interval is the whole range."""
    from kvreuse.eval.report import compute_rows, markdown
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "e.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        st.add(base, _ep("a", 0))
        st.add(thr, _ep("a", 0, "error"))
    line = next(ln for ln in markdown(compute_rows(db)).splitlines() if ln.startswith("| thr |"))
    assert line == "| thr | – | – | – | – | – | – | 0 | [0.0%, 100.0%] | – | – | 1 |"


def test_reuse_rate_axis_stays_within_0_to_100_percent(tmp_path, monkeypatch):
    from kvreuse.eval import report
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "r.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        st.add(base, _ep("a", 0))
        r = _ep("a", 0)
        r.reuses = r.calls  # 100% reuse
        st.add(thr, r)
    limits = {}
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: limits.setdefault(path.stem, fig.axes[0].get_xlim())
                        and save(fig, path))
    report.write_plots(report.compute_rows(db), tmp_path / "plots")
    lo, hi = limits["success_vs_reuse"]
    assert -5.0 <= lo < 0.0 and 100.0 < hi <= 105.0
    limits.clear()  # every point at one rate: an axis of some width, not +-0.05% around it
    report.write_plots([r for r in report.compute_rows(db) if r.is_baseline], tmp_path / "plots")
    lo, hi = limits["success_vs_reuse"]
    assert lo == -5.0 and hi >= 5.0


def test_per_task_plot_tells_a_0_percent_bar_from_a_task_not_run(tmp_path, monkeypatch):
    """A 0% bar has no height and a task a setting never ran has no bar: both showed as an error bar
    or less. A 0% bar gets a mark of its colour at 0; an empty slot says "not run" ("errors only"
    when every episode of it was an env error)."""
    import matplotlib.colors

    from kvreuse.eval import report
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "p.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        for i in range(2):
            for task in ("a", "b"):
                st.add(base, _ep(task, i))
            st.add(thr, _ep("a", i, "failure"))  # 0% on a; b never run
        st.add(thr, _ep("c", 0, "error"))  # c: errors only
        st.add(base, _ep("c", 0))
    seen = {}
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: seen.setdefault(path.stem, fig) and save(fig, path))
    report.write_plots(report.compute_rows(db), tmp_path / "plots")
    panel = {ax.get_title(): ax for ax in seen["per_task"].axes if ax.get_visible()}  # one per task, bars across
    assert sorted(panel) == ["a", "b", "c"]
    slot = {t.get_text().split()[-1]: y for t, y in zip(panel["a"].get_yticklabels(), panel["a"].get_yticks(),
                                                        strict=True)}
    colour = {c.get_label(): matplotlib.colors.to_hex(c.patches[0].get_facecolor()) for ax in panel.values()
              for c in ax.containers if hasattr(c, "patches")}
    notes = sorted((title, t.get_text(), t.get_position()[1], matplotlib.colors.to_hex(t.get_color()))
                   for title, ax in panel.items() for t in ax.texts)
    assert notes == [("b", "not run", slot["thr"], colour["thr"]), ("c", "errors only", slot["thr"], colour["thr"])]
    marks = [(title, seg, matplotlib.colors.to_hex(c.get_colors()[0])) for title, ax in panel.items()
             for c in ax.collections for seg in c.get_segments() if len(seg) == 2 and seg[0][0] == seg[1][0] == 0]
    assert len(marks) == 1  # thr's 0% on a; the baseline's 100% bars need none (error bars are not at x = 0)
    title, ((x0, y0), (x1, y1)), c = marks[0]
    assert title == "a" and (y0 + y1) / 2 == pytest.approx(slot["thr"]) and c == colour["thr"]
    lo, hi = panel["a"].get_ylim()
    assert panel["a"].get_xlim()[0] < 0 and min(lo, hi) < min(slot.values()) and max(slot.values()) < max(lo, hi)


def _same_rows(a, b) -> bool:
    """Row equality with NaN equal to NaN (an unknown rate or speedup)."""
    import dataclasses

    def norm(x):
        if isinstance(x, float) and x != x:
            return "nan"
        if dataclasses.is_dataclass(x):
            return tuple(norm(v) for v in dataclasses.astuple(x))
        if isinstance(x, (tuple, list)):
            return tuple(norm(v) for v in x)
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        return x

    return [norm(r) for r in a] == [norm(r) for r in b]


def test_report_redraws_from_its_csv_the_same_rows_tables_and_plots(tmp_path, capsys):
    """The DBs behind docs/results/ are not kept, their results.csv is: DB -> CSV -> rows equal to the
    DB's (an error, an unknown rate, a setting without pairs included), and the same tables."""
    from kvreuse.cli import main
    from kvreuse.eval import report
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "c.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        for i in range(3):
            st.add(base, _ep("a", i, ms=40.0))
            st.add(thr, _ep("a", i, "failure" if i else "success", ms=20.0))
        st.add(thr, _ep("b", 0, "error"))  # b: errors only, no latency, no pairs
        st.add(thr, _ep("c", 0))  # c: the baseline never ran it
    rows = report.compute_rows(db)
    md, _ = report.write_report(db, tmp_path / "db_out")
    back = report.read_csv(tmp_path / "db_out" / "results.csv")
    assert _same_rows(back, rows) and len(rows) == 6
    assert report.markdown(back) == report.markdown(rows)
    main(["report", "--csv", str(tmp_path / "db_out" / "results.csv"), "--out", str(tmp_path / "again")])
    assert report.markdown(rows) in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "per_task.png", "report.md", "success_vs_latency.png", "success_vs_reuse.png"]


def test_report_csv_of_an_older_report_and_csvs_that_are_not_ours(tmp_path, capsys):
    """A results.csv from before sample_ms and the call / pair counts still redraws (the counts it
    lacks are -1, unknown); any other file is one clear error line."""
    import csv as csvmod

    from kvreuse.cli import main
    from kvreuse.eval import report
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "o.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        for i in range(2):
            st.add(base, _ep("a", i))
            st.add(thr, _ep("a", i, "failure"))
    rows = report.compute_rows(db)
    new = tmp_path / "new.csv"
    report.write_csv(rows, new)
    old = tmp_path / "old.csv"
    with open(new, newline="") as f, open(old, "w", newline="") as g:  # the columns of docs/results/sweep-pi05
        w = csvmod.writer(g)
        w.writerow(report.CSV_REQUIRED)
        w.writerows([line[c] for c in report.CSV_REQUIRED] for line in csvmod.DictReader(f))
    back = report.read_csv(old)
    assert report.markdown(back) == report.markdown(rows)
    thr_row = next(r for r in back if r.setting == "thr" and r.task == "a")
    assert (thr_row.lat.n, thr_row.paired.both, thr_row.paired.neither, thr_row.paired.n) == (-1, -1, -1, 2)
    bad = {
        "notes.csv": "name,score\na,1\n",
        "empty.csv": "",
        "binary.csv": b"\xff\xfe\x00PNG",
        "short.csv": ",".join(report.CSV_FIELDS) + "\nx,y\n",
        "word.csv": new.read_text().replace(",2,2,", ",two,2,", 1),
    }
    for name, text in bad.items():
        p = tmp_path / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        with pytest.raises(SystemExit) as e:
            main(["report", "--csv", str(p), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code != 0 and len(err) == 1 and err[0].startswith("kvreuse: error: results CSV"), (name, err)
    assert "not a results.csv written by `kvreuse report` (no column group, setting, task, ...)" in (
        str(pytest.raises(ValueError, report.read_csv, tmp_path / "notes.csv").value))
    assert "line 2: 2 values" in str(pytest.raises(ValueError, report.read_csv, tmp_path / "short.csv").value)
    assert "line 2: n is 'two', not a whole number" in str(
        pytest.raises(ValueError, report.read_csv, tmp_path / "word.csv").value)
    for given in (str(db), "runs/kvreuse.db"):  # the default path given by name is a --db too
        with pytest.raises(SystemExit):
            main(["report", "--csv", str(new), "--db", given])
        assert "give --db or --csv, not both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_table_without_a_baseline_or_without_pairs_says_why_its_comparisons_are_blank(tmp_path, monkeypatch):
    """A setting run without --with-baseline: its speedup, Δ and p are "–", and the report says why
    (it said nothing, or told the reader to compare through Δ, which is blank); so do the plots. A
    baseline that ran other episodes only leaves that setting's Δ blank too, and the note says so."""
    import matplotlib.axes
    import matplotlib.figure

    from kvreuse.eval.report import NO_BASELINE, NO_PAIRS, UNEQUAL, compute_rows, markdown, write_plots
    from kvreuse.eval.store import ResultStore, Setting

    db = tmp_path / "n.db"
    with ResultStore(db) as st:
        thr = st.setting_id(Setting("p", "fake", 5, {"threshold": 0.98}, "thr"))
        per = st.setting_id(Setting("p", "fake", 5, {"gate": "period", "period": 2}, "per"))
        st.add(thr, _ep("a", 0))
        st.add(per, _ep("a", 1))
    tables = markdown(compute_rows(db)).split("### ")[1:]
    assert len(tables) == 2 and all(NO_BASELINE in t and UNEQUAL not in t for t in tables)
    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, **kw: titles.append(t))
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: titles.append(t))
    write_plots(compute_rows(db), tmp_path / "plots")
    titles = [t for t in titles if t.startswith("Success")]
    assert len(titles) == 3 and all("no baseline in this group" in t for t in titles)

    db2 = tmp_path / "p.db"  # the baseline ran task a, the setting task b only
    with ResultStore(db2) as st:
        base, thr = _baseline_and_thr(st)
        st.add(base, _ep("a", 0))
        st.add(thr, _ep("b", 0))
    tables = dict(t.split("\n", 1) for t in markdown(compute_rows(db2)).split("### ")[1:])
    assert UNEQUAL + " " + NO_PAIRS in tables["All tasks"]
    assert NO_BASELINE in tables["b"] and NO_BASELINE not in tables["a"] and UNEQUAL not in tables["a"]


def test_a_db_of_error_episodes_only_says_why_it_has_no_plots_and_no_speedup(tmp_path, capsys):
    """Every episode an env error: `report` wrote report.md and results.csv and no plot, without a
    word, and gave the baseline a speedup of 1.00x beside its blank latency."""
    from kvreuse.cli import main
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "e.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        st.add(base, _ep("a", 0, "error"))
        st.add(thr, _ep("a", 0, "error"))
    main(["report", "--db", str(db), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert "no plots for fake | policy p | replan 5: no finished episode (every one an env error)" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md", "results.csv"]
    line = next(ln for ln in out.splitlines() if ln.startswith("| **baseline** |"))
    assert line == "| **baseline** | – | – | – | – | – | – | 0 | [0.0%, 100.0%] | – | – | 1 |"


def test_plots_name_a_setting_left_out_for_having_no_finished_episode(tmp_path, monkeypatch):
    """A setting whose every episode was an env error has no point and no bar: the plots left it
    out without a word, as if it had never run."""
    import matplotlib.axes
    import matplotlib.figure

    from kvreuse.eval.report import compute_rows, write_plots
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "g.db"
    with ResultStore(db) as st:
        base, thr = _baseline_and_thr(st)
        st.add(base, _ep("a", 0))
        st.add(thr, _ep("a", 0, "error"))
    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, **kw: titles.append(t))
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: titles.append(t))
    assert len(write_plots(compute_rows(db), tmp_path / "plots")) == 3
    titles = [t for t in titles if t.startswith("Success")]
    assert len(titles) == 3 and all(t.endswith("\nnot shown (no finished episode): thr") for t in titles), titles


def test_a_setting_name_with_a_pipe_keeps_the_table_columns(tmp_path):
    """The phase gate's name, "phase(raw>=0.9|0.995)/full", put a bare | in its table row: rendered,
    the row split there and every number after it moved one column right (success under "latency")."""
    import re

    from kvreuse.eval.report import compute_rows, markdown
    from kvreuse.eval.store import ResultStore, Setting
    from kvreuse.reuse.config import ReuseConfig

    label = ReuseConfig(gate="phase").label()
    assert "|" in label
    db = tmp_path / "ph.db"
    with ResultStore(db) as st:
        base = st.setting_id(Setting("p", "fake", 5))
        ph = st.setting_id(Setting("p", "fake", 5, {"gate": "phase"}, label))
        st.add(base, _ep("a", 0))
        st.add(ph, _ep("a", 0, "failure"))
    lines = [ln for ln in markdown(compute_rows(db)).splitlines() if ln.startswith("|")]
    cells = [re.split(r"(?<!\\)\|", ln)[1:-1] for ln in lines]  # what a Markdown renderer splits on
    assert {len(c) for c in cells} == {12}
    row = next(c for c in cells if c[0].strip().startswith("phase("))
    assert row[0].strip().replace("\\|", "|") == label and row[1].strip() == "0.0%"


def test_two_settings_of_one_name_in_a_db_are_told_apart(tmp_path, monkeypatch):
    """A DB written before label() named every field a setting reads holds two settings of one name
    (downsample=16 and 32): their rows looked the same and the plots gave both one number and one
    colour. Each is named with its key then."""
    import matplotlib.axes

    from kvreuse.eval.report import compute_rows, write_plots
    from kvreuse.eval.store import ResultStore, Setting

    db = tmp_path / "d.db"
    with ResultStore(db) as st:
        base = st.setting_id(Setting("p", "fake", 5))
        a = st.setting_id(Setting("p", "fake", 5, {"gate": "threshold", "downsample": 16}, "thr"))
        b = st.setting_id(Setting("p", "fake", 5, {"gate": "threshold"}, "thr"))
        for sid in (base, a, b):
            st.add(sid, _ep("x", 0))
        keys = {r["id"]: r["key"] for r in st.settings()}
    rows = compute_rows(db)
    names = {r.setting for r in rows if r.task == "(all tasks)"}
    assert names == {"baseline", f"thr [{keys[a][:8]}]", f"thr [{keys[b][:8]}]"}
    labels = []
    orig = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: (labels.append(text), orig(self, text, *a, **k))[1])
    write_plots(rows, tmp_path / "plots")
    assert {"2", "3"} <= set(",".join(labels).split(","))  # each its own number on the points


def test_pool_paired_pools_each_dbs_own_pairs_and_refuses_an_episode_twice(tmp_path, capsys):
    """scripts/pool_paired.py (RESULTS.md pools push-v3 over the sweep's seed and two more): each DB
    pairs the setting with its own baseline; the pooled test is McNemar over all those pairs; the
    same episode in two DBs, a setting name a DB lacks, or a missing DB, is one line and exit 2."""
    import runpy
    from pathlib import Path

    from kvreuse.eval.store import ResultStore

    mod = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "pool_paired.py"))

    def db(name, seeds, base_ok, thr_ok):
        path = tmp_path / name
        with ResultStore(path) as st:
            b, t = _baseline_and_thr(st)
            for i, ok_b, ok_t in zip(seeds, base_ok, thr_ok, strict=True):
                st.add(b, _ep("push", i, "success" if ok_b else "failure"))
                st.add(t, _ep("push", i, "success" if ok_t else "failure"))
            st.add(t, _ep("reach", 99, "failure"))  # no baseline episode: not a pair
            st.add(b, _ep("push", 98, "error"))  # an error on one side: not a pair
            st.add(t, _ep("push", 98, "success"))
        return str(path)

    a = db("a.db", [0, 1, 2], [True, True, False], [False, True, True])  # lost 1, gained 1
    c = db("c.db", [3, 4, 5, 6], [True, True, True, True], [False, False, True, True])  # lost 2
    rows = mod["pool"]([a, c], "thr")
    assert [(r.n, r.only_base, r.only_setting) for _, r, _ in rows] == [(3, 1, 1), (4, 2, 0), (7, 3, 1)]
    assert rows[-1][1].p_value == stats.mcnemar([True, True, False, True, True, True, True],
                                                [False, True, True, False, False, True, True]).p_value
    dup = db("dup.db", [2], [True], [True])
    missing = str(tmp_path / "missing.db")
    # A task no pair has (reach: the setting's episode has no baseline; a typo) was a table of zeros.
    no_pair = "no episode of task {!r} finished by both 'thr' and its baseline; the baseline ran ['push']"
    for argv, msg in (([a, dup], "both hold episode ('push', 2, 2)"), ([a], "0 settings named 'nope'"),
                      ([a, missing], "missing.db: no such file"), (["--task", "reach", a], no_pair.format("reach")),
                      (["--task", "psuh", a], no_pair.format("psuh"))):
        setting = "nope" if "nope" in msg else "thr"
        assert mod["main"](["--setting", setting, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not Path(missing).exists()  # read, never created
    assert mod["main"](["--setting", "thr", "--task", "push", a, c]) == 0
    assert "| pooled | 7 |" in capsys.readouterr().out


def test_pool_reports_sums_each_reports_paired_counts(tmp_path, capsys):
    """scripts/pool_reports.py (RESULTS.md pools push over reports whose DBs are not kept): the
    lost / gained counts of one setting on one task, per `kvreuse report` CSV and summed, with the
    exact McNemar p of the sums; a setting a report lacks, a file that is no report, or a report
    given twice, is one line and exit 2."""
    import runpy
    from pathlib import Path

    from kvreuse.eval.report import compute_rows, write_csv
    from kvreuse.eval.store import ResultStore

    mod = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "pool_reports.py"))

    def report(name, seeds, base_ok, thr_ok):
        with ResultStore(tmp_path / f"{name}.db") as st:
            b, t = _baseline_and_thr(st)
            for i, ok_b, ok_t in zip(seeds, base_ok, thr_ok, strict=True):
                st.add(b, _ep("push", i, "success" if ok_b else "failure"))
                st.add(t, _ep("push", i, "success" if ok_t else "failure"))
        return str(write_csv(compute_rows(tmp_path / f"{name}.db"), tmp_path / f"{name}.csv"))

    a = report("a", [0, 1, 2], [True, True, False], [False, True, True])  # lost 1, gained 1
    c = report("c", [3, 4, 5, 6, 7], [True] * 5, [False, False, False, True, True])  # lost 3
    group, r = mod["counts"](c, "thr", "push")
    assert (group, r.n, r.both, r.only_base, r.only_setting, r.neither) == ("fake, policy p, replan 5", 5, 2, 3, 0, 0)
    assert mod["main"](["--setting", "thr", "--task", "push", a, c]) == 0
    out = capsys.readouterr().out
    summed = stats.mcnemar([True, True, False] + [True] * 5, [False, True, True] + [False] * 3 + [True] * 2)
    lo, hi = stats.paired_interval(summed)  # 4 lost, 1 gained over 8 pairs
    assert f"| summed |  | 8 | 4 | 1 | -37.5 [{100 * lo:+.1f}, {100 * hi:+.1f}] | {summed.p_value:.2g} |" in out, out
    # A report from before the paired_both / paired_neither columns: counts and p, no interval (its -1
    # counts were taken as counts: a wrong interval, or a ValueError from wilson)
    import csv

    with open(c) as f:
        gone = ("paired_both", "paired_neither")
        old_rows = [{k: v for k, v in r.items() if k not in gone} for r in csv.DictReader(f)]
    old = tmp_path / "old.csv"
    with open(old, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(old_rows[0]))
        w.writeheader()
        w.writerows(old_rows)
    assert mod["main"](["--setting", "thr", "--task", "push", a, str(old)]) == 0
    out = capsys.readouterr().out
    assert "| 5 | 3 | 0 | -60.0 [n/a] |" in out, out
    assert f"| summed |  | 8 | 4 | 1 | -37.5 [n/a] | {summed.p_value:.2g} |" in out, out
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    for argv, msg in ((["--setting", "nope", a], "0 rows of 'nope' on 'push'"),
                      (["--setting", "thr", str(tmp_path / "x.csv")], "not a results.csv"),
                      (["--setting", "thr", a, c, str(tmp_path / "." / "a.csv")], "a.csv: given twice")):
        assert mod["main"](["--task", "push", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_pool_paired_refuses_runs_of_another_policy_and_names_what_tells_same_named_settings_apart(tmp_path, capsys):
    """Pooling is for one policy's runs on other seeds: a DB whose setting ran under another policy id
    (other weights or norm stats, another device) is refused, naming both ids; a DB continued after a
    policy id change holds the name twice, and the error says they differ in the policy id."""
    import runpy
    from pathlib import Path

    from kvreuse.eval.store import ResultStore, Setting

    mod = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "pool_paired.py"))

    def db(name, policies, seed):
        path = tmp_path / name
        with ResultStore(path) as st:
            for pol in policies:
                b = st.setting_id(Setting(pol, "fake", 5))
                t = st.setting_id(Setting(pol, "fake", 5, {"threshold": 0.98}, "thr"))
                st.add(b, _ep("push", seed))
                st.add(t, _ep("push", seed))
        return str(path)

    a, other, both = db("a.db", ["p+stats@1"], 0), db("o.db", ["p+stats@2"], 1), db("b.db", ["p", "p+stats@1"], 2)
    assert mod["main"](["--setting", "thr", a, other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another policy id 'p+stats@1' vs 'p+stats@2'" in err[0], err
    assert mod["main"](["--setting", "thr", a, both]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 settings named 'thr'; they differ in policy id 'p' vs 'p+stats@1'" in err[0], err
    assert mod["main"](["--setting", "thr", a, db("c.db", ["p+stats@1"], 3)]) == 0


def test_report_names_each_settings_worst_task_under_the_all_task_table(tmp_path):
    """An all-task mean hid 6-13 point losses on push (RESULTS.md, "Push on two more seeds"): the
    report names each setting's worst task with its paired Δ and p under the all-task table, says
    when no task is below the baseline, and adds nothing for a group of one task."""
    from kvreuse.eval.report import WORST, compute_rows, markdown
    from kvreuse.eval.store import ResultStore, Setting

    db = tmp_path / "w.db"
    with ResultStore(db) as st:
        b, t = _baseline_and_thr(st)
        ok = st.setting_id(Setting("p", "fake", 5, {"threshold": 0.9}, "fine"))
        for i in range(4):
            for task in ("a", "b"):
                st.add(b, _ep(task, i))
                st.add(ok, _ep(task, i))
                st.add(t, _ep(task, i, "failure" if (task, i) in {("b", 0), ("b", 1), ("a", 0)} else "success"))
    md = markdown(compute_rows(db))
    block = md.split("### All tasks")[1].split("### a")[0]
    assert WORST in block
    assert "- thr: b -50.0 pts" in block and "(n=4, p=0.5)" in block  # b lost 2 of 4, a only 1
    assert "- fine: no task below the baseline" in block
    assert md.count(WORST) == 1  # under the all-task table only
    assert WORST not in markdown(compute_rows(db, only={("a", i, i) for i in range(4)}))  # one task: no block


def test_reuse_runs_counts_the_longest_run_of_reuses_per_episode(tmp_path, capsys):
    """scripts/reuse_runs.py (RESULTS.md: vision_only kept one snapshot for 27 calls in a row where
    the whole-prefix gate's runs averaged 3): the longest run of consecutive reuses per episode, its
    mean and max over a setting's episodes, the pooled reuse rate; error episodes left out."""
    import runpy
    from pathlib import Path

    from kvreuse.eval.rollout import EpisodeResult
    from kvreuse.eval.store import ResultStore

    mod = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "reuse_runs.py"))
    r, f = "reuse:full", "refresh"
    db = tmp_path / "r.db"
    with ResultStore(db) as st:
        b, t = _baseline_and_thr(st)
        st.add(b, _ep("push", 0))
        for i, (status, dec) in enumerate([("success", [f, r, r, f, r]), ("failure", [f, r, r, r, r, f]),
                                           ("error", [f, r, r, r, r, r, r, r])]):
            st.add(t, EpisodeResult("push", i, i, status, steps=10, calls=len(dec), reuses=dec.count(r),
                                    decisions=dec, reasons=["x"] * len(dec), timings={"total": [1.0] * len(dec)}))
    assert mod["longest_run"]([r, f, r, r, f]) == 2 and mod["longest_run"]([]) == 0
    assert mod["runs"](str(db)) == [("baseline", 1, 0.0, 0, 0.0), ("thr", 2, 3.0, 4, 7 / 11)]
    assert mod["runs"](str(db), task="reach") == []
    assert mod["main"]([str(db)]) == 0 and "| thr | 2 | 3.0 / 4 | 63.6% |" in capsys.readouterr().out
    assert mod["main"]([str(tmp_path / "none.db")]) == 2
    assert "none.db: no such file" in capsys.readouterr().err


def test_mixed_rate_counts_mixed_calls_of_finished_episodes(tmp_path):
    """Row.mixed_rate (the CSV's mixed_rate column) had no test: forced to 0, everything passed."""
    from dataclasses import replace

    from kvreuse.eval.report import ALL, compute_rows
    from kvreuse.eval.store import ResultStore

    db = tmp_path / "m.db"
    with ResultStore(db) as st:
        b, t = _baseline_and_thr(st)
        for i, mixed in enumerate((1, 3)):  # 4 calls each: 4 of 8 calls mixed
            st.add(b, _ep("reach", i))
            st.add(t, replace(_ep("reach", i), mixed=mixed))
        st.add(t, replace(_ep("reach", 2, "error"), mixed=4))  # an error's calls count nowhere
    rows = {(r.setting, r.task): r for r in compute_rows(db)}
    assert rows[("thr", "reach")].mixed_rate == pytest.approx(0.5)
    assert rows[("thr", ALL)].mixed_rate == pytest.approx(0.5)
    assert rows[("baseline", "reach")].mixed_rate == 0.0


def test_pool_paired_matches_a_setting_by_its_reuse_fields_not_its_label(tmp_path, capsys):
    """A DB written before a ReuseConfig default changed labels the same setting otherwise (RESULTS.md
    pools push under `,state_reference=cameras` with the same setting named without it): pool_paired
    matches by the reuse fields and says which name it took; a row of the asked name that runs other
    fields is not taken."""
    import runpy
    import sqlite3
    from pathlib import Path

    from kvreuse.eval.store import ResultStore, Setting

    mod = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "pool_paired.py"))

    def db(name, seed, label, reuse):
        path = tmp_path / name
        with ResultStore(path) as st:
            b = st.setting_id(Setting("p", "fake", 5))
            t = st.setting_id(Setting("p", "fake", 5, reuse, "thr"))
            st.add(b, _ep("push", seed))
            st.add(t, _ep("push", seed, "failure"))
        with sqlite3.connect(path) as c:  # as an older kvreuse labelled it
            c.execute("UPDATE settings SET name = ? WHERE id = ?", (label, t))
        return str(path)

    a = db("a.db", 0, "thr", {"gate": "threshold", "threshold": 0.9})
    old = db("old.db", 1, "thr,old_label", {"gate": "threshold", "threshold": 0.9})
    rows = mod["pool"]([a, old], "thr")
    assert [(label, r.n, r.only_base) for label, r, _ in rows] == [
        (a, 1, 1), (f"{old} (as 'thr,old_label')", 1, 1), ("pooled", 2, 2)]
    # A field the setting never reads (state_reference of a whole-prefix reuse) may differ by DB defaults.
    cm = {"gate": "crossmodal", "threshold": 0.9}
    rows = mod["pool"]([db("s.db", 3, "cm", {**cm, "state_reference": "state"}), db("c.db", 4, "cm", cm)], "cm")
    assert rows[-1][1].n == 2
    other = db("other.db", 2, "thr", {"gate": "threshold", "threshold": 0.95})  # the name, other fields
    assert mod["main"](["--setting", "thr", a, other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0 settings named 'thr' with its reuse fields (its row of that name runs others)" in err[0]


def test_state_motion_pairs_calls_lag_apart_within_an_episode():
    """scripts/state_motion.py (RESULTS.md: what state cosine 0.98 lets through on push): the cosine
    and RMS per-dim L2 the cross-modal gate computes, for calls 1 and 2 apart, over the state's real
    dims (the padding to max_state_dim adds nothing)."""
    import runpy
    from pathlib import Path

    import torch

    mod = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "state_motion.py"))
    pad = torch.zeros(1, 28)
    states = [torch.cat([torch.tensor([[1.0, 0.03 * k, 0.0, 0.0]]), pad], 1) for k in range(4)]
    out = {1: ([], []), 2: ([], [])}
    mod["pairs"](states, (1, 2), 4, out)
    assert [round(v, 4) for v in out[1][1]] == [0.015] * 3 and [round(v, 4) for v in out[2][1]] == [0.03] * 2
    assert all(0.99 < c <= 1.0 for c in out[1][0] + out[2][0]) and out[2][0][0] < out[1][0][0]


def test_baseline_diff_counts_the_episodes_whose_outcome_another_run_changed(tmp_path, capsys):
    """scripts/baseline_diff.py (EVAL.md: baselines rerun on other hosts): the episodes both DBs'
    baselines finished and those with another outcome; errors are not compared; baselines of
    another policy id are refused in one line."""
    import runpy
    from pathlib import Path

    from kvreuse.eval.store import ResultStore, Setting

    mod = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "baseline_diff.py"))

    def db(name, statuses, policy="p"):
        path = tmp_path / name
        with ResultStore(path) as st:
            b = st.setting_id(Setting(policy, "fake", 5))
            for i, status in enumerate(statuses):
                st.add(b, _ep("push", i, status))
        return str(path)

    a = db("a.db", ["success", "success", "failure", "error"])
    b = db("b.db", ["success", "failure", "failure", "success", "success"])
    n, diff = mod["compare"](a, b)
    assert n == 3 and diff == [(("push", 1, 1), True, False)]
    assert mod["main"]([a, b]) == 0
    assert "3 episodes in both, 1 with another outcome, 0 ended at another step" in capsys.readouterr().out
    with ResultStore(b) as st:  # episode 0 again, 12 steps long: the same outcome, another trajectory
        st.conn.execute("UPDATE episodes SET steps = 12 WHERE init_id = 0")
        st.conn.commit()
    assert mod["steps_apart"](a, b) == 1
    assert mod["main"]([a, db("o.db", ["success"], policy="q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another policy id" in err[0], err
