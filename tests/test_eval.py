"""Closed-loop harness: rollout loop, paired sweeps, results store, statistics, reports, CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kvreuse.envs.fake import FakeEnv
from kvreuse.eval import stats
from kvreuse.eval.report import ALL, compute_rows, markdown, pareto, write_report
from kvreuse.eval.rollout import EpisodeResult, run_episode
from kvreuse.eval.store import SCHEMA_VERSION, ResultStore, Setting
from kvreuse.eval.sweep import (PolicySource, SweepPlan, episode_list, episode_seed, parse_grid, policy_identity,
                                run_sweep)
from kvreuse.policy import StepRecord

# ---- stubs -----------------------------------------------------------------------------------


class _StubModel:
    device = torch.device("cpu")

    def __init__(self, chunk=8, dim=4):
        self.chunk, self.dim = chunk, dim

    def make_noise(self, batch, generator=None):
        return torch.randn(batch, self.chunk, self.dim, generator=generator)


class StubPolicy:
    """Moves toward +x; records the noise it was given; `reuse_every` marks calls as reuses."""

    def __init__(self, reuse_every=0, chunk=8):
        self.model = _StubModel(chunk)
        self.noises, self.resets, self.reuse_every, self.n = [], 0, reuse_every, 0

    def reset(self):
        self.resets += 1
        self.n = 0

    def infer(self, raw, noise=None):
        self.noises.append(noise.clone())
        self.n += 1
        reuse = bool(self.reuse_every) and self.n % self.reuse_every == 0
        rec = StepRecord(decision="reuse" if reuse else "refresh", mode="full" if reuse else "none",
                         reason="test", timings={"total": 2.0 if reuse else 10.0, "denoise": 1.0})
        a = np.zeros((self.model.chunk, 4))
        a[:, 0] = 1.0
        return a, rec


class CountingEnv(FakeEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.actions = []

    def step(self, action):
        self.actions.append(np.asarray(action))
        return super().step(action)


# ---- statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [  # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_known_values(k, n, lo, hi):
    a, b = stats.wilson(k, n)
    assert a == pytest.approx(lo, abs=6e-5) and b == pytest.approx(hi, abs=6e-5)


def test_wilson_bad_input():
    with pytest.raises(ValueError, match="successes"):
        stats.wilson(5, 3)
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_exact_mcnemar_known_values():
    # b=1, c=9 discordant pairs: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    base = [True] * 1 + [False] * 9 + [True] * 20 + [False] * 5
    sett = [False] * 1 + [True] * 9 + [True] * 20 + [False] * 5
    r = stats.mcnemar(base, sett)
    assert (r.only_base, r.only_setting, r.both, r.neither, r.n) == (1, 9, 20, 5, 35)
    assert r.p_value == pytest.approx(22 / 1024)
    assert r.diff == pytest.approx(8 / 35)
    assert stats.binom_two_sided(0, 5) == pytest.approx(2 / 32)
    assert stats.binom_two_sided(3, 6) == 1.0  # balanced discordance
    assert stats.mcnemar([True, False], [True, False]).p_value == 1.0  # no discordant pairs
    with pytest.raises(ValueError, match="length"):
        stats.mcnemar([True], [True, False])


def test_paired_interval_and_latency():
    # No pair differs: the interval stays open, as wide as the Wilson interval of 50 of 50 (a
    # percentile bootstrap gave [0, 0] at any n); one-sided wins at n = 3 do not make it certain.
    lo, hi = stats.paired_interval(stats.mcnemar([True] * 50, [True] * 50))
    assert lo == pytest.approx(-(1 - stats.wilson(50, 50)[0])) and hi == pytest.approx(-lo) and hi > 0.07
    lo, hi = stats.paired_interval(stats.mcnemar([False] * 3, [True] * 3))
    assert 0.2 < lo < 0.21 and hi == 1.0
    lo, hi = stats.paired_interval(stats.mcnemar([True, False] * 50, [True, False] * 25 + [False, True] * 25))
    assert lo < 0 < hi
    assert all(np.isnan(stats.paired_interval(stats.mcnemar([], []))))
    # 95% coverage of the true difference, also where the discordant pairs are few and one-sided
    rng = np.random.default_rng(0)
    # (both, base only, setting only, neither)
    for probs in ((0.8, 0.05, 0.02, 0.13), (0.9, 0.01, 0.0, 0.09), (0.5, 0.1, 0.1, 0.3)):
        tables = rng.multinomial(100, probs, size=2000)
        truth = probs[2] - probs[1]
        cover = np.mean([lo <= truth <= hi for lo, hi in
                         (stats.paired_interval(stats.Paired(100, *t, 1.0)) for t in tables)])
        assert cover >= 0.93, (probs, cover)
    lat = stats.latency([10, 20, 30, 40])
    assert (lat.mean, lat.p50, lat.hz) == (25, 25, 40)
    assert lat.p95 == pytest.approx(38.5)
    assert stats.speedup(100.0, 50.0) == 2.0
    assert np.isnan(stats.speedup(100.0, 0.0))


# ---- rollout ---------------------------------------------------------------------------------


def test_rollout_executes_replan_actions_per_call():
    env, pol = CountingEnv(max_steps=20, radius=0.0), StubPolicy(chunk=8)
    r = run_episode(pol, env, "reach", 0, seed=3, replan=3)
    assert r.status == "failure" and r.steps == 20 and len(env.actions) == 20
    assert r.calls == 7  # ceil(20 / 3)
    assert pol.resets == 1
    r2 = run_episode(pol, env, "reach", 0, seed=3, replan=100)  # replan > chunk: whole chunk
    assert r2.calls == 3  # ceil(20 / 8)
    with pytest.raises(ValueError, match="replan"):
        run_episode(pol, env, "reach", 0, seed=3, replan=0)


def test_rollout_stops_on_success_and_records_reuse():
    env = FakeEnv(max_steps=50, radius=10.0)  # first step succeeds
    r = run_episode(StubPolicy(), env, "reach", 0, seed=1, replan=5)
    assert r.status == "success" and r.success is True and r.steps == 1
    r = run_episode(StubPolicy(reuse_every=2), FakeEnv(max_steps=40, radius=0.0), "reach", 0, seed=1, replan=5)
    assert r.calls == 8 and r.reuses == 4 and r.reuse_rate == 0.5
    assert r.decisions[:2] == ["refresh", "reuse:full"]
    assert r.latency()["mean"] == pytest.approx(6.0)
    assert r.timings["denoise"] == [1.0] * 8


def test_warmup_calls_are_counted_but_left_out_of_latency(tmp_path):
    """A call that captured graphs (or a model's first) is a call, but its seconds of capture and
    compilation are not the setting's latency: they go under timings["warmup"], also in the DB."""
    pol = StubPolicy()
    infer = pol.infer

    def first_is_warmup(raw, noise=None):
        a, rec = infer(raw, noise)
        rec.warmup = pol.n == 1
        rec.timings["total"] = 5000.0 if rec.warmup else 10.0
        return a, rec

    pol.infer = first_is_warmup
    r = run_episode(pol, FakeEnv(max_steps=20, radius=0.0), "reach", 0, seed=1, replan=5)
    assert r.calls == 4 and r.timings["warmup"] == [5000.0] and r.timings["total"] == [10.0] * 3
    assert r.timings["denoise"] == [1.0] * 3 and r.latency()["mean"] == pytest.approx(10.0)
    with ResultStore(tmp_path / "w.db") as st:
        sid = st.setting_id(Setting("p", "fake", 5, None, "baseline", "{}"))
        st.add(sid, r)
    assert compute_rows(tmp_path / "w.db")[0].lat.mean == pytest.approx(10.0)


def test_policy_marks_warmup_calls():
    """A model's first call in the process and any call that captured a CUDA graph (Graphs.captured
    moved; no graphs on a CPU, so simulated inside the reuse layer's call) are warm-ups; the rest
    are not."""
    from kvreuse.eval.sweep import PolicySource, load_model, make_policy
    from kvreuse.model.graphs import Graphs

    model, tf, _ = load_model(PolicySource(None, "tiny-pi0"), "metaworld")
    pol, raw = make_policy(model, tf, None), FakeEnv().reset("reach", 0, 0)
    assert [pol.infer(raw)[1].warmup for _ in range(2)] == [True, False]
    other = make_policy(model, tf, {"gate": "always"})  # another setting on the same model
    assert other.infer(raw)[1].warmup is False
    run = other.runner._execute

    def capturing(*a, **kw):
        Graphs.captured += 1
        return run(*a, **kw)

    other.runner._execute = capturing
    rec = other.infer(raw)[1]
    assert rec.warmup is True
    # The reuse layer's own stats see the same marks: warm-ups count as calls, not in latency.
    s = other.stats.summary()
    assert (s["calls"], s["warmups"], len(other.stats.totals)) == (2, 1, 1)
    assert s["mean_ms"] == pytest.approx(other.stats.totals[0]) and s["mean_ms"] != pytest.approx(rec.timings["total"])


def test_rollout_noise_is_paired_by_seed():
    """Two policies (e.g. baseline and reuse) see the same noise sequence for the same seed."""
    a, b, c = StubPolicy(), StubPolicy(reuse_every=2), StubPolicy()
    for p, seed in ((a, 11), (b, 11), (c, 12)):
        run_episode(p, FakeEnv(max_steps=15, radius=0.0), "reach", 4, seed=seed, replan=5)
    assert len(a.noises) == len(b.noises) == 3
    assert all(torch.equal(x, y) for x, y in zip(a.noises, b.noises))
    assert not torch.equal(a.noises[0], c.noises[0])
    assert not torch.equal(a.noises[0], a.noises[1])


def test_eval_where_every_episode_is_an_env_error_exits_nonzero(tmp_path, capsys, monkeypatch):
    """A broken renderer (MUJOCO_GL) turned every episode into an error; eval printed a table of
    n = 0 and exited 0, so the README's quick start looked like it had passed."""
    from kvreuse.cli import main

    args = ["eval", "--env", "fake", "--episodes", "2", "--workers", "0", "--no-progress",
            "--db", str(tmp_path / "e.db")]
    with pytest.raises(SystemExit) as e:
        main([*args, "--tasks", "crash"])
    assert e.value.code == 1 and "every one of the 2 episodes run ended in an env error" in capsys.readouterr().err
    main([*args, "--tasks", "reach", "crash"])  # some finished: the table, and exit 0
    assert "every one of" not in capsys.readouterr().err
    main([*args, "--tasks", "reach", "crash", "--retry-errors"])  # only crashes ran, but the setting has n > 0
    assert "every one of" not in capsys.readouterr().err
    # another setting whose every episode errs (and, run again, a note on its stored errors)
    reuse = [*args, "--tasks", "crash", "--reuse", "gate=always"]
    with pytest.raises(SystemExit) as e:
        main(reuse)
    assert e.value.code == 1 and "every one of the 2 episodes run ended in an env error" in capsys.readouterr().err
    main(reuse)  # run again: the stored errors are skipped (0 run), and a note says how to run them
    assert "always/full: its 2 episode(s) here are stored env errors, skipped when run again; --retry-errors" in \
        capsys.readouterr().err

    # with the baseline in the run (--with-baseline, every sweep): its finished episodes stored before (and
    # skipped here) made a run whose every episode erred exit 0
    import kvreuse.envs.fake as fake

    def broken(self, *a, **k):  # as a renderer that fails (MUJOCO_GL) once the baseline is stored
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(fake.FakeEnv, "reset", broken)
    for cmd in ([*args, "--tasks", "reach", "--reuse", "gate=period period=3", "--with-baseline"],
                ["sweep", *args[1:], "--tasks", "reach", "--grid", "gate=period period=4"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 1 and "every one of the 2 episodes run ended in an env error" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # bench-eval: a rate of crashes is no throughput
        main(["bench-eval", "--env", "fake", "--tasks", "crash", "--total", "2", "--workers", "0"])
    assert e.value.code == 1 and "projected" not in capsys.readouterr().out


def test_env_crash_is_an_error_not_a_failure():
    r = run_episode(StubPolicy(), FakeEnv(), "crash", 0, seed=0, replan=2)
    assert r.status == "error" and r.success is None
    assert "simulated physics blow-up" in r.error and r.steps == 3


def test_policy_error_propagates():
    class Broken(StubPolicy):
        def infer(self, raw, noise=None):
            raise ValueError("policy bug")

    with pytest.raises(ValueError, match="policy bug"):
        run_episode(Broken(), FakeEnv(), "reach", 0, seed=0)


def test_sweep_records_videos_of_the_first_n_episodes_per_task(tmp_path, monkeypatch):
    import kvreuse.eval.sweep as sw

    monkeypatch.setattr(sw, "make_policy", lambda model, transform, reuse: StubPolicy())
    plan = SweepPlan(db=str(tmp_path / "v.db"), env="fake", tasks=("reach", "reach-far"), episodes=3, workers=0,
                     videos=1, video_dir=str(tmp_path / "videos"), progress=False, env_kw={"max_steps": 3})
    run_sweep(plan, PolicySource(None, "tiny-pi05"))
    with ResultStore(plan.db) as st:
        recorded = sorted((e["task"], e["init_id"]) for e in st.episodes() if e["video"])
        assert all(Path(e["video"]).is_file() for e in st.episodes() if e["video"])
    assert recorded == [("reach", 0), ("reach-far", 0)]


def test_rollout_with_tiny_model_and_video(tmp_path):
    from kvreuse.eval.sweep import load_model, make_policy

    model, tf, _ = load_model(PolicySource(None, "tiny-pi05"), "metaworld")
    pol = make_policy(model, tf, None)
    envs = [CountingEnv(max_steps=6, radius=0.0) for _ in range(3)]
    r1 = run_episode(pol, envs[0], "reach", 2, seed=5, replan=3, video_path=tmp_path / "ep.mp4")
    r2 = run_episode(pol, envs[1], "reach", 2, seed=5, replan=3)
    run_episode(pol, envs[2], "reach", 2, seed=6, replan=3)
    assert r1.calls == 2 and set(r1.timings) >= {"total"}
    assert Path(r1.video).is_file() and Path(r1.video).stat().st_size > 0
    # same seed -> same noise -> same actions, step for step (radius 0: steps and status always match,
    # so only the actions can tell); another seed moves differently
    assert r1.steps == r2.steps == 6 and r1.status == r2.status
    assert np.array_equal(np.stack(envs[0].actions), np.stack(envs[1].actions))
    assert not np.array_equal(np.stack(envs[0].actions), np.stack(envs[2].actions))


# ---- store -----------------------------------------------------------------------------------


def _result(task="reach", init_id=0, seed=0, status="success", calls=4, reuses=1, ms=10.0):
    return EpisodeResult(task, init_id, seed, status, steps=10, calls=calls, reuses=reuses,
                         decisions=["refresh"] * calls, reasons=["x"] * calls, timings={"total": [ms] * calls})


def test_sweep_fast_runtime_runs_apart_from_the_eager_model(tmp_path, monkeypatch):
    """--fast runs FastPi0 (plain calls on a CPU): the same episodes give the same outcomes, but
    its results form their own setting (its actions round differently), never skipped as done."""
    from kvreuse.eval.sweep import load_model, policy_identity

    model, _, _ = load_model(PolicySource(None, "tiny-pi0", fast=True), "metaworld")
    assert type(model).__name__ == "FastPi0"
    assert policy_identity(PolicySource(None, "tiny-pi0", fast=True)) == "random:tiny-pi0:seed0+fast"
    both = PolicySource(None, "tiny-pi0", fast=True, keep_absent_cameras=True, dtype="bfloat16")
    assert policy_identity(both) == "random:tiny-pi0:seed0+bfloat16+fast+masked-cameras"
    # A setting continued on a GPU averaged its calls with the CPU's into one row (latency, speedup).
    import kvreuse.devices

    monkeypatch.setattr(kvreuse.devices, "check_device", lambda d: d)  # no GPU here
    gpu = {policy_identity(PolicySource(None, "tiny-pi0", device=d, fast=True)) for d in ("cuda", "cuda:1")}
    assert gpu == {"random:tiny-pi0:seed0+cuda+fast"}
    with pytest.raises(ValueError, match="dtype: expected one of float32, bfloat16, got 'half'"):
        PolicySource(dtype="half")
    plan = SweepPlan(db=str(tmp_path / "f.db"), env="fake", tasks=("reach",), episodes=2, workers=0,
                     progress=False, env_kw={"max_steps": 6, "radius": 0.0})
    eager = run_sweep(plan, PolicySource(None, "tiny-pi0"))
    fast = run_sweep(plan, PolicySource(None, "tiny-pi0", fast=True))
    assert eager.ran == fast.ran == 2 and fast.skipped == 0
    with ResultStore(plan.db) as st:
        rows = {r["policy"]: [(e["init_id"], e["status"], e["steps"], e["calls"]) for e in st.episodes(r["id"])]
                for r in st.settings()}
    eager_id = next(p for p in rows if "+fast" not in p)  # the fake env drives the Meta-World robot: testbed-pi0
    fast_id = eager_id.replace("+stats@", "+fast+stats@")  # runtime tags, then the norm stats'
    assert set(rows) == {eager_id, fast_id} and fast_id != eager_id
    assert rows[eager_id] == rows[fast_id]


def test_eval_takes_the_tokenizer_a_checkpoint_needs(tmp_path, sp_model, capsys):
    """A checkpoint whose prompts go through SentencePiece (every full-size one) needs --tokenizer:
    without it the sweep stops before any work with one error naming the flag; with it, it runs,
    and the tokenizer file is part of the policy's identity."""
    from kvreuse.checkpoint import save_checkpoint
    from kvreuse.eval.sweep import load_model, policy_identity
    from kvreuse.model import Pi0Model, preset

    torch.manual_seed(0)
    cfg = preset("tiny-pi0", tokenizer="sentencepiece").replace(state_dim=4, action_dim=4)
    ck = save_checkpoint(tmp_path / "ck", Pi0Model(cfg).eval(), None, "metaworld")
    plan = SweepPlan(db=str(tmp_path / "t.db"), env="fake", tasks=("reach",), episodes=1, workers=0,
                     progress=False, env_kw={"max_steps": 3})
    with pytest.raises(ValueError, match="needs the PaliGemma SentencePiece tokenizer: pass --tokenizer"):
        run_sweep(plan, PolicySource(str(ck)))
    assert not (tmp_path / "t.db").exists()
    with pytest.raises(ValueError, match="tokenizer: no SentencePiece model at"):
        PolicySource(str(ck), tokenizer=str(tmp_path / "nope.model"))
    # A folder: serve's message (a directory; the file it likely meant), not 'no such file'.
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    want = (f"tokenizer {tmp_path / 'tok'}: a directory, expected the PaliGemma tokenizer.model file; "
            f"did you mean {tmp_path / 'tok' / 'tokenizer.model'}?")
    with pytest.raises(ValueError, match=re.escape(want)):
        PolicySource(str(ck), tokenizer=str(tmp_path / "tok"))
    src = PolicySource(str(ck), tokenizer=str(sp_model))
    _, tf, _ = load_model(src, "metaworld")
    assert type(tf.tok).__name__ == "SentencePieceTokenizer"
    assert "+tok@" in policy_identity(src)
    assert run_sweep(plan, src).ran == 1
    from kvreuse.cli import main  # bench-eval takes it too (it had no --tokenizer, yet its error named it)

    main(["bench-eval", "--checkpoint", str(ck), "--tokenizer", str(sp_model), "--env", "fake", "--tasks", "reach",
          "--total", "1", "--workers", "0", "--max-steps", "3"])
    assert "1 episodes (1 per task x 1 tasks)" in capsys.readouterr().out


def test_eval_refuses_short_norm_stats_before_the_db(tmp_path):
    """Stats of 3 state dims for the 4-dim Meta-World robot: one error naming the checkpoint, from
    the sweep's up-front checks (the DB not created), not from inside a worker."""
    from kvreuse.checkpoint import save_checkpoint
    from kvreuse.model import Pi0Model, preset
    from kvreuse.transforms.normalize import NormStats, Stats

    cfg = preset("tiny-pi0").replace(state_dim=4, action_dim=4)
    stats = NormStats(Stats.of(np.random.rand(10, 3)), Stats.of(np.random.rand(10, 4)))
    ck = save_checkpoint(tmp_path / "ck", Pi0Model(cfg).eval(), stats, "metaworld")
    plan = SweepPlan(db=str(tmp_path / "t.db"), env="fake", tasks=("reach",), episodes=1, workers=1,
                     progress=False)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {ck}: norm stats: the state stats have 3 dims, "
                                                   "robot 'metaworld' has 4")):
        run_sweep(plan, PolicySource(str(ck)))
    assert not (tmp_path / "t.db").exists()


def test_max_steps_equal_to_the_envs_limit_pairs_with_none_given(tmp_path):
    """--max-steps equal to the env's own limit runs the same episodes as no --max-steps: one setting
    (one group, paired), not a second one. A DB holding such a run under the explicit limit only
    (recorded before) is continued under it, not run again."""
    plan = SweepPlan(db=str(tmp_path / "m.db"), env="fake", tasks=("reach",), episodes=2, workers=0,
                     progress=False, env_kw={"max_steps": 3})
    first = run_sweep(plan, PolicySource(None, "tiny-pi0"))
    again = run_sweep(replace(plan, max_steps=3), PolicySource(None, "tiny-pi0"))
    assert (again.ran, again.skipped) == (0, 2)
    assert [s.key for s in again.settings] == [s.key for s in first.settings]
    shorter = run_sweep(replace(plan, max_steps=2), PolicySource(None, "tiny-pi0"))
    assert shorter.ran == 2 and shorter.settings[0].key != first.settings[0].key

    old = replace(plan, db=str(tmp_path / "old.db"), episodes=1)
    s = first.settings[0]
    with ResultStore(old.db) as st:  # as an earlier version stored `--max-steps 3`
        sid = st.setting_id(replace(s, protocol=json.dumps({"max_steps": 3, "env": {"max_steps": 3}}, sort_keys=True)))
        st.add(sid, EpisodeResult("reach", *first.episodes[0][1:], "failure", steps=3))
    cont = run_sweep(replace(old, max_steps=3), PolicySource(None, "tiny-pi0"))
    assert (cont.ran, cont.skipped) == (0, 1)
    with ResultStore(old.db) as st:
        assert len(st.settings()) == 1


def test_store_atomic_unique_and_wal(tmp_path):
    db = tmp_path / "r.db"
    with ResultStore(db) as st:
        sid = st.setting_id(Setting("p", "fake", 5))
        assert st.setting_id(Setting("p", "fake", 5)) == sid
        assert st.add(sid, _result()) is True
        assert st.add(sid, _result()) is False  # same (setting, task, init, seed): skipped
        assert st.add(sid, _result(seed=1)) is True
        assert st.done(sid) == {("reach", 0, 0), ("reach", 0, 1)}
        assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(ResultStore(db).episodes()) == 2


def test_store_an_interrupt_right_after_commit_is_itself_not_a_rollback_error(tmp_path):
    """Ctrl-C landing just after COMMIT (or SQLite rolling back on its own: a full disk) made the
    cleanup's ROLLBACK raise "no transaction is active" over the real exception."""

    class InterruptAfter:
        def __init__(self, conn, sql, exc):
            self.conn, self.sql, self.exc = conn, sql, exc

        def execute(self, sql, *a):
            cur = self.conn.execute(sql, *a)
            if sql.startswith(self.sql):
                if self.sql != "COMMIT":  # SQLite rolls back by itself on SQLITE_FULL
                    self.conn.execute("ROLLBACK")
                raise self.exc
            return cur

        def __getattr__(self, name):
            return getattr(self.conn, name)

    st = ResultStore(tmp_path / "r.db")
    sid = st.setting_id(Setting("p", "fake", 5))
    real = st.conn
    st.conn = InterruptAfter(real, "COMMIT", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        st.add(sid, _result("reach", 0, 0))
    st.conn = InterruptAfter(real, "INSERT OR IGNORE INTO episodes",
                             sqlite3.OperationalError("database or disk is full"))
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        st.add(sid, _result("reach", 1, 1))
    st.conn = real
    assert [(e["init_id"], e["status"]) for e in st.episodes()] == [(0, "success")]  # the commit stood
    st.close()


def test_store_refuses_other_schema_and_foreign_files(tmp_path):
    db = tmp_path / "old.db"
    ResultStore(db).close()
    c = sqlite3.connect(db)
    c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    c.commit()
    c.close()
    before = db.read_bytes()
    with pytest.raises(ValueError, match="schema version"):
        ResultStore(db)
    assert db.read_bytes() == before  # never overwritten
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    with pytest.raises(ValueError, match="not a kvreuse results file"):
        ResultStore(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ValueError, match="not an SQLite file"):
        ResultStore(junk)


def test_report_refuses_a_version_1_db_with_a_clear_error(tmp_path):
    # Version 1 had no settings.protocol column: reading it must give the schema error, not IndexError.
    db = tmp_path / "v1.db"
    with ResultStore(db) as st:
        st.add(st.setting_id(Setting("p", "fake", 5)), _result())
    c = sqlite3.connect(db)
    c.execute("ALTER TABLE settings DROP COLUMN protocol")
    c.execute("UPDATE schema_version SET version = 1")
    c.commit()
    c.close()
    with pytest.raises(ValueError, match="schema version 1, this kvreuse reads versions 2 and 3 and writes version 3"):
        compute_rows(db)
    from kvreuse.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", "--db", str(db)])
    assert e.value.code == 2


# ---- sweeps ----------------------------------------------------------------------------------


def test_parse_grid_and_seeds():
    g = parse_grid(["gate=threshold threshold=0.98,0.99 mode=full,vision_only", "gate=period period=2"])
    assert len(g) == 5
    assert g[0] == {"gate": "threshold", "threshold": 0.98, "mode": "full"}
    assert g[-1] == {"gate": "period", "period": 2}
    assert parse_grid(["synchronized=true max_age_calls=none"]) == [{"synchronized": True, "max_age_calls": None}]
    with pytest.raises(ValueError, match="key=v1,v2"):
        parse_grid(["threshold"])
    with pytest.raises(ValueError, match="'threshold' given twice"):  # not the last value silently
        parse_grid(["gate=threshold threshold=0.9 threshold=0.95"])
    # fields glued by a comma: before, "unknown gate 'max_age_calls=1'" (a value of gate)
    with pytest.raises(ValueError, match=r"^grid: gate='crossmodal,max_age_calls=1' holds 'max_age_calls=1' as one "
                                         r"of gate's values; .*: gate=crossmodal max_age_calls=1$"):
        parse_grid(["gate=crossmodal,max_age_calls=1"])
    # the spaced form shown keeps every field's values (it showed 'threshold=0.8 max_age_calls=1')
    with pytest.raises(ValueError, match=r": threshold=0\.8,0\.9 max_age_calls=1,2$"):
        parse_grid(["gate=crossmodal threshold=0.8,0.9,max_age_calls=1,2"])
    assert episode_seed(0, "reach", 3) == episode_seed(0, "reach", 3) != episode_seed(1, "reach", 3)
    eps = episode_list(FakeEnv(), ("reach", "crash"), 3, init_start=49)
    assert [(t, i) for t, i, _ in eps] == [("reach", 49), ("crash", 49), ("reach", 0), ("crash", 0),
                                          ("reach", 1), ("crash", 1)]


def test_grid_fields_the_setting_never_reads():
    """A key no setting of its spec reads is refused; one that only some combinations of a
    product read is left out of the others' identity, so they match the plain setting."""
    from kvreuse.eval.sweep import canonical_reuse

    for spec, key in (("gate=period threshold=0.9", "threshold"), ("gate=always layer_split=3", "layer_split"),
                      ("gate=threshold mode=full,vision_only patch_max_diff=None", "patch_max_diff"),
                      ("gate=crossmodal gripper_delta=0.2", "gripper_delta")):
        with pytest.raises(ValueError, match=f"grid: {key} has no effect with gate"):
            parse_grid([spec])
    full, partial = (canonical_reuse(p) for p in parse_grid(["gate=threshold mode=full,partial patch_max_diff=None"]))
    assert full == canonical_reuse({"gate": "threshold"}) == ({"gate": "threshold"}, "threshold(raw>=0.985)/full")
    assert partial[0] == {"gate": "threshold", "mode": "partial", "patch_max_diff": None}
    assert canonical_reuse({"gate": "threshold", "image_metric": "patch", "patch_threshold": 0.9})[0] == {
        "gate": "threshold", "image_metric": "patch", "patch_threshold": 0.9}  # the patch metric reads it
    assert parse_grid(["gate=phase phase_threshold=0.99 mode=layer_wise layer_split=4"])  # all read
    # fields that other fields than gate and mode switch off: the error names what does
    for spec, why in (("gate=threshold image_metric=patch downsample=16,64", "read by image_metric=raw only"),
                      ("gate=crossmodal mode=vision_only synchronized=true state_reference=state,cameras",
                       "not under synchronized=true")):
        with pytest.raises(ValueError, match=f"has no effect with gate .*{why}"):
            parse_grid([spec])


@pytest.mark.parametrize("cmd", ["eval", "bench-eval"])
def test_one_setting_commands_refuse_a_list(cmd, capsys):
    from kvreuse.cli import main

    with pytest.raises(SystemExit) as e:
        main([cmd, "--env", "fake", "--reuse", "gate=threshold threshold=0.9,0.95"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"reuse: `{cmd}` runs one setting" in err and "gives 2" in err
    with pytest.raises(SystemExit):
        main([cmd, "--env", "fake", "--reuse", "threshold"])
    assert "kvreuse: error: reuse: expected key=v1,v2" in capsys.readouterr().err
    # a setting that never reuses: spoken of as --reuse, not as a grid's entry to "leave out"
    for reuse, words in (("mode=partial", "never reuses (a setting needs a gate="), ("gate=never", "never reuses;")):
        with pytest.raises(SystemExit):
            main([cmd, "--env", "fake", "--reuse", reuse])
        err = capsys.readouterr().err
        assert f"kvreuse: error: reuse: {reuse!r} {words}" in err and "grid" not in err, err
        assert ("--with-baseline" in err) == (cmd == "eval")


def test_sweep_is_paired_and_resumable(tmp_path, monkeypatch):
    """Every setting runs the baseline's exact episode list; a rerun adds nothing."""
    import kvreuse.eval.sweep as sw

    seen: dict[str, list] = {}

    def fake_make_policy(model, transform, reuse):
        p = StubPolicy(reuse_every=0 if reuse is None else 2)
        seen.setdefault(json.dumps(reuse, sort_keys=True), []).append(p)
        return p

    monkeypatch.setattr(sw, "make_policy", fake_make_policy)
    monkeypatch.setattr(sw, "check_reuse_supported", lambda: None)
    plan = SweepPlan(db=str(tmp_path / "s.db"), env="fake", tasks=("reach", "crash"), episodes=3, workers=0,
                     grid=parse_grid(["gate=threshold threshold=0.98,0.99"]), progress=False,
                     env_kw={"max_steps": 10})
    s = run_sweep(plan, PolicySource(None, "tiny-pi05"))
    assert len(s.settings) == 3 and s.ran == 18 and s.errors == 9
    with ResultStore(plan.db) as st:
        keys = {}
        for row in st.settings():
            keys[row["name"]] = sorted((e["task"], e["init_id"], e["seed"]) for e in st.episodes(row["id"]))
        noise_by_setting = [[n for p in ps for n in p.noises] for ps in seen.values()]
    assert len(keys) == 3 and all(v == keys["baseline"] for v in keys.values())
    # identical noise sequences across settings (the error episodes included)
    assert all(len(n) == len(noise_by_setting[0]) for n in noise_by_setting)
    assert all(torch.equal(a, b) for n in noise_by_setting[1:] for a, b in zip(n, noise_by_setting[0]))
    again = run_sweep(plan, PolicySource(None, "tiny-pi05"))
    assert again.ran == 0 and again.skipped == 18
    plan.max_steps = 4  # another protocol: new settings, never mixed with the earlier episodes
    other = run_sweep(plan, PolicySource(None, "tiny-pi05"))
    assert other.ran == 18 and other.skipped == 0
    groups = {r.group for r in compute_rows(plan.db)}
    assert len(groups) == 2 and sum(" | replan 5 | step limit 4 | env max_steps=10" in g for g in groups) == 1


def test_sweep_bad_input(tmp_path):
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="fake", tasks=("nope",), episodes=1, progress=False)
    with pytest.raises(ValueError, match="valid tasks: reach"):
        run_sweep(plan, PolicySource())
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="libero:libero_nope", progress=False)
    with pytest.raises(ValueError, match="valid suites: libero_spatial"):
        run_sweep(plan, PolicySource())
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="gym", progress=False)
    with pytest.raises(ValueError, match="valid envs: metaworld"):
        run_sweep(plan, PolicySource())
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="fake", grid=[{"gate": "sometimes"}], progress=False)
    with pytest.raises(ValueError, match="unknown gate"):
        run_sweep(plan, PolicySource())
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="fake", grid=[{"gate": "never"}], progress=False)
    with pytest.raises(ValueError, match="never reuses: that is the baseline"):  # not a second baseline
        run_sweep(plan, PolicySource())
    for bad, msg in (({"max_steps": 0}, "max_steps: expected an integer >= 1"),
                     ({"max_steps": -3}, "max_steps: expected an integer >= 1"),
                     ({"init_start": -7}, "init_start: expected an integer >= 0, got -7"),
                     ({"videos": -1}, "videos: expected an integer >= 0"), ({"streams": -1}, "streams: expected")):
        plan = SweepPlan(db=str(tmp_path / "x.db"), env="fake", progress=False, **bad)
        with pytest.raises(ValueError, match=msg):
            run_sweep(plan, PolicySource())
    assert not (tmp_path / "x.db").exists()  # validation happens before anything is written


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    from kvreuse.eval.sweep import PolicySource, SweepPlan, run_sweep

    if __name__ == "__main__":  # workers are spawned: they re-import this file
        warnings.simplefilter("ignore")
        plan = SweepPlan(db=sys.argv[1], env="fake", tasks=("reach", "reach-far", "crash"), episodes=8,
                         workers=int(sys.argv[2]), progress=False,
                         env_kw={"max_steps": 12, "radius": 0.0, "step_sleep_s": float(sys.argv[3])})
        s = run_sweep(plan, PolicySource(None, "tiny-pi0"))
        print("ran", s.ran, "skipped", s.skipped)
    """
)


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        c = sqlite3.connect(db, timeout=10)
        try:
            return c.execute("SELECT count(*) FROM episodes").fetchone()[0]
        finally:
            c.close()
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_sweep_killed_with_sigkill_loses_and_duplicates_nothing(tmp_path):
    db, script = tmp_path / "k.db", tmp_path / "sweep.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(db), "2", "0.04"], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while _count(db) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, f"sweep ended before it could be killed: {proc.communicate()}"
    workers = _children(proc.pid)
    assert workers, "the sweep should have worker processes"
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the sweep; its workers must die with it
    proc.wait()
    deadline = time.time() + 2  # orphans would take longer: they would run the queued episodes
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    leftover = [w for w in workers if _alive(w)]
    if leftover:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not leftover, "worker processes outlived the killed sweep"
    partial = _count(db)
    assert 4 <= partial < 24
    out = subprocess.run([sys.executable, str(script), str(db), "0", "0.04"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"skipped {partial}" in out.stdout and f"ran {24 - partial}" in out.stdout
    c = sqlite3.connect(db)
    rows = c.execute("SELECT setting_id, task, init_id, seed FROM episodes").fetchall()
    assert len(rows) == len(set(rows)) == 24
    statuses = dict(c.execute("SELECT status, count(*) FROM episodes GROUP BY status").fetchall())
    assert statuses.get("error") == 8  # every "crash" episode, recorded as an error


def _stop_a_running_eval(tmp_path, episodes: int, stop) -> tuple[int, str, int]:
    """Run `kvreuse eval` on the fake env with 2 workers in its own process group, call stop(pid) once
    2 episodes are stored; -> (return code, stderr, episodes stored)."""
    db = tmp_path / "s.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "kvreuse.cli", "eval", "--env", "fake", "--tasks", "reach",
                             "--episodes", str(episodes), "--workers", "2", "--max-steps", "3", "--db", str(db),
                             "--no-progress"], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while _count(db) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended before it could be stopped: {proc.communicate()}"
    stop(proc.pid)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the sweep hung after it was stopped") from None
    return proc.returncode, err, _count(db)


def test_sigterm_ends_a_sweep_with_many_queued_episodes(tmp_path):
    """More queued jobs than a pipe holds: the queue's feeder thread must not keep the stopped
    sweep alive (it once hung for good after its one-line message)."""
    rc, err, stored = _stop_a_running_eval(tmp_path, 3000, lambda pid: os.kill(pid, signal.SIGTERM))
    assert rc == 128 + signal.SIGTERM and "kvreuse: stopped by signal 15" in err
    assert 2 <= stored < 3000


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_sighup_to_the_process_group_ends_a_sweep_with_one_line(tmp_path):
    """A closed terminal hangs up the whole group: multiprocessing's resource tracker died of it too and
    was relaunched, with a warning and a KeyError traceback per queue after the run's one line."""
    rc, err, _ = _stop_a_running_eval(tmp_path, 300, lambda pid: os.killpg(pid, signal.SIGHUP))
    assert rc == 128 + signal.SIGHUP and "kvreuse: stopped by signal 1" in err
    assert "Traceback" not in err and "resource_tracker" not in err, err[-2000:]


