"""A results DB's settings keep their meaning when a ReuseConfig default changes: the DB records the
defaults its rows are relative to; a version-2 file (no record) is read by the history of changes."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import fields, replace

import pytest

import kvreuse.eval.sweep as sw
from kvreuse.eval.report import compute_rows
from kvreuse.eval.store import ResultStore, Setting
from kvreuse.eval.sweep import PolicySource, SweepPlan, run_sweep
from kvreuse.reuse.config import DEFAULT_CHANGES, ReuseConfig, defaults_at

T_AF0067E = 1795688246.0  # 2026-11-26 10:17:26 UTC: patch_max_diff's default went from None to 0.1
T_STATE_REF = 1795865281.0  # 2026-11-28 11:28:01 UTC: state_reference's default went from "state" to "cameras"
T_STATE_BOTH = 1795865695.0  # 2026-11-28 11:34:55 UTC: then to "both"
PARTIAL = {"gate": "threshold", "threshold": 0.9, "mode": "partial"}

# Every default as of this file. A change of one must be added to DEFAULT_CHANGES (version-2 DBs
# read their rows by it), then here.
DEFAULTS = {
    "gate": "never", "mode": "full", "synchronized": False, "threshold": 0.985, "image_metric": "raw",
    "downsample": 32, "patch_threshold": 0.99, "patch_max_diff": 0.1, "state_threshold": 0.99,
    "state_max_l2": None, "state_reference": "both", "period": 5, "phase_threshold": 0.995, "gripper_dim": -1,
    "gripper_delta": 0.5,
    "variance_threshold": 0.05, "curvature_threshold": 0.3, "motion_dims": 3, "phase_horizon": None,
    "max_age_calls": None, "max_age_s": None, "layer_split": None,
}


def test_default_changes_are_recorded():
    assert ReuseConfig().to_dict() == DEFAULTS, "a ReuseConfig default changed: add it to DEFAULT_CHANGES"
    for name in {c[1] for c in DEFAULT_CHANGES}:  # each field's last change ends at today's default
        assert [c for c in DEFAULT_CHANGES if c[1] == name][-1][3] == DEFAULTS[name]
    assert defaults_at(T_AF0067E - 1) == {**DEFAULTS, "patch_max_diff": None, "state_reference": "state"}
    assert defaults_at(T_AF0067E) == {**DEFAULTS, "state_reference": "state"}
    assert defaults_at(T_STATE_REF - 1) == {**DEFAULTS, "state_reference": "state"}
    assert defaults_at(T_STATE_REF) == {**DEFAULTS, "state_reference": "cameras"}
    assert defaults_at(T_STATE_BOTH) == DEFAULTS


def _old_defaults(monkeypatch, **old):
    """ReuseConfig() as a kvreuse of other defaults had it."""
    names = [f.name for f in fields(ReuseConfig)]
    d = {**DEFAULTS, **old}
    monkeypatch.setattr(ReuseConfig.__init__, "__defaults__", tuple(d[n] for n in names))
    assert ReuseConfig().to_dict() == d


@pytest.fixture
def ran(monkeypatch):
    """The full reuse config of each policy the sweep's workers built."""
    seen, real = [], sw.make_policy
    monkeypatch.setattr(sw, "make_policy", lambda m, t, reuse: (seen.append(reuse), real(m, t, reuse))[1])
    return seen


def _plan(tmp_path, *grid):
    return SweepPlan(db=str(tmp_path / "r.db"), env="fake", tasks=("reach",), episodes=1, workers=0, progress=False,
                     env_kw={"max_steps": 3}, grid=list(grid))


def _rows(db):
    with ResultStore(db, read_only=True) as st:
        return {r["name"]: len(st.episodes(r["id"])) for r in st.settings()}


