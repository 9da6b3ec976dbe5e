"""Results store: one SQLite file (WAL mode) the user keeps.

- Each finished episode is one row, written in its own transaction, so a sweep killed at any
  moment (even SIGKILL) leaves only whole episodes behind.
- (setting, task, init_id, seed) is UNIQUE: a rerun skips what is done and can never duplicate.
- A `schema_version` table guards the layout: a file of another version (or not ours) is
  refused with a ValueError, never altered; a version-2 file is read as it is and gains the `meta`
  table (version 3) when a sweep first writes to it.
- A setting's `reuse` JSON holds only the fields that differ from the ReuseConfig defaults the
  `meta` table records (those of the kvreuse that created the file), so a row keeps its meaning
  when a later kvreuse changes a default.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..outputs import os_reason
from ..reuse.config import ReuseConfig, defaults_at
from .rollout import STATUSES, EpisodeResult

# 2: settings.protocol (step limit, env options) joined the identity; a version-1 file lacks it.
# 3: the `meta` table records the reuse defaults. A version-2 file is read as it is, its rows by the
#    history of default changes (reuse/config.py), and gets the table when opened to be written.
SCHEMA_VERSION = 3
READS = (2, 3)

# reuse_defaults: JSON of the ReuseConfig defaults the settings' reuse JSON is relative to;
# legacy_settings_below: settings with a lower id predate that record (a version-2 file's rows).
_META = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_SCHEMA = f"""
CREATE TABLE schema_version (version INTEGER NOT NULL);
{_META};
CREATE TABLE settings (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,      -- hash of (policy, env, replan, protocol, reuse)
    name TEXT NOT NULL,            -- human label: "baseline" or "gate=threshold threshold=0.985 ..."
    policy TEXT NOT NULL,          -- checkpoint identity (path + weights hash, or random preset)
    env TEXT NOT NULL,             -- env name, e.g. "metaworld" or "libero:libero_spatial"
    replan INTEGER NOT NULL,
    protocol TEXT NOT NULL,        -- JSON of other episode settings (step limit, env options)
    reuse TEXT NOT NULL,           -- JSON of the reuse fields that differ from the defaults, "null" = baseline
    is_baseline INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE episodes (
    id INTEGER PRIMARY KEY,
    setting_id INTEGER NOT NULL REFERENCES settings(id),
    task TEXT NOT NULL,
    init_id INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN {STATUSES!r}),
    steps INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    reuses INTEGER NOT NULL,
    mixed INTEGER NOT NULL,
    reuse_rate REAL NOT NULL,
    lat_mean REAL, lat_p50 REAL, lat_p95 REAL,   -- total ms per policy call, this episode
    timings TEXT NOT NULL,         -- JSON: part -> per-call ms
    decisions TEXT NOT NULL,       -- JSON: per-call "refresh" | "reuse:<mode>"
    reasons TEXT NOT NULL,         -- JSON: per-call gate reason
    error TEXT NOT NULL,
    wall_s REAL NOT NULL,
    video TEXT NOT NULL,
    finished REAL NOT NULL,
    UNIQUE (setting_id, task, init_id, seed)
);
"""


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: a policy + env + replan interval + reuse parameters (None = baseline)."""

    policy: str
    env: str
    replan: int
    reuse: dict | None = None  # only the fields that differ from the DB's defaults (ResultStore.reuse_defaults)
    label: str = ""  # display name (not part of the identity)
    protocol: str = "{}"  # JSON: step limit and env options, so different protocols never mix

    @property
    def reuse_json(self) -> str:
        return json.dumps(self.reuse, sort_keys=True)

    @property
    def is_baseline(self) -> bool:
        return self.reuse is None

    @property
    def key(self) -> str:
        ident = json.dumps([self.policy, self.env, self.replan, self.protocol, self.reuse], sort_keys=True)
        return hashlib.sha1(ident.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        if self.reuse is None:
            return "baseline"
        return self.label or " ".join(f"{k}={v}" for k, v in sorted(self.reuse.items())) or "reuse (defaults)"

    def baseline(self) -> "Setting":
        return Setting(self.policy, self.env, self.replan, None, protocol=self.protocol)


def setting_group(row) -> tuple:
    """What a settings row pairs on: its policy, env, replan and protocol (step limit, env options).
    A setting compares only with the baseline of its group (report, sweep, scripts/pool_paired.py)."""
    return (row["policy"], row["env"], row["replan"], row["protocol"])


class ResultStore:
    def __init__(self, path: str | Path, read_only: bool = False):
        """read_only: never create or alter anything (reports); a file that is not a kvreuse
        results DB is refused."""
        self.path = Path(path)
        self.read_only = read_only
        if self.path.is_dir():
            raise ValueError(f"results DB {self.path}: is a directory; give a file path for --db")
        if self.path.exists() and not self.path.is_file():  # /dev/null, a pipe: SQLite failed mid-schema
            raise ValueError(f"results DB {self.path}: not a regular file; give a file path for --db")
        if not read_only and self.path.is_file() and not os.access(self.path, os.W_OK):
            raise ValueError(f"results DB {self.path}: read-only file; give a writable --db (`kvreuse report` "
                             "reads it as it is)")
        if not read_only and self.path.parent.is_dir() and not os.access(self.path.parent, os.W_OK):
            # SQLite's own error ("attempt to write a readonly database") would blame a writable file.
            raise ValueError(f"results DB {self.path}: its folder {self.path.parent} is not writable (SQLite keeps "
                             "the DB's -wal and -shm files beside it); give a --db in a writable folder")
        try:
            if read_only:
                tables = self._open_read_only()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
                # connect() is lazy: a file that cannot be opened only fails on first use
                tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except OSError as e:  # its folder cannot be made
            raise ValueError(f"results DB {self.path}: cannot create its folder {self.path.parent} ({os_reason(e)}); "
                             "give a writable file path for --db") from None
        except sqlite3.OperationalError as e:
            raise ValueError(f"results DB {self.path}: cannot open it ({e}); give a readable, writable "
                             "file path for --db") from None
        except sqlite3.DatabaseError as e:
            raise ValueError(f"results DB {self.path}: not an SQLite file ({e}); give another --db path") from None
        self.conn.row_factory = sqlite3.Row
        try:
            self._init_schema(tables)
        except BaseException:
            self.conn.close()
            raise

    def _open_read_only(self) -> set[str]:
        """A WAL database needs its -shm file even to be read. In a folder we may not write, a DB
        whose write-ahead log is empty or gone (closed cleanly) is opened as immutable; one with
        episodes still in its log would read without them, so it is refused."""
        uri = self.path.resolve().as_uri()
        wal = self.path.with_name(self.path.name + "-wal")
        for query in ("?mode=ro", "?mode=ro&immutable=1"):
            conn = None
            try:  # the open may fail at once or on first use
                conn = self.conn = sqlite3.connect(uri + query, uri=True, timeout=60, isolation_level=None)
                return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            except sqlite3.OperationalError:
                if conn is not None:
                    conn.close()
                if query.endswith("immutable=1") or os.access(self.path.parent, os.W_OK):
                    raise
                if wal.is_file() and wal.stat().st_size > 0:
                    raise ValueError(f"results DB {self.path}: its write-ahead log {wal.name} still holds results "
                                     "and this folder is not writable; copy the DB and its -wal file somewhere "
                                     "writable (or report where the run wrote it)") from None
        raise AssertionError("unreachable")

    # ---- schema -------------------------------------------------------------------------------
    def _init_schema(self, tables: set[str]) -> None:
        c = self.conn
        self.upgraded_from: int | None = None  # a version-2 file given its meta table by this store
        if not tables and not self.read_only:  # read-only: an empty file is refused below, not initialised
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("BEGIN IMMEDIATE")
            try:
                if not {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}:
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            c.execute(stmt)
                    c.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                    _record_defaults(c)
                c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise
            tables = {"schema_version"}
        if "schema_version" not in tables:
            raise ValueError(
                f"results DB {self.path}: not a kvreuse results file (no schema_version table); "
                "give another --db path"
            )
        version = self._version()
        if version not in READS:
            raise ValueError(
                f"results DB {self.path}: written with schema version {version}, this kvreuse reads versions "
                f"{' and '.join(map(str, READS))} and writes version {SCHEMA_VERSION}; it is left untouched — "
                "give another --db path"
            )
        if not self.read_only:
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed row survives a process kill
        self._file_version = version
        self._load_defaults(version)

    def _version(self) -> int | None:
        row = self.conn.execute("SELECT version FROM schema_version").fetchone()
        return row[0] if row else None

    def _before_write(self) -> None:
        """Bring the record up to date, once, before the first settings row this store writes (a
        command refused before that leaves the file as it was). A version-2 file gets the meta table:
        its rows stay as they are (read by the history of default changes), rows added from now on are
        relative to today's defaults, which the table records (and which this store already uses). A
        field added to ReuseConfig since the record was written joins it at the default it was added
        with (the behaviour before it existed), so its rows keep that meaning whatever the default
        is today."""
        current = ReuseConfig().to_dict()
        added_with = defaults_at(0.0)  # each field's first default
        if self._file_version == SCHEMA_VERSION and set(current) <= set(self._recorded):
            return
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            version = self._version()
            if version == 2:  # else another process upgraded it first
                c.execute(_META)
                _record_defaults(c)
                c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
                self.upgraded_from = version
            else:  # fields this kvreuse does not know (a later one wrote the file) stay in the record
                recorded = json.loads(c.execute("SELECT value FROM meta WHERE key = 'reuse_defaults'").fetchone()[0])
                c.execute("UPDATE meta SET value = ? WHERE key = 'reuse_defaults'",
                          (json.dumps({**added_with, **recorded}, sort_keys=True),))
            c.execute("COMMIT")
        except BaseException:
            _rollback(c)
            raise
        self._file_version = SCHEMA_VERSION
        self._load_defaults(SCHEMA_VERSION)

    def _load_defaults(self, version: int) -> None:
        if version == 2:  # every row is read by the history of default changes
            recorded, self._legacy_below = {}, float("inf")
        else:
            try:
                meta = {r[0]: r[1] for r in self.conn.execute("SELECT key, value FROM meta")}
                recorded, self._legacy_below = json.loads(meta["reuse_defaults"]), int(meta["legacy_settings_below"])
                if not isinstance(recorded, dict):
                    raise TypeError(recorded)
            except (sqlite3.DatabaseError, KeyError, ValueError, TypeError) as e:
                raise ValueError(f"results DB {self.path}: schema version {version} but its meta table does not "
                                 f"record the reuse defaults ({type(e).__name__}: {e}); give another --db path"
                                 ) from None
        self._recorded = recorded
        # A version-2 file's new rows are relative to today's defaults (recorded when it is upgraded).
        # A field a record lacks predates it: the default it was added with, the behaviour before it
        # existed (state_reference came as "state", since changed twice), not today's.
        base = ReuseConfig().to_dict() if version == 2 else defaults_at(0.0)
        self.reuse_defaults: dict = {**base, **{k: v for k, v in recorded.items() if k in base}}

    def row_defaults(self, row: sqlite3.Row) -> dict:
        """The defaults a settings row's reuse JSON is relative to: the DB's record, or for a row
        written before the DB had one, the defaults of kvreuse at the time the row was created."""
        return self.reuse_defaults if row["id"] >= self._legacy_below else defaults_at(row["created"])

    def row_config(self, row: sqlite3.Row) -> ReuseConfig | None:
        """The reuse setting a settings row stands for (None: the baseline). ValueError: a field or
        value this kvreuse does not know (a later one wrote the row)."""
        reuse = json.loads(row["reuse"])
        if reuse is None:
            return None
        return ReuseConfig.from_dict({**self.row_defaults(row), **reuse})

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- settings -----------------------------------------------------------------------------
    def setting_id(self, s: Setting) -> int:
        """Id of a setting, inserted if new."""
        self._before_write()
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute(
                "INSERT OR IGNORE INTO settings (key, name, policy, env, replan, protocol, reuse, is_baseline, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (s.key, s.name, s.policy, s.env, s.replan, s.protocol, s.reuse_json, int(s.is_baseline), time.time()),
            )
            c.execute("COMMIT")
        except BaseException:
            _rollback(c)
            raise
        return c.execute("SELECT id FROM settings WHERE key = ?", (s.key,)).fetchone()[0]

    def settings(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM settings ORDER BY is_baseline DESC, id").fetchall()

    # ---- episodes -----------------------------------------------------------------------------
    def done(self, setting_id: int, errors: bool = True) -> set[tuple[str, int, int]]:
        """The episodes stored for a setting; errors=False leaves error episodes out (to run again)."""
        where = "" if errors else " AND status != 'error'"
        rows = self.conn.execute(f"SELECT task, init_id, seed FROM episodes WHERE setting_id = ?{where}", (setting_id,))
        return {(r[0], r[1], r[2]) for r in rows}

    def add(self, setting_id: int, r: EpisodeResult) -> bool:
        """Commit one finished episode atomically; False if it was already there."""
        lat = r.latency("total")
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            # An episode stored as an error (a worker killed, a simulator crash) gives way to a rerun's result.
            c.execute("DELETE FROM episodes WHERE setting_id = ? AND task = ? AND init_id = ? AND seed = ? "
                      "AND status = 'error'", (setting_id, r.task, r.init_id, r.seed))
            cur = c.execute(
                "INSERT OR IGNORE INTO episodes (setting_id, task, init_id, seed, status, steps, calls, reuses, "
                "mixed, reuse_rate, lat_mean, lat_p50, lat_p95, timings, decisions, reasons, error, wall_s, video, "
                "finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    setting_id, r.task, r.init_id, r.seed, r.status, r.steps, r.calls, r.reuses, r.mixed,
                    r.reuse_rate, _num(lat["mean"]), _num(lat["p50"]), _num(lat["p95"]),
                    json.dumps(r.timings), json.dumps(r.decisions), json.dumps(r.reasons), r.error, r.wall_s,
                    r.video, time.time(),
                ),
            )
            c.execute("COMMIT")
        except BaseException:
            _rollback(c)
            raise
        return cur.rowcount == 1

    def episodes(self, setting_id: int | None = None) -> list[sqlite3.Row]:
        if setting_id is None:
            return self.conn.execute("SELECT * FROM episodes ORDER BY id").fetchall()
        return self.conn.execute("SELECT * FROM episodes WHERE setting_id = ? ORDER BY id", (setting_id,)).fetchall()

    def outcomes(self, setting_id: int, task: str | None = None) -> dict[tuple[str, int, int], bool]:
        """(task, init_id, seed) -> succeeded, over a setting's finished episodes (errors left out)."""
        return {(e["task"], e["init_id"], e["seed"]): e["status"] == "success" for e in self.episodes(setting_id)
                if e["status"] != "error" and (task is None or e["task"] == task)}


def _record_defaults(c: sqlite3.Connection) -> None:
    """Today's reuse defaults, which the settings rows added from now on are relative to."""
    c.execute("INSERT INTO meta VALUES ('reuse_defaults', ?)", (json.dumps(ReuseConfig().to_dict(), sort_keys=True),))
    c.execute("INSERT INTO meta SELECT 'legacy_settings_below', COALESCE(MAX(id), 0) + 1 FROM settings")


def _rollback(c: sqlite3.Connection) -> None:
    """Undo the open transaction, if any: Ctrl-C can land just after COMMIT, where a ROLLBACK would
    raise "no transaction is active" over the interrupt (the episode is stored all the same)."""
    if c.in_transaction:
        c.execute("ROLLBACK")


def _num(x: float) -> float | None:
    return None if x != x else x  # NaN -> NULL


def open_existing(path: str | Path) -> ResultStore:
    """Open a results DB read-only; a missing file or one that is not ours is an error, never
    created or altered."""
    if Path(path).is_dir():
        raise ValueError(f"results DB {path}: is a folder; give the .db file")
    if not Path(path).is_file():
        raise ValueError(f"results DB {path}: no such file (run `kvreuse eval` or `kvreuse sweep` first)")
    return ResultStore(path, read_only=True)