# ---- reports ---------------------------------------------------------------------------------


def _fill(db: Path) -> None:
    """A baseline and two reuse settings on the same 20 episodes of two tasks."""
    with ResultStore(db) as st:
        base = st.setting_id(Setting("p", "fake", 5))
        good = st.setting_id(Setting("p", "fake", 5, {"threshold": 0.99}, "thr0.99"))
        bad = st.setting_id(Setting("p", "fake", 5, {"threshold": 0.9}, "thr0.9"))
        for task in ("a", "b"):
            for i in range(10):
                st.add(base, _result(task, i, i, "success" if i < 8 else "failure", calls=4, reuses=0, ms=100.0))
                st.add(good, _result(task, i, i, "success" if i < 8 else "failure", calls=4, reuses=2, ms=50.0))
                st.add(bad, _result(task, i, i, "success" if i < 1 else "failure", calls=4, reuses=4, ms=25.0))
        st.add(bad, _result("a", 99, 99, "error"))


def test_report_numbers(tmp_path):
    db = tmp_path / "rep.db"
    _fill(db)
    rows = {(r.setting, r.task): r for r in compute_rows(db)}
    b, g, x = rows[("baseline", ALL)], rows[("thr0.99", ALL)], rows[("thr0.9", ALL)]
    assert (b.n, b.successes, b.rate) == (20, 16, 0.8)
    assert b.ci == pytest.approx(stats.wilson(16, 20))
    assert g.speedup == pytest.approx(2.0) and x.speedup == pytest.approx(4.0)
    assert g.reuse_rate == 0.5 and x.reuse_rate == 1.0
    assert g.paired.p_value == 1.0 and g.paired.diff == 0.0
    assert (x.paired.only_base, x.paired.only_setting) == (14, 0)
    assert x.paired.p_value == pytest.approx(2 / 2**14)
    assert x.errors == 1 and x.n == 20
    assert rows[("baseline", "a")].n == 10 and rows[("thr0.9", "a")].errors == 1
    md = markdown(compute_rows(db))
    assert "| setting | success | latency (mean) | p50 / p95 | Hz | reuse rate | speedup | n | 95% CI |" in md
    assert "| **baseline** | 80.0% | 100.0 ms |" in md
    assert "| thr0.9 | 10.0% | 25.0 ms |" in md and "0.000122" in md
    assert "### a" in md and "### b" in md