def test_a_db_written_under_other_defaults_keeps_its_rows_meaning(tmp_path, monkeypatch, ran, capsys):
    src = PolicySource(None, "tiny-pi0")
    with monkeypatch.context() as m:  # a kvreuse from before af0067e
        _old_defaults(m, patch_max_diff=None)
        assert run_sweep(_plan(tmp_path, PARTIAL), src).ran == 2
    assert [r and r["patch_max_diff"] for r in ran] == [None, None]
    old = "threshold(raw>=0.9)/partial(p>=0.99)"
    # Today the same command means patch_max_diff=0.1: a setting of its own, not the old row continued.
    s = run_sweep(_plan(tmp_path, PARTIAL), src)
    assert (s.ran, s.skipped) == (1, 1)
    assert ran[-1]["patch_max_diff"] == 0.1
    new = "threshold(raw>=0.9)/partial(p>=0.99,d<=0.1)"
    assert _rows(tmp_path / "r.db") == {"baseline": 1, old: 1, new: 1}
    # patch_max_diff=None named: the old row, continued (nothing to run); and so on again.
    s = run_sweep(_plan(tmp_path, {**PARTIAL, "patch_max_diff": None}), src)
    assert (s.ran, s.skipped, s.settings[1].name) == (0, 2, old)
    assert (run_sweep(_plan(tmp_path, PARTIAL), src).skipped, ran[-1]["patch_max_diff"]) == (2, 0.1)
    assert _rows(tmp_path / "r.db") == {"baseline": 1, old: 1, new: 1}
    assert {r.setting for r in compute_rows(tmp_path / "r.db")} == {"baseline", old, new}
    assert "upgraded" not in capsys.readouterr().err


def _as_version_2(db, created: float) -> None:
    """The file as kvreuse wrote it before the meta table, its settings recorded at `created`."""
    c = sqlite3.connect(db)
    c.execute("DROP TABLE IF EXISTS meta")
    c.execute("UPDATE schema_version SET version = 2")
    c.execute("UPDATE settings SET created = ?", (created,))
    c.commit()
    c.close()


def _dump(db):
    c = sqlite3.connect(db)
    try:
        return [c.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in ("settings", "episodes")]
    finally:
        c.close()


def test_af0067e_a_version_2_db_from_before_the_change(tmp_path, monkeypatch, ran, capsys):
    """`mode=partial` stored before patch_max_diff's default became 0.1 means patch_max_diff=None.
    Today's code used to continue that row with pixel-diff episodes under the same label."""
    src = PolicySource(None, "tiny-pi0")
    db = tmp_path / "r.db"
    with monkeypatch.context() as m:
        _old_defaults(m, patch_max_diff=None)
        run_sweep(_plan(tmp_path, PARTIAL), src)
    _as_version_2(db, T_AF0067E - 3600)
    before, raw = _dump(db), db.read_bytes()
    assert len(compute_rows(db)) > 0 and db.read_bytes() == raw  # the report reads it, read-only
    # The same command today: whose meaning? One error line naming the field, both values and the pins.
    with pytest.raises(ValueError) as e:
        run_sweep(_plan(tmp_path, PARTIAL), src)
    msg = str(e.value)
    assert "\n" not in msg and re.search(r"holds it as 'threshold\(raw>=0\.9\)/partial\(p>=0\.99\)', recorded "
                                         r"2026-11-26 09:17 UTC.* means patch_max_diff=None; today's defaults make "
                                         r"it patch_max_diff=0\.1\. .*patch_max_diff=None continues that row, "
                                         r"patch_max_diff=0\.1 is stored apart from it", msg), msg
    assert _dump(db) == before and sqlite3.connect(db).execute("SELECT version FROM schema_version").fetchone() == (2,)
    # Named: None continues the old row (upgrading the file, its rows untouched) ...
    n = len(ran)
    s = run_sweep(_plan(tmp_path, {**PARTIAL, "patch_max_diff": None}), src)
    assert (s.ran, s.skipped) == (0, 2) and len(ran) == n
    assert "upgraded from schema version 2 to 3" in capsys.readouterr().err
    assert _dump(db) == before
    # ... 0.1 is a new setting, run with 0.1; both stay apart, and the unnamed one stays refused.
    s = run_sweep(_plan(tmp_path, {**PARTIAL, "patch_max_diff": 0.1}), src)
    assert (s.ran, s.skipped, ran[-1]["patch_max_diff"]) == (1, 1, 0.1)
    assert run_sweep(_plan(tmp_path, {**PARTIAL, "patch_max_diff": 0.1}), src).skipped == 2
    with pytest.raises(ValueError, match="patch_max_diff=None continues that row"):
        run_sweep(_plan(tmp_path, PARTIAL), src)
    assert _rows(db) == {"baseline": 1, "threshold(raw>=0.9)/partial(p>=0.99)": 1,
                         "threshold(raw>=0.9)/partial(p>=0.99,d<=0.1)": 1}