def test_report_files_and_cli(tmp_path, capsys):
    from kvreuse.cli import main

    db = tmp_path / "rep.db"
    _fill(db)
    md, files = write_report(db, tmp_path / "out")
    names = {f.name for f in files}
    assert names == {"report.md", "results.csv", "success_vs_reuse.png", "success_vs_latency.png", "per_task.png"}
    for f in files:
        assert f.stat().st_size > 0
    assert (tmp_path / "out" / "success_vs_latency.png").read_bytes()[:4] == b"\x89PNG"
    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("group,setting,task,is_baseline,n,successes,success_rate,ci_low,ci_high")
    assert len(csv_lines) == 1 + 3 * 3
    main(["report", "--db", str(db), "--out", str(tmp_path / "cli")])
    assert "| **baseline** | 80.0%" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", "--db", str(tmp_path / "missing.db")])
    assert "no such file" in capsys.readouterr().err


def test_pareto_front():
    pts = [(100, 0.8), (50, 0.8), (25, 0.1), (60, 0.5), (50, 0.7)]
    assert pareto(pts) == [2, 1]
    # a setting with no timed call (NaN latency) is on no front; it sorted anywhere and broke the order
    assert pareto([(float("nan"), 0.2), (40.0, 0.9), (30.0, 0.5)]) == [2, 1]


def test_cli_eval_unknown_task(capsys, tmp_path):
    from kvreuse.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--env", "fake", "--tasks", "nope", "--db", str(tmp_path / "e.db")])
    err = capsys.readouterr().err
    assert "unknown task(s) ['nope']; valid tasks: reach, reach-far, crash" in err


def test_default_workers_one_per_core_but_one_for_a_gpu_policy():
    from kvreuse.eval.cli import _cores, _plan

    args = ("x.db", "fake", (), 1, 0, 0, 5, None)
    assert _plan(*args, None, 0, [], True, False, "cuda").workers == 1  # each worker would hold a model copy
    assert _plan(*args, None, 0, [], True, False, "cuda:1").workers == 1
    assert _plan(*args, None, 0, [], True, False, "cpu").workers == _cores()
    assert _plan(*args, 3, 0, [], True, False, "cuda").workers == 3  # asked for: kept


def test_cli_eval_fake_env_runs(capsys, tmp_path):
    from kvreuse.cli import main

    main(["eval", "--env", "fake", "--tasks", "reach", "--episodes", "2", "--workers", "0", "--no-progress",
          "--db", str(tmp_path / "e.db")])
    out = capsys.readouterr().out
    assert "| **baseline** |" in out and "| 2 |" in out
    # the fast runtime into the same DB: its own policy group, and only that one is printed
    main(["eval", "--env", "fake", "--tasks", "reach", "--episodes", "2", "--workers", "0", "--no-progress",
          "--fast", "--db", str(tmp_path / "e.db")])
    out = capsys.readouterr().out
    assert out.count("## fake | policy ") == 1 and "+fast+stats@" in out and "| 2 |" in out


# ---- one real Meta-World episode ---------------------------------------------------------------


def test_metaworld_episode_tiny_model():
    from kvreuse.envs.metaworld import MetaWorldEnv  # sets MUJOCO_GL before mujoco loads
    from kvreuse.eval.sweep import load_model, make_policy

    pytest.importorskip("metaworld")
    model, tf, _ = load_model(PolicySource(None, "tiny-pi05"), "metaworld")
    env = MetaWorldEnv(max_steps=8)
    try:
        r = run_episode(make_policy(model, tf, None), env, "reach-v3", 0, seed=0, replan=5)
    finally:
        env.close()
    assert r.status in ("success", "failure") and r.error == ""
    assert r.steps == 8 and r.calls == 2


def test_bench_eval_prints_throughput(capsys):
    from kvreuse.cli import main

    main(["bench-eval", "--env", "fake", "--tasks", "reach", "crash", "--total", "4", "--workers", "0"])
    out = capsys.readouterr().out
    assert "4 episodes (2 per task x 2 tasks)" in out and "episodes/s" in out and "2 env errors" in out
    assert "CPU-s per episode" in out


def test_bench_eval_stopped_does_not_point_at_its_throw_away_db(capsys, monkeypatch):
    import kvreuse.eval.sweep as sw
    from kvreuse.cli import main

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sw, "run_episode", interrupted)
    with pytest.raises(SystemExit):
        main(["bench-eval", "--env", "fake", "--tasks", "reach", "--total", "2", "--workers", "0"])
    assert capsys.readouterr().err.strip() == "kvreuse: interrupted"  # its DB is gone: nothing to continue from


def test_shipped_testbed_policy_metaworld_episode(tmp_path):
    """The defaults: shipped testbed policy (if present), Meta-World, through the sweep."""
    from kvreuse.envs.metaworld import MetaWorldEnv  # noqa: F401 - sets MUJOCO_GL first
    from kvreuse.eval.sweep import shipped_checkpoint

    pytest.importorskip("metaworld")
    if shipped_checkpoint() is None:
        pytest.skip("no shipped testbed checkpoint")
    plan = SweepPlan(db=str(tmp_path / "mw.db"), env="metaworld", tasks=("handle-press-v3",), episodes=1,
                     workers=0, progress=False, max_steps=60)
    s = run_sweep(plan, PolicySource())
    assert s.ran == 1 and s.errors == 0
    assert s.settings[0].policy.startswith("testbed-pi05@")
    with ResultStore(plan.db) as st:
        (e,) = st.episodes()
    assert e["status"] in ("success", "failure") and 0 < e["steps"] <= 60 and e["calls"] >= 1


def test_worker_death_is_an_error_and_the_sweep_goes_on(tmp_path):
    """A simulator that kills its worker process (segfault/abort) costs that episode only."""
    plan = SweepPlan(db=str(tmp_path / "d.db"), env="fake", tasks=("abort", "reach"), episodes=2, workers=2,
                     progress=False, env_kw={"max_steps": 6, "radius": 0.0, "hard_crash": True})
    s = run_sweep(plan, PolicySource(None, "tiny-pi0"))
    assert s.ran == 4 and s.errors == 2
    with ResultStore(plan.db) as st:
        eps = st.episodes()
    by_task = {}
    for e in eps:
        by_task.setdefault(e["task"], []).append(e)
    assert all(e["status"] == "error" and "worker process died" in e["error"] for e in by_task["abort"])
    assert all(e["status"] == "failure" and e["steps"] == 6 for e in by_task["reach"])


def test_policy_errors_stop_the_sweep(tmp_path, monkeypatch):
    """A wrong checkpoint is refused before any work; a policy failure inside a worker reaches the
    caller as itself (no hang, no respawn loop)."""
    import kvreuse.checkpoint as ckpt
    from kvreuse.checkpoint import save_checkpoint
    from kvreuse.model import Pi0Model, preset

    plan = SweepPlan(db=str(tmp_path / "p.db"), env="fake", tasks=("reach",), episodes=2, workers=1,
                     progress=False)
    ck = save_checkpoint(tmp_path / "ck", Pi0Model(preset("tiny-pi0")), None, robot="libero")
    with pytest.raises(ValueError, match="drives robot 'libero'; env 'fake' needs 'metaworld'"):
        run_sweep(plan, PolicySource(str(ck)))
    assert not (tmp_path / "p.db").exists()
    ck = save_checkpoint(tmp_path / "ck2", Pi0Model(preset("tiny-pi0")), None, robot="metaworld")
    f = ck / "model.safetensors"
    check = ckpt.check_checkpoint

    def damaged_after_the_check(path):  # a garbage file is refused up front: break it once that passed
        check(path)
        f.write_bytes(b"not safetensors")

    monkeypatch.setattr(ckpt, "check_checkpoint", damaged_after_the_check)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {f}: not a readable safetensors file")) as ei:
        run_sweep(plan, PolicySource(str(ck)))  # raised by the worker's load_checkpoint, re-raised here
    # The copy re-raised here carries the worker's traceback (a bug's would otherwise start in the pool).
    assert "raised in a sweep worker process:" in "".join(getattr(ei.value.__cause__, "__notes__", []))
    assert "load_checkpoint" in "".join(ei.value.__cause__.__notes__)