def test_a_version_2_row_from_after_the_change_is_continued(tmp_path, ran):
    src = PolicySource(None, "tiny-pi0")
    run_sweep(_plan(tmp_path, PARTIAL), src)
    _as_version_2(tmp_path / "r.db", T_AF0067E + 60)
    s = run_sweep(_plan(tmp_path, PARTIAL), src)
    assert (s.ran, s.skipped) == (0, 2)
    s = run_sweep(_plan(tmp_path, {**PARTIAL, "patch_max_diff": None}), src)  # another setting, as it was then
    assert (s.ran, s.skipped, ran[-1]["patch_max_diff"]) == (1, 1, None)


def test_a_field_the_record_lacks_takes_the_default_it_came_with(tmp_path):
    """A DB recorded before state_reference existed ran its cross-modal rows against the state
    tokens' snapshot ("state", the field's first default): read as today's "both", those rows were
    misread, and a run of "both" continued them."""
    db = tmp_path / "r.db"
    setting = {"gate": "crossmodal", "mode": "partial"}
    with ResultStore(db) as st:
        sid = st.setting_id(Setting("p", "fake", 5, setting, "old"))
    c = sqlite3.connect(db)
    rec = {k: v for k, v in DEFAULTS.items() if k != "state_reference"}
    c.execute("UPDATE meta SET value = ? WHERE key = 'reuse_defaults'", (json.dumps(rec),))
    c.commit()
    c.close()
    with ResultStore(db, read_only=True) as st:
        assert st.row_config(st.settings()[0]).state_reference == "state"
    with ResultStore(db) as st:
        now = ReuseConfig(**setting)  # today's default: both
        assert st.setting_id(Setting("p", "fake", 5, now.diff_from(st.reuse_defaults))) != sid
        assert st.row_config(st.settings()[0]).state_reference == "state"
        assert {st.row_config(r).state_reference for r in st.settings()} == {"state", "both"}


def test_a_field_the_record_lacks_takes_todays_default_and_keys_stay(tmp_path):
    db = tmp_path / "r.db"
    with ResultStore(db) as st:
        sid = st.setting_id(Setting("p", "fake", 5, {"gate": "period", "period": 2}, "period(2)"))
    c = sqlite3.connect(db)  # as a kvreuse before `motion_dims` (and with a field of a later one) wrote it
    rec = {**{k: v for k, v in DEFAULTS.items() if k != "motion_dims"}, "later_field": 1}
    c.execute("UPDATE meta SET value = ? WHERE key = 'reuse_defaults'", (json.dumps(rec),))
    c.commit()
    c.close()
    with ResultStore(db, read_only=True) as st:
        assert st.reuse_defaults == DEFAULTS
    with ResultStore(db) as st:
        assert st.setting_id(Setting("p", "fake", 5, {"gate": "period", "period": 2})) == sid
        assert st.setting_id(replace(Setting("p", "fake", 5), replan=4)) != sid
    c = sqlite3.connect(db)
    assert json.loads(c.execute("SELECT value FROM meta WHERE key = 'reuse_defaults'").fetchone()[0]) == {
        **DEFAULTS, "later_field": 1}  # recorded from now on
    c.close()