def test_episodes_finished_behind_a_workers_error_are_kept():
    """A policy error in one worker stopped the sweep at once: episodes other workers had finished
    and queued behind it were never read, so never stored."""
    import queue

    from kvreuse.eval.sweep import _finished_behind

    q = queue.Queue()
    for msg in (("done", 1, "k", "r1"), ("fail", 2, ValueError()), ("done", 3, "k", "r3"), ("done", 9, "k", "x")):
        q.put(msg)
    pending = {1, 3, 4}
    assert list(_finished_behind(q, pending, wait_s=0.2)) == [("k", "r1"), ("k", "r3")]
    assert pending == {4} and q.empty()


def test_an_error_mid_sweep_says_what_was_kept(tmp_path, capsys, monkeypatch, fail_on_call):
    """An error after some episodes (a policy bug, the GPU, the disk) keeps them in the DB; the
    last line says so (it was a bare traceback, or for a worker's ValueError a bare line)."""
    import kvreuse.eval.sweep as sw
    from kvreuse.cli import main

    illegal = RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(sw, "run_episode", fail_on_call(sw.run_episode, 3, illegal))
    db = tmp_path / "x.db"
    with pytest.raises(SystemExit) as ex:
        main(["eval", "--env", "fake", "--tasks", "reach", "--episodes", "4", "--workers", "0", "--max-steps", "6",
              "--db", str(db)])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 1 and "Traceback (most recent call last):" in err  # an error, not bad input
    assert err[-1] == ("kvreuse: error: sweep: RuntimeError: CUDA error: an illegal memory access was encountered "
                       f"(2 of the 4 episodes this run had to do are in {db}; the same command continues from there)")
    assert _count(db) == 2


def test_default_tasks_fall_back_to_the_env_when_the_checkpoint_knows_none_of_them():
    from kvreuse.eval.sweep import default_tasks

    env = FakeEnv()
    assert default_tasks(env, ("reach-v3", "push-v3")) == env.tasks  # Meta-World checkpoint, fake env
    assert default_tasks(env, ("reach-far", "push-v3")) == ("reach-far",)
    assert default_tasks(env, None) == env.tasks


def test_wilson_interval_contains_the_rate_at_the_extremes():
    from kvreuse.eval.stats import wilson

    for n in range(1, 300):
        for k in (0, n):
            lo, hi = wilson(k, n)
            assert lo <= k / n <= hi


def test_sweep_records_streams_that_replay_to_the_same_actions(tmp_path):
    """--streams N: what the policy saw in the first N episodes of each task and setting, one
    stream file each; replayed through the same policy and seed, the same actions come back."""
    from kvreuse.reuse.compare import replay
    from kvreuse.reuse.stream import load_streams

    plan = SweepPlan(db=str(tmp_path / "s.db"), env="fake", tasks=("reach", "reach-far"), episodes=2, workers=0,
                     streams=1, stream_dir=str(tmp_path / "streams"), progress=False, env_kw={"max_steps": 6},
                     grid=[{"gate": "always"}], replan=3)
    run_sweep(plan, PolicySource(None, "tiny-pi05"))
    files = sorted(p.relative_to(tmp_path / "streams") for p in (tmp_path / "streams").rglob("*.safetensors"))
    assert len(files) == 4 and {f.name.split("_")[0] for f in files} == {"reach", "reach-far"}  # 2 settings x 2 tasks
    with ResultStore(plan.db) as st:
        calls = {(e["task"], e["init_id"]): e["calls"] for e in st.episodes()}
    one = load_streams(tmp_path / "streams" / files[0])
    assert one.episodes == 1 and len(one) == calls[(files[0].name.split("_")[0], 0)]
    every = load_streams(tmp_path / "streams")
    assert len(every) == sum(len(load_streams(tmp_path / "streams" / f)) for f in files) and every.episodes == 4
    from kvreuse.eval.sweep import load_model, make_policy

    model, tf, _ = load_model(PolicySource(None, "tiny-pi05"), "metaworld")
    a1, r1 = replay(make_policy(model, tf, None), one, seed=4)
    a2, _ = replay(make_policy(model, tf, None), one, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2, strict=True)) and len(r1) == len(one)


def test_recorded_streams_replay_the_live_decisions_of_a_phase_gate(tmp_path):
    """The phase gate reads the predicted chunk, so its decisions follow the noise. A replay drew
    one generator's noise over the whole stream, the live run one per episode seeded with the
    episode's seed: the same setting through the same policy decided otherwise. A batched stream
    could not be replayed at all (batch-1 noise)."""
    import json
    import sqlite3

    from kvreuse.eval.sweep import load_model, make_policy
    from kvreuse.reuse.compare import replay
    from kvreuse.reuse.stream import ObservationStream, load_streams

    setting = {"gate": "phase", "threshold": 0.8}
    plan = SweepPlan(db=str(tmp_path / "s.db"), env="fake", tasks=("reach", "reach-far"), episodes=2, workers=0,
                     streams=2, stream_dir=str(tmp_path / "streams"), progress=False, grid=[setting], baseline=False)
    run_sweep(plan, PolicySource(None, "tiny-pi05"))
    live = {(t, i): [d.split(":")[0] for d in json.loads(ds)] for t, i, ds in sqlite3.connect(plan.db).execute(
        "select task, init_id, decisions from episodes")}
    model, tf, _ = load_model(PolicySource(None, "tiny-pi05").resolved("metaworld"), "metaworld")  # the shipped one
    files = sorted((tmp_path / "streams").rglob("*.safetensors"))
    assert len(files) == 4
    for f in files:
        task, init_id = f.name.split("_")[0], int(f.name.split("_")[1])
        _, recs = replay(make_policy(model, tf, setting), load_streams(f), seed=0)
        assert [r.decision for r in recs] == live[(task, init_id)], f.name
    every = load_streams(tmp_path / "streams")  # a folder: each file's episode with its own seed
    _, recs = replay(make_policy(model, tf, setting), every, seed=0)
    assert [r.decision for r in recs] == [d for f in files for d in live[(f.name.split("_")[0],
                                                                          int(f.name.split("_")[1]))]]
    one = load_streams(files[0])  # the same steps with a batch axis of 2
    both = ObservationStream(robot=one.robot)
    for st in one:
        both.add({k: (np.stack([v, v]) if isinstance(v, np.ndarray) else v) for k, v in st.raw.items()}, st.reset)
    acts, _ = replay(make_policy(model, tf, None), both, seed=0)
    assert acts[0].shape[0] == 2


def test_a_rerun_asked_to_record_streams_of_stored_episodes_says_nothing_was_recorded(tmp_path, capsys):
    """`kvreuse eval` then `kvreuse eval --streams 1` on the same DB skipped the stored episodes and
    left streams/ empty without a word; `compare grid --stream` then found no stream."""
    plan = SweepPlan(db=str(tmp_path / "s.db"), env="fake", tasks=("reach",), episodes=2, workers=0,
                     stream_dir=str(tmp_path / "streams"), progress=False, env_kw={"max_steps": 3}, replan=3)
    run_sweep(plan, PolicySource(None, "tiny-pi05"))
    capsys.readouterr()
    assert run_sweep(replace(plan, streams=1), PolicySource(None, "tiny-pi05")).ran == 0
    err = capsys.readouterr().err
    assert f"note: --streams: 1 of the episodes to record are already in {plan.db}" in err and "new --db" in err
    assert not list((tmp_path / "streams").rglob("*.safetensors"))
    # recorded by a run: a rerun has them on disk and says nothing
    plan = replace(plan, db=str(tmp_path / "t.db"), streams=1)
    run_sweep(plan, PolicySource(None, "tiny-pi05"))
    capsys.readouterr()
    run_sweep(plan, PolicySource(None, "tiny-pi05"))
    assert "note: --streams" not in capsys.readouterr().err


# ---- bad input and regressions found by a user test ----------------------------------------------


def test_libero_settings_from_before_openpis_layouts_are_named_and_not_continued(tmp_path, capsys):
    """LIBERO episodes run before episode k got openpi's fixture layout k (their protocol names no scenes)
    read in the report as if they had; a new run started a new group without a word."""
    import json

    from kvreuse.eval.report import _protocol_text
    from kvreuse.eval.store import ResultStore, Setting
    from kvreuse.eval.sweep import SweepPlan, _note_older_scenes

    env = "libero:libero_spatial"
    plan = SweepPlan(db="l.db", env=env, env_kw={"scenes": "openpi"})
    old = Setting("p", env, 5, None, "baseline", json.dumps({"env": {}, "max_steps": None}, sort_keys=True))
    new = Setting("p", env, 5, None, "baseline",
                  json.dumps({"env": {"scenes": "openpi"}, "max_steps": None}, sort_keys=True))
    assert _protocol_text(old.protocol, env) == " | env scenes=first"
    assert _protocol_text(new.protocol, env) == " | env scenes=openpi"
    assert _protocol_text(old.protocol, "metaworld") == ""
    with ResultStore(tmp_path / "l.db") as st:
        st.setting_id(old)
        _note_older_scenes(st, [new], plan)
        assert "holds 1 of these settings from before LIBERO's episode k ran in openpi's" in capsys.readouterr().err
        st.setting_id(new)
        _note_older_scenes(st, [new], plan)  # continued: nothing to say
        assert capsys.readouterr().err == ""


def test_libero_scenes_option_reaches_the_env_and_first_continues_the_older_rows(capsys):
    """`--libero-scenes first` runs LIBERO's old soft-reset path (episode 0's layout for every episode),
    whose protocol is the one rows from before the option hold; the default names openpi's layouts."""
    import json

    from kvreuse.cli import main
    from kvreuse.eval.cli import _plan
    from kvreuse.eval.sweep import _protocol

    def plan(env, scenes):
        return _plan("x.db", env, (), 1, 0, 0, 5, None, 0, 0, [], True, False, libero_scenes=scenes)

    lib = "libero:libero_spatial"
    assert plan(lib, "openpi").env_kw == {"scenes": "openpi"} and plan(lib, "first").env_kw == {"scenes": "first"}
    assert json.loads(_protocol(plan(lib, "openpi")))["env"] == {"scenes": "openpi"}
    assert json.loads(_protocol(plan(lib, "first")))["env"] == {}
    assert plan("metaworld", "first").env_kw == {}
    for cmd in ("eval", "sweep"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--env", lib, "--libero-scenes", "all"])
        assert e.value.code == 2 and "--libero-scenes" in capsys.readouterr().err


def test_speedup_uses_the_baseline_on_the_settings_own_episodes(tmp_path):
    """The baseline ran two tasks, the setting one: its speedup (all tasks) compares it with the
    baseline on that one task's episodes, not with the baseline's mean over both."""
    db = tmp_path / "m.db"
    with ResultStore(db) as st:
        base = st.setting_id(Setting("p", "fake", 5))
        thr = st.setting_id(Setting("p", "fake", 5, {"threshold": 0.98}, "thr"))
        for i in range(2):
            st.add(base, _result("reach", i, i, ms=100.0))
            st.add(base, _result("reach-far", i, i, ms=10.0))
            st.add(thr, _result("reach-far", i, i, ms=5.0))
    rows = {(r.setting, r.task): r for r in compute_rows(db)}
    assert rows[("baseline", ALL)].n == 4 and rows[("baseline", ALL)].lat.mean == pytest.approx(55.0)  # kept
    assert rows[("thr", ALL)].speedup == pytest.approx(2.0)  # not 55 / 5
    assert rows[("thr", "reach-far")].speedup == pytest.approx(2.0) and rows[("thr", ALL)].paired.n == 2


def test_eval_summary_prints_only_the_tasks_just_run(tmp_path, capsys):
    from kvreuse.cli import main

    common = ["eval", "--env", "fake", "--episodes", "2", "--workers", "0", "--no-progress", "--db",
              str(tmp_path / "e.db")]
    main([*common, "--tasks", "reach"])
    capsys.readouterr()
    main([*common, "--tasks", "reach-far", "--reuse", "gate=threshold threshold=0.98 mode=full", "--with-baseline"])
    out = capsys.readouterr().out
    assert "### reach-far" in out and "### reach\n" not in out
    speedups = [line.split(" | ")[6] for line in out.splitlines() if line.startswith("| threshold")]
    assert len(speedups) == 2 and speedups[0] == speedups[1]  # all tasks = reach-far: same episodes


def test_unusable_db_and_report_paths_are_one_clear_error(tmp_path, capsys):
    from kvreuse.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for db, msg in ((a_file / "x.db", r"cannot create its folder .* \(a file is in the way\)"),
                    (tmp_path, "is a directory"), (Path("/proc/x.db"), "cannot open it"),
                    (Path("/dev/null"), "not a regular file")):  # was a traceback from inside the schema
        with pytest.raises(ValueError, match=f"results DB {db}: {msg}"):
            ResultStore(db)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--env", "fake", "--tasks", "reach", "--episodes", "1", "--workers", "0", "--no-progress",
              "--db", str(a_file / "x.db")])
    assert e.value.code == 2 and f"results DB {a_file / 'x.db'}: cannot create" in capsys.readouterr().err
    db = tmp_path / "rep.db"
    _fill(db)
    for out in (a_file, Path("/proc/kvreuse_report")):
        with pytest.raises(ValueError, match=f"report folder {out}: cannot write there"):
            write_report(db, out, plots=False)
    with pytest.raises(SystemExit):
        main(["report", "--db", str(db), "--out", str(a_file)])
    assert f"report folder {a_file}: cannot write there (a file is in the way)" in capsys.readouterr().err


def test_report_is_read_only_and_refuses_files_that_are_not_kvreuse_dbs(tmp_path, capsys):
    from kvreuse.cli import main

    empty, other = tmp_path / "empty.db", tmp_path / "other.db"
    empty.write_bytes(b"")
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    for f in (empty, other):
        before = f.read_bytes()
        with pytest.raises(ValueError, match=f"results DB {f}: not a kvreuse results file"):
            compute_rows(f)
        with pytest.raises(SystemExit):
            main(["report", "--db", str(f), "--out", str(tmp_path / "out"), "--no-plots"])
        assert "not a kvreuse results file" in capsys.readouterr().err
        assert f.read_bytes() == before  # no schema written, not switched to WAL
    db = tmp_path / "rep.db"
    _fill(db)
    before = db.read_bytes()
    assert len(compute_rows(db)) == 9 and db.read_bytes() == before
    with pytest.raises(ValueError, match=f"results DB {tmp_path}: is a folder"):
        compute_rows(tmp_path)


def test_report_into_a_used_folder_leaves_no_stale_plots_and_blank_speedups(tmp_path):
    import csv

    db, nobase, out = tmp_path / "rep.db", tmp_path / "nobase.db", tmp_path / "out"
    _fill(db)
    with ResultStore(nobase) as st:
        sid = st.setting_id(Setting("p", "fake", 5, {"threshold": 0.9}, "thr0.9"))
        st.add(sid, _result("a", 0, 0, "success", calls=4, reuses=2, ms=50.0))
    (out).mkdir()
    mine = ["notes.png", "per_task_annotated.png", "success_vs_reuse_slide3.png"]  # (a prefix match deleted them)
    for name in mine:
        (out / name).write_bytes(b"mine")
    (out / "per_task_1.png").write_bytes(b"an older report's plot of group 1")
    assert len(write_report(db, out)[1]) == 5
    write_report(nobase, out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([*mine, "report.md", "results.csv"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert rows and all(r["speedup"] == "" for r in rows)  # no baseline to divide by: blank, not nan


def test_sweep_checks_its_report_dir_before_any_episode(tmp_path, capsys):
    from kvreuse.cli import main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--env", "fake", "--tasks", "reach", "--episodes", "1", "--workers", "0", "--no-progress",
              "--grid", "gate=always", "--db", str(tmp_path / "s.db"), "--report-dir", str(tmp_path / "file" / "r")])
    assert e.value.code == 2 and "--report-dir" in capsys.readouterr().err and not (tmp_path / "s.db").exists()


def test_device_and_preset_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    from kvreuse.cli import main

    with pytest.raises(ValueError, match="--device 'cdua': unknown device; expected cpu, cuda or cuda:N"):
        PolicySource(device="cdua")
    with pytest.raises(ValueError, match="--device 'meta': unknown device"):
        PolicySource(device="meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device 'cuda': CUDA is not available"):
        PolicySource(device="cuda")
    from kvreuse.model.config import PRESETS

    with pytest.raises(ValueError, match=f"preset: unknown preset 'tiny-foo'; valid presets: {', '.join(PRESETS)}"):
        PolicySource(preset="tiny-foo")
    for flag, named in ((["--device", "cdua"], "--device 'cdua':"), (["--device", "cuda"], "--device 'cuda':"),
                        (["--preset", "tiny-foo"], "preset:")):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--env", "fake", "--tasks", "reach", "--episodes", "1", "--workers", "0", "--no-progress",
                  "--db", str(tmp_path / "d.db"), *flag])
        assert e.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "d.db").exists()


def test_duplicate_tasks_run_once(tmp_path, monkeypatch):
    import kvreuse.eval.sweep as sw

    monkeypatch.setattr(sw, "make_policy", lambda model, transform, reuse: StubPolicy())
    plan = SweepPlan(db=str(tmp_path / "t.db"), env="fake", tasks=("reach-far", "reach", "reach-far"), episodes=2,
                     workers=0, progress=False, env_kw={"max_steps": 3})
    s = run_sweep(plan, PolicySource(None, "tiny-pi05"))
    assert s.ran == 4 and s.tasks == ("reach-far", "reach")


def test_bench_eval_total_must_be_positive(capsys):
    from kvreuse.cli import main

    with pytest.raises(SystemExit):
        main(["bench-eval", "--env", "fake", "--tasks", "reach", "--total", "0", "--workers", "0"])
    assert "kvreuse: error: total: expected an integer >= 1" in capsys.readouterr().err


def test_progress_without_a_terminal_prints_lines(tmp_path, monkeypatch, capsys):
    import sys

    import kvreuse.eval.sweep as sw

    monkeypatch.setattr(sw, "make_policy", lambda model, transform, reuse: StubPolicy())
    plan = SweepPlan(db=str(tmp_path / "p.db"), env="fake", tasks=("reach", "reach-far"), episodes=10, workers=0,
                     progress=True, env_kw={"max_steps": 2})
    run_sweep(plan, PolicySource(None, "tiny-pi05"))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("progress:")]
    assert [x.split(" episodes")[0] for x in lines] == [f"progress: {k}/20" for k in range(2, 21, 2)]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal keeps the tqdm bar
    assert type(sw._progress(20, True)).__name__ == "tqdm"


def test_a_broken_checkpoint_or_a_full_size_preset_without_one_stops_before_any_work(tmp_path):
    """The checkpoint is checked from its headers before the DB exists or a worker starts (a
    garbage model.safetensors names the file); a full-size preset never falls back on the
    shipped tiny policy."""
    import shutil

    from kvreuse.eval.sweep import shipped_checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(shipped_checkpoint("tiny-pi0"), ck)
    (ck / "model.safetensors").write_bytes(b"\xff" * 64)
    plan = SweepPlan(db=str(tmp_path / "b.db"), env="fake", tasks=("reach",), episodes=1, workers=1, progress=False)
    with pytest.raises(ValueError, match=f"checkpoint {ck / 'model.safetensors'}: not a readable safetensors file"):
        run_sweep(plan, PolicySource(str(ck), "tiny-pi0"))
    assert not (tmp_path / "b.db").exists()
    assert shipped_checkpoint("pi0") is None and shipped_checkpoint("tiny-pi0").name == "testbed-pi0"
    with pytest.raises(ValueError, match="preset 'pi0' needs a checkpoint"):
        run_sweep(SweepPlan(db=str(tmp_path / "c.db"), env="fake", tasks=("reach",), episodes=1, workers=0,
                            progress=False), PolicySource(None, "pi0"))
    assert not (tmp_path / "c.db").exists()


def test_metaworld_renders_at_the_size_the_policy_was_trained_on(capsys):
    """A checkpoint trained on 64-px demos is evaluated on 64-px renders (part of the protocol);
    the shipped policies (128 px, the default) and an explicit env size are left alone."""
    from types import SimpleNamespace

    from kvreuse.eval.sweep import _trained_render_size

    env = SimpleNamespace(cfg=SimpleNamespace(image_size=128))
    plan = SweepPlan(env="metaworld")
    got = _trained_render_size(plan, env, {"training": {"image_size": 64}})
    assert got.env_kw == {"image_size": 64} and "trained on 64px renders" in capsys.readouterr().err
    for p, meta in ((plan, {"training": {"image_size": 128}}), (plan, {}),
                    (SweepPlan(env="metaworld", env_kw={"image_size": 96}), {"training": {"image_size": 64}}),
                    (SweepPlan(env="fake"), {"training": {"image_size": 64}})):
        assert _trained_render_size(p, env, meta) is p


@pytest.mark.parametrize("as_file", [False, True])
def test_eval_runs_a_reference_checkpoint_without_config(tmp_path, as_file, monkeypatch):
    """A lerobot / openpi checkpoint (weights only, no config.json) evaluates like ours, given as
    its directory or its model.safetensors; its identity is the folder's name and the weights' hash
    either way (the file's name made another policy: a rerun spelled the other way redid its episodes)."""
    from kvreuse.model import Pi0Model, preset
    from kvreuse.ref_checkpoint import save_reference

    torch.manual_seed(0)
    f = save_reference(tmp_path / "ref", Pi0Model(preset("tiny-pi0")).eval(), "openpi")
    assert not (tmp_path / "ref" / "config.json").exists()
    ck, other = (f, f.parent) if as_file else (f.parent, f)
    plan = SweepPlan(db=str(tmp_path / "r.db"), env="fake", tasks=("reach",), episodes=1, workers=0, progress=False,
                     env_kw={"max_steps": 3})
    summary = run_sweep(plan, PolicySource(str(ck), "tiny-pi0"))
    assert summary.ran == 1 and summary.errors == 0
    assert summary.settings[0].policy.startswith("ref@")
    assert run_sweep(plan, PolicySource(str(other), "tiny-pi0")).ran == 0  # the other spelling: the same rows
    monkeypatch.chdir(f.parent)
    assert policy_identity(PolicySource(".", "tiny-pi0")) == summary.settings[0].policy


def test_a_tokenizer_for_a_byte_tokenizer_model_is_refused_before_any_work(tmp_path, sp_model):
    plan = SweepPlan(db=str(tmp_path / "t.db"), env="fake", tasks=("reach",), episodes=1, workers=0, progress=False)
    with pytest.raises(ValueError, match="uses the built-in byte tokenizer"):
        run_sweep(plan, PolicySource(None, "tiny-pi0", tokenizer=str(sp_model)))
    assert not (tmp_path / "t.db").exists()


def test_no_checkpoint_for_the_robot_is_a_one_line_warning(tmp_path, monkeypatch, capfd):
    import kvreuse.eval.sweep as sw

    monkeypatch.setattr(sw, "shipped_checkpoint", lambda preset: None)
    plan = SweepPlan(db=str(tmp_path / "w.db"), env="fake", tasks=("reach",), episodes=1, workers=0, progress=False,
                     env_kw={"max_steps": 2})
    run_sweep(plan, PolicySource(None, "tiny-pi0"))
    err = capfd.readouterr().err
    assert "warning: no checkpoint for robot 'metaworld': using a randomly initialised tiny-pi0" in err
    assert "sweep.py" not in err  # not a Python warning echoing a source line


def test_plots_keep_legends_off_the_data(tmp_path, monkeypatch):
    import kvreuse.eval.report as rep

    db = tmp_path / "rep.db"
    _fill(db)
    seen, save = [], rep._save

    def checked_save(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        for ax in fig.axes:
            leg = ax.get_legend()
            if leg is not None:  # the legend must not overlap the plotting area
                a, b = ax.get_window_extent(), leg.get_window_extent()
                assert b.x0 >= a.x1 or b.x1 <= a.x0 or b.y0 >= a.y1 or b.y1 <= a.y0, path.name
                seen.append(path.name)
        return save(fig, path)

    monkeypatch.setattr(rep, "_save", checked_save)
    files = rep.write_plots(compute_rows(db), tmp_path / "plots")
    assert sorted(f.name for f in files) == ["per_task.png", "success_vs_latency.png", "success_vs_reuse.png"]
    assert sorted(seen) == ["success_vs_latency.png", "success_vs_reuse.png"]  # per_task names its rows
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_an_episode_lost_with_its_worker_runs_again(tmp_path):
    """A worker gone between episodes (here: quietly, exit 0, right after taking a job) loses the
    job it held; a new round of workers runs it, and the sweep ends normally."""
    plan = SweepPlan(db=str(tmp_path / "v.db"), env="fake", tasks=("vanish", "reach"), episodes=2, workers=2,
                     progress=False, env_kw={"max_steps": 4, "vanish_once": str(tmp_path / "gone")})
    s = run_sweep(plan, PolicySource(None, "tiny-pi0"))
    assert (tmp_path / "gone").exists() and s.ran == 4 and s.errors == 0
    with ResultStore(plan.db) as st:
        assert sorted((e["task"], e["status"] != "error") for e in st.episodes()) == [
            ("reach", True), ("reach", True), ("vanish", True), ("vanish", True)]


def test_an_episode_lost_three_times_is_stored_as_an_error(tmp_path):
    """Its message and docs/EVAL.md say three; it used to run (and be lost) a fourth time."""
    gone = tmp_path / "gone"
    plan = SweepPlan(db=str(tmp_path / "v.db"), env="fake", tasks=("vanish",), episodes=1, workers=1,
                     progress=False, env_kw={"max_steps": 4, "vanish_once": str(gone), "vanish_times": 99})
    s = run_sweep(plan, PolicySource(None, "tiny-pi0"))
    assert gone.stat().st_size == 3 and s.errors == 1
    with ResultStore(plan.db) as st:
        assert [(e["status"], e["error"]) for e in st.episodes()] == [
            ("error", "lost three times with a worker that died between episodes")]


def test_retry_errors_replaces_error_rows_and_concurrent_results_are_counted(tmp_path, monkeypatch):
    plan = SweepPlan(db=str(tmp_path / "r.db"), env="fake", tasks=("reach",), episodes=2, workers=0, progress=False,
                     env_kw={"max_steps": 4})
    src = PolicySource(None, "tiny-pi0")
    first = run_sweep(plan, src)
    with ResultStore(plan.db) as st:  # as a worker killed from outside leaves one episode
        st.conn.execute("UPDATE episodes SET status = 'error', error = 'worker process died' WHERE init_id = 1")
    assert run_sweep(plan, src).ran == 0  # errors are kept by default
    again = run_sweep(replace(plan, retry_errors=True), src)
    assert again.ran == 1 and again.stored_elsewhere == 0
    with ResultStore(plan.db) as st:
        eps = st.episodes()
    assert len(eps) == 2 and all(e["status"] != "error" for e in eps)
    # Another process stored them first (two sweeps on one DB): nothing doubles, and it is said.
    monkeypatch.setattr(ResultStore, "done", lambda self, sid, errors=True: set())
    dup = run_sweep(plan, src)
    assert dup.ran == 2 and dup.stored_elsewhere == 2 and first.stored_elsewhere == 0
    with ResultStore(plan.db) as st:
        assert len(st.episodes()) == 2


def test_read_only_db_file_is_refused_and_a_read_only_folder_still_reports(tmp_path, monkeypatch):
    import kvreuse.eval.store as store_mod

    db = tmp_path / "rep.db"
    _fill(db)
    real_access = os.access
    monkeypatch.setattr(store_mod.os, "access", lambda p, mode: False if Path(p) in (db, tmp_path) else
                        real_access(p, mode))  # tests run as root, for whom every file is writable
    with pytest.raises(ValueError, match=f"results DB {db}: read-only file; give a writable --db"):
        ResultStore(db)
    db2 = tmp_path / "sub" / "w.db"  # a writable file in a folder that is not: SQLite blamed the file
    _fill(db2)
    monkeypatch.setattr(store_mod.os, "access", lambda p, mode: False if Path(p) == db2.parent else
                        real_access(p, mode))
    with pytest.raises(ValueError, match=re.escape(f"results DB {db2}: its folder {db2.parent} is not writable")):
        ResultStore(db2)
    monkeypatch.setattr(store_mod.os, "access", lambda p, mode: False if Path(p) in (db, tmp_path) else
                        real_access(p, mode))
    real_connect = sqlite3.connect

    def no_shm(database, *a, **k):  # SQLite cannot make the WAL's -shm file in a read-only folder
        if "immutable=1" in str(database):
            return real_connect(database, *a, **k)
        return real_connect("file:/nonexistent/dir/x.db?mode=ro", uri=True)  # fails on first use

    monkeypatch.setattr(store_mod.sqlite3, "connect", no_shm)
    assert len(compute_rows(db)) == 9
    wal = tmp_path / "rep.db-wal"  # results still in the log: immutable would read without them
    wal.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="its write-ahead log rep.db-wal still holds results"):
        compute_rows(db)


def test_a_video_cut_short_leaves_no_file(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    from kvreuse.eval.rollout import write_video

    frames = [np.zeros((8, 8, 3), np.uint8)] * 3
    out = write_video(frames, tmp_path / "v.gif")
    assert out.read_bytes()[:3] == b"GIF" and sorted(p.name for p in tmp_path.iterdir()) == ["v.gif"]

    def cut(path, *a, **k):  # the process is stopped halfway through the file
        Path(path).write_bytes(b"GIF89a")
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio, "mimwrite", cut)
    with pytest.raises(KeyboardInterrupt):
        write_video(frames, tmp_path / "w.gif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif"]


def test_step_limit_above_the_envs_is_refused_not_cut_silently(tmp_path, capsys):
    """The env ends every episode at its own limit (its `done`): a larger --max-steps used to run
    that many steps while the DB recorded the larger limit."""
    with pytest.raises(ValueError, match=r"max_steps: expected 1\.\.10 .*got 11"):
        run_episode(StubPolicy(), FakeEnv(max_steps=10, radius=0.0), "reach", 0, seed=0, max_steps=11)
    with pytest.raises(ValueError, match=r"max_steps: expected 1\.\.10 .*got 0"):
        run_episode(StubPolicy(), FakeEnv(max_steps=10, radius=0.0), "reach", 0, seed=0, max_steps=0)
    r = run_episode(StubPolicy(), FakeEnv(max_steps=10, radius=0.0), "reach", 0, seed=0, max_steps=10)
    assert r.steps == 10
    from kvreuse.cli import main

    db = tmp_path / "x.db"
    for args, msg in ((["--max-steps", "31"], "max_steps: 31 is above fake's episode limit of 30 steps"),
                      (["--init-start", "50"], "init_start: 50 is past the last init state of fake task 'reach' "
                                               r"\(ids 0\.\.49\)")):
        with pytest.raises(SystemExit):
            main(["eval", "--env", "fake", "--tasks", "reach", "--episodes", "1", "--workers", "0",
                  "--db", str(db), *args])
        err = capsys.readouterr().err
        assert re.search(msg, err) and "Traceback" not in err
    assert not db.exists()  # refused before anything is written


def test_replan_above_the_policy_chunk_is_refused_not_cut_silently(tmp_path, capsys):
    """The rollout executes at most one chunk per call: --replan 20 with the testbed's 16-action
    chunks ran as replan 16 while the DB recorded (and kept apart) replan 20."""
    from kvreuse.cli import main

    db = tmp_path / "x.db"
    with pytest.raises(SystemExit):
        main(["eval", "--env", "fake", "--tasks", "reach", "--episodes", "1", "--workers", "0", "--db", str(db),
              "--replan", "17"])
    err = capsys.readouterr().err
    assert "replan: 17 is above the policy's action chunk of 16 actions" in err and "Traceback" not in err
    assert not db.exists()  # refused before anything is written
    plan = SweepPlan(db=str(db), env="fake", tasks=("reach",), episodes=1, replan=16, progress=False,
                     env_kw={"max_steps": 20, "radius": 0.0})
    assert run_sweep(plan, PolicySource(None, "tiny-pi0")).ran == 1  # the whole chunk is fine


@pytest.mark.parametrize("what", ["videos", "streams"])
def test_an_unwritable_video_or_stream_folder_is_refused_before_any_episode(tmp_path, capsys, what):
    """Videos and streams go next to the DB, written by a worker after its episode: a file in the
    way used to stop the sweep there with a traceback, that episode lost."""
    from kvreuse.cli import main

    (tmp_path / what).write_text("in the way")
    db = tmp_path / "x.db"
    with pytest.raises(SystemExit):
        main(["eval", "--env", "fake", "--tasks", "reach", "--episodes", "1", "--workers", "0", "--db", str(db),
              f"--{what}", "1"])
    err = capsys.readouterr().err
    assert f"--{what}: folder {tmp_path / what}: cannot write there" in err and "Traceback" not in err
    assert not db.exists()


def test_episodes_run_without_norm_stats_stay_apart_from_those_run_with_them(tmp_path):
    """The missing-stats warning asks to copy the stats beside the checkpoint; the same command
    then skipped the episodes run unnormalized and counted them in one row with the new ones."""
    import shutil

    from kvreuse.assets import shipped_checkpoint
    from kvreuse.eval.sweep import policy_identity

    ck = tmp_path / "ck"
    shutil.copytree(shipped_checkpoint("tiny-pi0"), ck)
    stats = (ck / "norm_stats.json").read_bytes()
    (ck / "norm_stats.json").unlink()
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="fake", tasks=("reach",), episodes=1, progress=False,
                     env_kw={"max_steps": 6, "radius": 0.0})
    assert run_sweep(plan, PolicySource(str(ck))).ran == 1
    bare = policy_identity(PolicySource(str(ck)))
    (ck / "norm_stats.json").write_bytes(stats)
    with_stats = policy_identity(PolicySource(str(ck)))
    assert re.sub(r"\+stats@[0-9a-f]{8}", "", with_stats) == bare.replace("+no-stats", "")
    s = run_sweep(plan, PolicySource(str(ck)))
    assert (s.ran, s.skipped) == (1, 0)  # run again with its stats, not skipped
    with ResultStore(plan.db) as st:
        assert sorted(r["policy"] for r in st.settings()) == sorted([bare, with_stats])


def test_episodes_run_under_replaced_norm_stats_stay_apart(tmp_path):
    """The policy id named the weights but not the norm stats: a checkpoint's norm_stats.json
    replaced, the same command skipped the episodes run under the old stats and pooled new ones
    with them in one row. The id hashes the stats a run applies, not the file."""
    import shutil

    from kvreuse.assets import shipped_checkpoint
    from kvreuse.eval.sweep import policy_identity

    ck = tmp_path / "ck"
    shutil.copytree(shipped_checkpoint("tiny-pi0"), ck)
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="fake", tasks=("reach",), episodes=1, progress=False,
                     env_kw={"max_steps": 6, "radius": 0.0})
    assert run_sweep(plan, PolicySource(str(ck))).ran == 1
    before = policy_identity(PolicySource(str(ck)))
    d = json.loads((ck / "norm_stats.json").read_text())
    d["state"]["mean"][0] += 0.5
    (ck / "norm_stats.json").write_text(json.dumps(d))
    after = policy_identity(PolicySource(str(ck)))
    assert after != before and after.split("+stats@")[0] == before.split("+stats@")[0]
    s = run_sweep(plan, PolicySource(str(ck)))
    assert (s.ran, s.skipped) == (1, 0)
    with ResultStore(plan.db) as st:
        assert sorted(r["policy"] for r in st.settings()) == sorted([before, after])
    # What the run does not apply is not named: a Pi0's stats are mean/std, its mode the default.
    d["state"]["q01"][0] += 1.0
    d["state_mode"] = "meanstd"
    (ck / "norm_stats.json").write_text(json.dumps(d))
    assert policy_identity(PolicySource(str(ck))) == after


def test_the_same_norm_stats_from_a_lerobot_or_an_openpi_file_give_one_policy_id(tmp_path):
    """A reference checkpoint's stats hash by value: lerobot's normalizer (mean/std alone, a dataset
    without quantiles) and openpi's norm_stats.json (all four) holding the same Pi0 stats agree."""
    from safetensors.torch import save_file

    from kvreuse.eval.sweep import policy_identity
    from kvreuse.model import Pi0Model, preset
    from kvreuse.ref_checkpoint import save_reference

    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi0")))
    rng = np.random.default_rng(0)
    st = {side: {k: rng.uniform(0.1, 1.0, 4).astype(np.float32) for k in ("mean", "std", "q01", "q99")}
          for side in ("state", "actions")}
    lerobot = tmp_path / "policy_preprocessor_step_3_normalizer_processor.safetensors"
    save_file({f"{prefix}.{k}": torch.from_numpy(st[side][k]) for prefix, side in
               (("observation.state", "state"), ("action", "actions")) for k in ("mean", "std")}, str(lerobot))
    from_lerobot = policy_identity(PolicySource(str(tmp_path)))
    assert "+stats@" in from_lerobot
    lerobot.unlink()
    (tmp_path / "norm_stats.json").write_text(json.dumps(
        {"norm_stats": {side: {k: v.tolist() for k, v in d.items()} for side, d in st.items()}}))
    assert policy_identity(PolicySource(str(tmp_path))) == from_lerobot
    st["actions"]["std"][1] *= 2
    (tmp_path / "norm_stats.json").write_text(json.dumps(
        {"norm_stats": {side: {k: v.tolist() for k, v in d.items()} for side, d in st.items()}}))
    assert policy_identity(PolicySource(str(tmp_path))) != from_lerobot


def test_a_setting_aged_in_seconds_gets_a_note(tmp_path, capsys):
    """max_age_s counts the wall-clock time between a rollout's calls (simulation, rendering, load):
    one setting gave 3,3,3,3 reuses with 1 worker and 2,2,2,3 with 4. Said once, not refused."""
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="fake", tasks=("reach",), episodes=1, progress=False,
                     env_kw={"max_steps": 6, "radius": 0.0}, grid=[{"gate": "always", "max_age_calls": 2}])
    assert run_sweep(plan, PolicySource(None, "tiny-pi0")).ran == 2
    assert "max_age_s" not in capsys.readouterr().err
    plan = replace(plan, grid=[{"gate": "always", "max_age_s": 0.5}])
    assert run_sweep(plan, PolicySource(None, "tiny-pi0")).ran == 1
    assert capsys.readouterr().err.count("note: max_age_s bounds the cache's age in wall-clock seconds") == 1


def test_an_edited_config_json_is_another_policy(tmp_path):
    """The weights' and stats' hashes do not cover config.json: a checkpoint run with 2 Euler steps
    instead of 10 kept the id, and its episodes were credited with the 10-step ones. The resolved
    config's fields away from ModelConfig's defaults are hashed into the id (+cfg@)."""
    import shutil

    from kvreuse.assets import shipped_checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(shipped_checkpoint("tiny-pi0"), ck)
    before = policy_identity(PolicySource(str(ck)))
    meta = json.loads((ck / "config.json").read_text())
    meta["model"]["num_steps"] = 2
    (ck / "config.json").write_text(json.dumps(meta))
    after = policy_identity(PolicySource(str(ck)))
    assert before != after and before.split("+cfg@")[0] == after.split("+cfg@")[0]
    meta["model"]["num_steps"] = 10
    (ck / "config.json").write_text(json.dumps(meta))
    assert policy_identity(PolicySource(str(ck))) == before


@pytest.mark.parametrize("era", [0, 1, 2])
def test_rows_under_an_older_policy_id_are_named_not_silently_restarted(tmp_path, capsys, monkeypatch, era):
    """DBs written before a change of the policy id (ID_CHANGES: +cuda / +no-stats, then +stats@)
    hold a policy's settings under the older id: the same command started over without a word; it
    says so now, once, and leaves those rows as they are."""
    import shutil

    import kvreuse.eval.sweep as sw
    from kvreuse.assets import shipped_checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(shipped_checkpoint("tiny-pi0"), ck)
    if era == 0:  # on a CPU with stats the era-0 id is the era-1 one: without stats, +no-stats sets them apart
        (ck / "norm_stats.json").unlink()
    src = PolicySource(str(ck))
    plan = SweepPlan(db=str(tmp_path / "x.db"), env="fake", tasks=("reach",), episodes=1, progress=False,
                     env_kw={"max_steps": 6, "radius": 0.0})
    new, old = sw.policy_identity(src), sw.policy_identity(src, era)
    assert old != new
    orig = sw.policy_identity
    with monkeypatch.context() as m:  # the kvreuse that wrote the DB
        m.setattr(sw, "policy_identity", lambda s, e=era: orig(s, min(e, era)))
        assert run_sweep(plan, src).ran == 1

    def stored():
        with ResultStore(plan.db) as st:
            return {r["policy"]: [dict(e) for e in st.episodes(r["id"])] for r in st.settings()}

    kept = stored()
    assert list(kept) == [old]
    capsys.readouterr()
    assert run_sweep(plan, src).ran == 1
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and "Traceback" not in err
    assert (f"note: {plan.db} holds 1 of these settings under the policy id {old}, recorded before policy ids "
            f"named {sw.ID_CHANGES[era][0]}") in err
    assert stored()[old] == kept[old] and set(stored()) == {old, new}
    assert run_sweep(plan, src).skipped == 1  # continued under its own id: no note
    assert "holds" not in capsys.readouterr().err


def test_metaworld_training_layouts_get_a_note(tmp_path, monkeypatch, capsys):
    import kvreuse.eval.sweep as sw
    from kvreuse.envs.metaworld import MetaWorldEnv
    from kvreuse.eval.envs import training_layouts_note

    eps = episode_list(MetaWorldEnv(render=False), ("reach-v3", "push-v3"), 3, init_start=48)
    assert training_layouts_note("metaworld", eps).startswith("note: 2 of the 6 episodes use Meta-World init ids >= 50")
    assert training_layouts_note("metaworld", eps[:4]) is None  # ids 48, 49: held out
    assert training_layouts_note("fake", eps) is None
    pytest.importorskip("metaworld")
    monkeypatch.setattr(sw, "make_policy", lambda model, transform, reuse: StubPolicy())
    plan = SweepPlan(db=str(tmp_path / "m.db"), env="metaworld", tasks=("reach-v3",), episodes=1, init_start=50,
                     workers=0, progress=False, max_steps=1, env_kw={"image_size": 32})
    assert run_sweep(plan, PolicySource(None, "tiny-pi05")).ran == 1
    assert "note: 1 of the 1 episodes use Meta-World init ids >= 50 (up to 50)" in capsys.readouterr().err


def test_an_episode_list_past_the_last_init_state_gets_a_note(tmp_path, capsys):
    """Init ids wrap round past a task's last one (LIBERO has 50): more episodes than init states
    repeat init states with other noise seeds, which the report counts as new episodes: a note says
    so. Ids that only wrap (48, 49, 0) are all distinct: no note."""
    plan = SweepPlan(db=str(tmp_path / "w.db"), env="fake", tasks=("reach",), episodes=3, init_start=48,
                     workers=0, progress=False, env_kw={"max_steps": 1})
    run_sweep(plan, PolicySource(None, "tiny-pi0"))
    assert "wrap round" not in capsys.readouterr().err
    run_sweep(replace(plan, episodes=51), PolicySource(None, "tiny-pi0"))
    assert ("note: 51 episodes per task, more than the 50 init states of 1 task(s): the ids wrap round, so some "
            "episodes repeat an init state") in capsys.readouterr().err


def test_non_finite_or_misshapen_actions_are_a_policy_error_not_an_env_error():
    """The env refuses such an action; caught as an env crash, every such episode used to be an
    'error' (left out of n) and the sweep went on."""
    class Bad(StubPolicy):
        def __init__(self, fill=np.nan, dim=4):
            super().__init__()
            self.fill, self.dim = fill, dim

        def infer(self, raw, noise=None):
            a, rec = super().infer(raw, noise)
            a = np.zeros((a.shape[0], self.dim))
            a[1:] = self.fill  # the second action
            return a, rec

    with pytest.raises(ValueError, match=r"non-finite action \[nan, nan, nan, nan\] at step 1 of 'reach' init 2"):
        run_episode(Bad(), FakeEnv(radius=0.0), "reach", 2, seed=0)
    with pytest.raises(ValueError, match="non-finite action"):
        run_episode(Bad(np.inf), FakeEnv(radius=0.0), "reach", 2, seed=0)
    with pytest.raises(ValueError, match=r"shape \(8, 7\); expected \(chunk, 4\) for robot 'metaworld'"):
        run_episode(Bad(0.0, dim=7), FakeEnv(radius=0.0), "reach", 2, seed=0)
    r = run_episode(Bad(0.0), FakeEnv(radius=0.0, max_steps=5), "reach", 2, seed=0)
    assert r.status == "failure" and r.steps == 5


def test_unknown_task_points_at_the_likely_one():
    from kvreuse.eval.envs import check_tasks

    hint = r"unknown task\(s\) \['reach far'\] \(did you mean reach-far\?\); valid tasks"
    with pytest.raises(ValueError, match=hint):
        check_tasks(FakeEnv(), ("reach", "reach far"))
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['zzz'\]; valid tasks: reach"):
        check_tasks(FakeEnv(), ("zzz",))

    class Libero90:  # one instruction in two scenes: the hint named one of them
        tasks = ("KITCHEN_SCENE10_close_the_top_drawer_of_the_cabinet",
                 "KITCHEN_SCENE5_close_the_top_drawer_of_the_cabinet", "KITCHEN_SCENE5_open_the_microwave")

    with pytest.raises(ValueError, match=r"did you mean KITCHEN_SCENE10_close_the_top_drawer_of_the_cabinet, "
                                         r"KITCHEN_SCENE5_close_the_top_drawer_of_the_cabinet\?"):
        check_tasks(Libero90(), ("close the top drawer of the cabinet",))


def test_without_a_checkpoint_the_robot_picks_shipped_or_random(tmp_path, capsys):
    """As `--preset`'s help says: the fake env drives the Meta-World robot, so it runs the shipped
    testbed policy of the preset, as metaworld does; LIBERO (none shipped) gets random weights."""
    from kvreuse.envs.fake import FakeEnv
    from kvreuse.envs.libero import LiberoEnv
    from kvreuse.eval.sweep import shipped_checkpoint

    for name in ("tiny-pi05", "tiny-pi0"):
        shipped = str(shipped_checkpoint(name))
        assert PolicySource(None, name).resolved(FakeEnv.robot).checkpoint == shipped
        assert PolicySource(None, name).resolved("metaworld").checkpoint == shipped
        assert PolicySource(None, name).resolved(LiberoEnv.robot).checkpoint is None
    plan = SweepPlan(db=str(tmp_path / "f.db"), env="fake", tasks=("reach",), episodes=1, workers=0, progress=False,
                     env_kw={"max_steps": 2})
    assert run_sweep(plan, PolicySource(None, "tiny-pi0")).settings[0].policy.startswith("testbed-pi0@")
    assert "randomly initialised" not in capsys.readouterr().err
