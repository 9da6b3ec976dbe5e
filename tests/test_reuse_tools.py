"""Observation streams, compare tools, Policy construction/forking/stats, the compare CLI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reuse import SIZE, model_and_tf, raw_obs

from kvreuse.policy import Policy
from kvreuse.reuse.compare import chunk_similarity, compare_actions, compare_deterministic
from kvreuse.reuse.config import ReuseConfig
from kvreuse.reuse.stream import ObservationStream, synthetic_stream

torch.set_num_threads(1)


def test_stream_round_trip(tmp_path, monkeypatch):
    s = synthetic_stream(steps=3, episodes=2, size=SIZE, seed=1)
    s.steps[1].raw["episode_info"] = {"task": "x", "n": 3}  # non-array values travel as JSON
    path = s.save(tmp_path / "s.safetensors")
    back = ObservationStream.load(path)
    assert len(back) == 6 and back.episodes == 2 and back.robot == "metaworld" and back.meta["seed"] == 1
    for a, b in zip(s, back):
        assert a.reset == b.reset and a.raw["prompt"] == b.raw["prompt"]
        for k, v in a.raw.items():
            if isinstance(v, np.ndarray):
                assert b.raw[k].dtype == v.dtype and np.array_equal(b.raw[k], v)
    assert back.steps[1].raw["episode_info"] == {"task": "x", "n": 3}
    # A step without a prompt (a policy's default prompt answered it) comes back without one: it was
    # replayed with "", which the transform refuses, instead of the default
    del s.steps[2].raw["prompt"]
    back = ObservationStream.load(s.save(tmp_path / "d.safetensors"))
    assert "prompt" not in back.steps[2].raw and back.steps[3].raw["prompt"] == s.steps[3].raw["prompt"]
    import os

    umask = os.umask(0o022)
    try:  # the usual mode for a new file, not safetensors' 0600, so a shared results folder can read it
        assert os.stat(s.save(tmp_path / "m.safetensors")).st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)
    # written whole or not at all: a save that fails leaves neither a torn file nor its part file
    import safetensors.numpy

    def torn(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", torn)
    with pytest.raises(OSError, match="disk full"):
        s.save(tmp_path / "t.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "m.safetensors", "s.safetensors"]


def test_stream_bad_files(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(ValueError, match="no such file"):
        ObservationStream.load(tmp_path / "missing.safetensors")
    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a kvreuse observation stream"):
        ObservationStream.load(tmp_path / "other.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=re.escape(f"stream {junk}: unreadable (")):  # the file and why, one line
        ObservationStream.load(junk)


def test_synthetic_stream_has_pauses_and_motion():
    s = synthetic_stream(steps=15, episodes=1, size=SIZE, seed=0)
    same = [np.array_equal(a.raw["observation/image"], b.raw["observation/image"]) for a, b in zip(s.steps, s.steps[1:])]
    assert any(same) and not all(same)


def test_compare_actions_baseline_vs_itself_and_vs_reuse():
    m, tf = model_and_tf("pi05")
    base = Policy(m, tf)
    stream = synthetic_stream(steps=6, episodes=2, size=SIZE, seed=0)
    same = compare_actions(base, base.fork(ReuseConfig()), stream, seed=3)
    assert same.cosine == [1.0] * 12 and same.l2 == [0.0] * 12 and same.summary()["reuse_rate"] == 0.0
    assert same.summary()["cos_mean_on_reuse"] is None  # nothing reused: no figure, not a made-up 1.0
    res = compare_actions(base, base.fork(ReuseConfig(gate="always")), stream, seed=3)
    s = res.summary()
    assert s["calls"] == 12 and s["reuse_rate"] == pytest.approx(10 / 12)  # first call of each episode refreshes
    assert res.l2[0] == 0.0 and res.l2[6] == 0.0  # episode starts are fresh
    assert max(res.l2) > 0
    on_reuse = [c for c, d in zip(res.cosine, res.decisions, strict=True) if d == "reuse"]
    assert s["cos_mean_on_reuse"] == pytest.approx(np.mean(on_reuse))


def test_chunk_similarity():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert chunk_similarity(a, a) == (1.0, 0.0)
    c, d = chunk_similarity(a, -a)
    assert c == pytest.approx(-1.0) and d == pytest.approx(2 * 2**0.5)


def test_compare_deterministic_passes():
    m, tf = model_and_tf("pi0")
    checks = compare_deterministic(Policy(m, tf), synthetic_stream(steps=3, episodes=2, size=SIZE), seed=0)
    assert len(checks) == 3 and all(c.identical and c.max_abs_diff == 0.0 for c in checks)
    batched = synthetic_stream(steps=2, episodes=1, size=SIZE)
    for st in batched:  # a batch axis of one: Policy.infer keeps it, and so must the expectation
        st.raw = {k: (v[None] if isinstance(v, np.ndarray) else [v]) for k, v in st.raw.items()}
    checks = compare_deterministic(Policy(m, tf), batched, seed=0)
    assert all(c.identical and c.max_abs_diff == 0.0 for c in checks)


def test_compare_deterministic_catches_a_difference(monkeypatch):
    """If the reuse-off path computed anything differently, the check must fail."""
    m, tf = model_and_tf("pi0")
    pol = Policy(m, tf)
    orig = pol.runner.__class__.infer

    def off_by_a_bit(self, obs, noise, *a, **k):
        out, rec = orig(self, obs, noise, *a, **k)
        return out + 1e-6, rec

    monkeypatch.setattr(pol.runner.__class__, "infer", off_by_a_bit)
    checks = compare_deterministic(pol, synthetic_stream(steps=2, episodes=1, size=SIZE), seed=0)
    assert checks[0].identical and not checks[1].identical and checks[1].max_abs_diff > 0


def test_never_gate_builds_no_reference_and_reads_valid_rows_on_demand():
    """Reuse off compares nothing with a signal reference and reads the cache's valid rows (a host
    sync on a GPU) only when asked; what it reads then is the cache's own mask."""
    m, tf = model_and_tf("pi05")
    pol = Policy(m, tf, reuse=ReuseConfig())
    for seed in range(2):
        _, rec = pol.infer(raw_obs(np.random.default_rng(seed)))
        run = pol.runner
        assert run.ref is None and not rec.mixed and run._valid_rows is None
    assert torch.equal(run.valid_rows, run.cache.mask.any(0).cpu())


def test_fork_shares_the_model_not_the_cache():
    m, tf = model_and_tf("pi0")
    a = Policy(m, tf, reuse=ReuseConfig(gate="always"))
    b = a.fork()
    assert b.model is a.model and b.reuse_config == a.reuse_config
    raw = raw_obs(np.random.default_rng(0))
    a.infer(raw)
    _, rec = b.infer(raw)
    assert rec.decision == "refresh" and "episode start" in rec.reason
    assert not set(rec.snapshots) & set(a.runner.cache.snapshots)


def test_stats_aggregate_reuse_rate_and_latency():
    m, tf = model_and_tf("pi0")
    pol = Policy(m, tf, reuse=ReuseConfig(gate="period", period=2))
    raw = raw_obs(np.random.default_rng(0))
    recs = [pol.infer(raw)[1] for _ in range(6)]
    assert [r.decision for r in recs] == ["refresh", "reuse"] * 3
    s = pol.stats.summary()
    assert s["calls"] == 6 and s["reuse_rate"] == 0.5
    assert s["p50_ms"] <= s["p95_ms"] and s["hz"] == pytest.approx(1e3 / s["mean_ms"])
    assert all(set(r.timings) >= {"vision", "prefix", "denoise", "total"} for r in recs)
    assert recs[1].timings["vision"] == 0.0 and recs[0].timings["vision"] > 0.0


def test_from_checkpoint(tmp_path):
    from kvreuse.checkpoint import save_checkpoint

    m, tf = model_and_tf("pi05")
    save_checkpoint(tmp_path / "ck", m, None, robot="metaworld")
    pol = Policy.from_checkpoint(tmp_path / "ck", reuse=ReuseConfig(gate="always"))
    raw = raw_obs(np.random.default_rng(0))
    n = m.make_noise(1, torch.Generator().manual_seed(0))
    a, _ = pol.infer(raw, n.clone())
    assert np.array_equal(a, Policy(m, tf).infer(raw, n.clone())[0])
    assert pol.reuse_config.gate == "always" and pol.transform.spec.name == "metaworld"


def test_compare_cli(capsys):
    from kvreuse.cli import main

    main(["compare", "deterministic", "--preset", "tiny-pi0", "--steps", "2", "--episodes", "1"])
    assert "all bit-identical" in capsys.readouterr().out
    main(["compare", "actions", "--preset", "tiny-pi0", "--steps", "3", "--episodes", "1", "--gate", "always"])
    out = capsys.readouterr().out
    assert "reuse rate 66.7%" in out and "cosine mean" in out
    with pytest.raises(SystemExit) as e:
        main(["compare", "actions", "--threshold", "1.5", "--steps", "1", "--episodes", "1"])
    assert e.value.code == 2
    assert "reuse.threshold" in capsys.readouterr().err


def test_policy_records_a_replayable_stream(tmp_path):
    m, tf = model_and_tf("pi0")
    pol = Policy(m, tf)
    pol.recorder = ObservationStream(robot="metaworld")
    rng = np.random.default_rng(0)
    noises = [m.make_noise(1, torch.Generator().manual_seed(i)) for i in range(4)]
    outs = []
    for i in range(4):
        if i == 2:
            pol.reset()
        outs.append(pol.infer(raw_obs(rng), noises[i].clone())[0])
    back = ObservationStream.load(pol.recorder.save(tmp_path / "rec.safetensors"))
    assert [s.reset for s in back] == [True, False, True, False]
    replay = Policy(m, tf)
    for step, n, a in zip(back, noises, outs):
        if step.reset:
            replay.reset()
        assert np.array_equal(replay.infer(step.raw, n.clone())[0], a)
    # The policy's own noise: each episode restarts its generator from the seed, which the recording
    # keeps (without it a replay's one generator ran on: other noise from the second episode on)
    from kvreuse.reuse.compare import StreamNoise

    pol = Policy(m, tf, seed=5)
    pol.recorder, outs = ObservationStream(robot="metaworld"), []
    for i in range(4):
        if i == 2:
            pol.reset()
        outs.append(pol.infer(raw_obs(rng))[0])
    back = ObservationStream.load(pol.recorder.save(tmp_path / "own.safetensors"))
    assert [s.seed for s in back] == [5, None, 5, None]
    replay, noise = Policy(m, tf), StreamNoise(m, seed=0)
    for step, a in zip(back, outs, strict=True):
        if step.reset:
            replay.reset()
        assert np.array_equal(replay.infer(step.raw, noise(step, tf))[0], a)


def test_load_streams_from_a_folder(tmp_path):
    """A folder of streams replays as one, in path order, each file starting an episode; one robot only."""
    from kvreuse.reuse.stream import load_streams

    a = synthetic_stream(steps=3, episodes=1, size=SIZE, seed=0)
    b = synthetic_stream(steps=2, episodes=2, size=SIZE, seed=1)
    b.steps[0].reset = False  # a recording that did not mark its start
    a.save(tmp_path / "d" / "x" / "a.safetensors")
    b.save(tmp_path / "d" / "b.safetensors")
    both = load_streams(tmp_path / "d")
    assert len(both) == 7 and [s.reset for s in both] == [True, False, True, False, True, False, False]
    first = both.steps[0].raw["observation/image"]
    assert np.array_equal(first, b.steps[0].raw["observation/image"])  # b.safetensors comes first
    assert load_streams(tmp_path / "d" / "b.safetensors").steps[0].reset is False  # a file alone is as recorded
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        load_streams(tmp_path / "empty")
    synthetic_stream(steps=1, episodes=1, size=SIZE, robot="libero", state_dim=8).save(tmp_path / "d" / "c.safetensors")
    with pytest.raises(ValueError, match="several robots"):
        load_streams(tmp_path / "d")


def test_a_saved_folder_keeps_each_episodes_noise_seed(tmp_path):
    """`eval --streams` files carry their episode's seed in their meta; a folder loaded as one stream and
    saved (`--save-stream`) lost them, so its replay drew other noise (other decisions under a phase gate)."""
    from kvreuse.reuse.stream import ObservationStream, load_streams

    for i, seed in enumerate((11, 22)):
        s = synthetic_stream(steps=2, episodes=1, size=SIZE, seed=i)
        s.meta = {"setting": "x", "seed": seed}
        s.save(tmp_path / "d" / f"{i}.safetensors")
    folder = load_streams(tmp_path / "d")
    assert [st.seed for st in folder] == [11, None, 22, None]
    back = ObservationStream.load(folder.save(tmp_path / "all.safetensors"))
    assert [st.seed for st in back] == [11, None, 22, None]


def test_compare_grid_cli(tmp_path, capsys):
    """compare grid: every setting against one baseline replay, in one table whose first row is that
    reference and whose second replays the baseline again (same actions: the spread of the
    speedups); the JSON has both baselines and each setting's summary."""
    import json

    from kvreuse.cli import main

    main(["compare", "grid", "--preset", "tiny-pi0", "--steps", "4", "--episodes", "1",
          "--grid", "gate=always", "gate=period period=2,3", "--json-out", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ")][1:]
    cells = [r.split(" | ") for r in rows]
    assert [c[0] for c in cells] == ["| **baseline** (reference)", "| baseline, replayed again", "| always/full",
                                     "| period(2)/full", "| period(3)/full"]
    assert cells[0][7] == "1.00x" and all(r.endswith("1.00000 / 1.00000 |") for r in rows[:2])
    assert [c[1:4] for c in cells] == [["0.0%", "2.00", "100.0%"], ["0.0%", "2.00", "100.0%"],
                                       ["75.0%", "0.50", "25.0%"], ["50.0%", "1.00", "50.0%"],
                                       ["50.0%", "1.00", "50.0%"]]  # the work columns: 2 cameras
    got = json.load(open(tmp_path / "g.json"))
    assert [s["summary"]["reuse_rate"] for s in got["settings"]] == [0.75, 0.5, 0.5]
    assert got["baseline"]["calls"] == got["baseline_again"]["calls"] == 4
    assert cells[0][4] == f"{got['baseline']['mean_ms']:.2f} ms"  # the table shows what speedups divide by
    for bad, why in ((["gate"], "grid: expected key=v1,v2 items"),
                     (["gate=always gate=never"], "'gate' given twice"),
                     (["gate=never mode=partial"], "never reuses: that is the baseline")):
        with pytest.raises(SystemExit) as e:  # a bad spec stops before the model is built
            main(["compare", "grid", "--preset", "tiny-pi0", "--steps", "1", "--episodes", "1", "--grid", *bad])
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_compare_grid_interrupted_keeps_the_settings_replayed(tmp_path, monkeypatch, capsys, fail_on_call):
    """Ctrl-C in a long grid: the settings already replayed are in --json-out (marked incomplete)
    and in a table, and the one-line message says how many; before, the JSON was never written."""
    import json
    import signal

    import kvreuse.reuse.compare as rc
    from kvreuse.cli import main

    # calls 1-2: the two baseline rows, 3: the first setting; Ctrl-C in the fourth (the second setting)
    monkeypatch.setattr(rc, "compare_actions", fail_on_call(rc.compare_actions, 4, KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        main(["compare", "grid", "--preset", "tiny-pi0", "--steps", "4", "--episodes", "1",
              "--grid", "gate=always", "gate=period period=2,3", "--json-out", str(tmp_path / "g.json")])
    assert e.value.code == 128 + signal.SIGINT
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines() == [f"kvreuse: interrupted (1 of 3 settings replayed, written to "
                                            f"{tmp_path / 'g.json'} (\"complete\": false))"]
    got = json.load(open(tmp_path / "g.json"))
    assert got["complete"] is False and got["settings_total"] == 3
    assert [s["label"] for s in got["settings"]] == ["always/full"]
    assert got["settings"][0]["summary"]["reuse_rate"] == 0.75
    assert "| always/full | 75.0%" in cap.out


def test_compare_grid_failing_keeps_the_settings_replayed(tmp_path, monkeypatch, capsys, fail_on_call):
    """An error in a later setting (the policy, the device) lost every setting replayed before it:
    they are in --json-out ("complete": false) and the table, and one error line names the setting."""
    import json

    import kvreuse.reuse.compare as rc
    from kvreuse.cli import main

    # calls 1-2: the two baseline rows, 3: the first setting; the fourth (the second setting) fails
    monkeypatch.setattr(rc, "compare_actions", fail_on_call(rc.compare_actions, 4, RuntimeError("CUDA out of memory")))
    with pytest.raises(SystemExit) as e:
        main(["compare", "grid", "--preset", "tiny-pi0", "--steps", "4", "--episodes", "1",
              "--grid", "gate=always", "gate=period period=2,3", "--json-out", str(tmp_path / "g.json")])
    assert e.value.code == 1  # not bad input: the traceback, then one line saying what was kept
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-2] == "RuntimeError: CUDA out of memory", err
    assert err[-1] == (
        "kvreuse: error: grid: setting period(2)/full: RuntimeError: CUDA out of memory (1 of 3 settings "
        f"replayed, written to {tmp_path / 'g.json'} (\"complete\": false))")
    got = json.load(open(tmp_path / "g.json"))
    assert got["complete"] is False and [s["label"] for s in got["settings"]] == ["always/full"]
    assert "| always/full | 75.0%" in cap.out


def test_compare_modes_refuses_the_never_gate_before_any_work(monkeypatch, capsys):
    """compare modes under `--gate never` would print seven identical baseline rows, all labelled
    'never': one error line instead, before the model is built."""
    import kvreuse.reuse.cli as rcli
    from kvreuse.cli import main

    monkeypatch.setattr(rcli, "load", lambda src: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as e:
        main(["compare", "modes", "--gate", "never"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "gate: 'never' never reuses" in err[0], err


def test_compare_source_builds_a_full_size_preset_for_the_streams_robot(monkeypatch):
    """A random full-size preset is made by bench.build_random in the asked dtype over the robot's
    cameras and dims, with the byte tokenizer standing in for PaliGemma's, never the shipped tiny
    policy (a tiny model stands in for the 3B one here)."""
    import kvreuse.bench
    from kvreuse.model import Pi0Model, preset
    from kvreuse.reuse.cli import Source, load

    made = []

    def build(cfg, device, dtype, seed=0):
        made.append((cfg, device, dtype))
        small = preset("tiny-pi0").replace(cameras=cfg.cameras, tokenizer=cfg.tokenizer)
        return Pi0Model(small).to(device, dtype).eval()

    monkeypatch.setattr(kvreuse.bench, "build_random", build)
    pol, stream, what = load(Source(preset="pi0", dtype="bfloat16", steps=2, episodes=1))
    (cfg, device, dtype), = made
    assert cfg.llm.width == 2048 and cfg.cameras == ("base", "wrist") and cfg.tokenizer == "bytes"
    assert (cfg.state_dim, cfg.action_dim, device, dtype) == (4, 4, "cpu", torch.bfloat16)
    assert "random pi0" in what and "byte tokenizer standing in" in what and "bfloat16" in what
    assert pol.infer(stream.steps[0].raw)[0].shape == (16, 4)
    assert pol.transform.stats is None
    with pytest.raises(ValueError, match="dtype"):
        load(Source(preset="pi0", dtype="float16"))
    # --stats-from: the recording policy's normalisation (the cross-modal gate compares normalised states)
    from kvreuse.assets import default_checkpoint
    from kvreuse.checkpoint import load_norm_stats

    ck = default_checkpoint("pi0")
    pol, _, what = load(Source(preset="pi0", dtype="bfloat16", steps=1, episodes=1, stats_from=str(ck)))
    want = load_norm_stats(ck)
    assert np.array_equal(pol.transform.stats.state.mean, want.state.mean) and f"norm stats of {ck}" in what
    with pytest.raises(ValueError, match="stats_from: only for a random full-size model .*brings its own$"):
        load(Source(checkpoint=str(ck), stats_from=str(ck)))
    with pytest.raises(ValueError, match=f"without --checkpoint, tiny-pi0 runs the shipped {ck}"):
        load(Source(preset="tiny-pi0", stats_from=str(ck)))


def test_compare_says_when_a_stream_folder_holds_several_eval_settings(tmp_path, capsys):
    """`compare grid --stream runs/streams` (the folder the docs replay) after `kvreuse eval --streams 1
    --with-baseline --reuse ...` replayed both settings' recordings as one stream, every episode twice,
    without a word."""
    from kvreuse.cli import main

    for key in ("aaaa", "bbbb"):
        st = synthetic_stream(steps=2, episodes=1, size=SIZE, seed=0)
        st.meta = {"setting": key, "task": "reach"}
        st.save(tmp_path / "streams" / key / "reach_0_1.safetensors")
    main(["compare", "grid", "--stream", str(tmp_path / "streams"), "--grid", "gate=always", "--threads", "1"])
    err = capsys.readouterr().err
    assert "holds the recordings of 2 eval settings (aaaa, bbbb)" in err
    main(["compare", "grid", "--stream", str(tmp_path / "streams" / "aaaa"), "--grid", "gate=always", "--threads", "1"])
    assert "note:" not in capsys.readouterr().err


def test_compare_notes_a_replay_through_other_weights_than_recorded_them(tmp_path, capsys):
    """An eval stream replayed without the eval's --preset ran through the other shipped policy (other
    norm stats, other decisions) without a word; the stream now names the weights that ran."""
    from kvreuse.cli import main
    from kvreuse.eval.sweep import PolicySource, SweepPlan, run_sweep

    plan = SweepPlan(db=str(tmp_path / "s.db"), env="fake", tasks=("reach",), episodes=1, workers=0, streams=1,
                     stream_dir=str(tmp_path / "streams"), progress=False, env_kw={"max_steps": 3}, replan=3)
    run_sweep(plan, PolicySource(None, "tiny-pi0"))
    capsys.readouterr()
    for preset, noted in (("tiny-pi05", True), ("tiny-pi0", False)):
        main(["compare", "actions", "--stream", str(tmp_path / "streams"), "--preset", preset, "--threads", "1"])
        err = capsys.readouterr().err
        assert ("was recorded through testbed-pi0@" in err and "replayed through testbed-pi05@" in err) == noted, err
    # a checkpoint folder whose name holds a "+" (a policy id joins its tags with "+")
    import shutil
    from dataclasses import replace

    from kvreuse.assets import shipped_checkpoint

    ck = shutil.copytree(shipped_checkpoint("tiny-pi0"), tmp_path / "pi0+ft")
    run_sweep(replace(plan, db=str(tmp_path / "t.db"), stream_dir=str(tmp_path / "s2")),
              PolicySource(str(ck), "tiny-pi0"))
    capsys.readouterr()
    main(["compare", "actions", "--stream", str(tmp_path / "s2"), "--checkpoint", str(ck), "--threads", "1"])
    assert "note: stream" not in capsys.readouterr().err


def test_compare_replays_a_stream_file_whose_meta_is_not_a_dict(tmp_path):
    """A stream file's meta is any JSON it recorded: compare read .get("settings") of a list and
    stopped on an AttributeError traceback."""
    from kvreuse.reuse.cli import Source, load

    st = synthetic_stream(steps=2, episodes=1, size=SIZE, seed=0)
    st.meta = ["another tool's", 1]
    st.save(tmp_path / "s.safetensors")
    _, stream, _ = load(Source(stream=str(tmp_path / "s.safetensors")))
    assert len(stream) == 2 and stream.meta == ["another tool's", 1]


def test_compare_loads_reference_checkpoints_and_libero_streams(tmp_path, capsys):
    """A reference (openpi) checkpoint names no robot: compare gives it the stream's; a LIBERO
    stream without a checkpoint gets a random tiny model over LIBERO's cameras and dims (the
    shipped policies drive Meta-World only)."""
    from kvreuse.cli import main
    from kvreuse.model import Pi0Model, preset
    from kvreuse.ref_checkpoint import save_reference

    torch.manual_seed(0)
    ref = save_reference(tmp_path / "ref", Pi0Model(preset("tiny-pi0")).eval(), "openpi").parent
    main(["compare", "deterministic", "--checkpoint", str(ref), "--steps", "2", "--episodes", "1"])
    assert "all bit-identical" in capsys.readouterr().out
    stream = synthetic_stream(steps=3, episodes=1, size=SIZE, robot="libero", state_dim=8)
    stream.save(tmp_path / "libero.safetensors")
    main(["compare", "grid", "--stream", str(tmp_path / "libero.safetensors"), "--preset", "tiny-pi0",
          "--grid", "gate=always"])
    out = capsys.readouterr().out
    assert "random tiny-pi0" in out and "| always/full | 66.7% |" in out


def test_compare_refuses_empty_streams_and_bad_outputs_before_the_model(tmp_path, monkeypatch, capsys):
    from kvreuse.cli import main

    ObservationStream(robot="metaworld").save(tmp_path / "empty.safetensors")
    monkeypatch.setattr("kvreuse.policy.Policy.from_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    cases = [(["deterministic", "--steps", "0"], "steps, episodes: the synthetic stream needs >= 1 of each"),
             (["actions", "--episodes", "0"], "steps, episodes: the synthetic stream needs >= 1 of each"),
             (["deterministic", "--stream", str(tmp_path / "empty.safetensors")], "no steps recorded"),
             (["grid", "--grid"], "grid: no settings given"),
             (["grid", "--json-out", str(tmp_path)], f"json_out {tmp_path}: is a folder"),
             (["actions", "--save-stream", str(tmp_path)], f"save_stream {tmp_path}: is a folder"),
             (["grid", "--grid", "gate=always threshold=0.9"], "grid: threshold has no effect with gate always")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(["compare", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], (argv, err)


def test_compare_grid_runs_a_setting_once_and_says_n_a_without_timed_calls(capsys):
    from kvreuse.cli import main
    from kvreuse.eval.sweep import canonical_grid

    assert canonical_grid([{"gate": "threshold", "threshold": 0.985}, {"gate": "threshold"}]) == [
        ({"gate": "threshold"}, "threshold(raw>=0.985)/full")]
    main(["compare", "grid", "--preset", "tiny-pi0", "--steps", "1", "--episodes", "1",
          "--grid", "gate=threshold threshold=0.985", "gate=threshold"])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ")][1:]
    assert len(rows) == 3 and rows[2].startswith("| threshold(raw>=0.985)/full |")
    assert "| n/a | n/a | n/a | n/a | 1 | 1 |" in rows[0]  # the one baseline call was a warm-up
    assert "0.00 ms" not in out and "nanx" not in out and "(n/a: every call of that replay was a warm-up" in out


def test_compare_names_a_streams_missing_camera_and_info_a_stream(tmp_path, capsys):
    from kvreuse.cli import main

    s = synthetic_stream(2, 1, SIZE, 0)
    for st in s:
        del st.raw["observation/wrist_image"]
    s.save(tmp_path / "s.safetensors")
    with pytest.raises(SystemExit):
        main(["compare", "actions", "--preset", "tiny-pi0", "--stream", str(tmp_path / "s.safetensors")])
    assert "no ['observation/wrist_image']; the policy's robot 'metaworld' has cameras" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", str(tmp_path / "s.safetensors")])
    assert "a kvreuse observation stream, not a checkpoint" in capsys.readouterr().err


def test_compare_checks_every_setting_against_the_model_before_any_replay(monkeypatch, capsys):
    """A grid setting or a mode the model refuses (a layer split past its depth, a downsample past
    its images) failed only when its turn came: after the baseline's two replays (grid) or four
    modes' (whose table was then lost). One error line naming it now comes before any replay."""
    import kvreuse.reuse.compare as rc
    from kvreuse.cli import main

    fail = lambda *a, **k: pytest.fail("replayed before the bad setting was refused")  # noqa: E731
    monkeypatch.setattr(rc, "replay", fail)
    monkeypatch.setattr(rc, "compare_actions", fail)
    src = ["--preset", "tiny-pi0", "--steps", "2", "--episodes", "1"]
    for argv, msg in (
        (["grid", "--grid", "gate=always", "gate=always mode=layer_wise layer_split=100"],
         "grid: setting always/layer_wise(100): reuse.layer_split: expected 1 <= split <"),
        (["grid", "--grid", "gate=threshold downsample=1000"],
         "grid: setting threshold(raw>=0.985)/full,downsample=1000: reuse.downsample: 1000 exceeds the model's"),
        (["modes", "--layer-split", "100"], "modes: layer_wise: reuse.layer_split: expected 1 <= split <"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["compare", *argv, *src])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], (argv, err)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_compare_modes_stopped_keeps_the_rows_replayed(monkeypatch, capsys, stop, fail_on_call):
    """Ctrl-C or an error in the fourth of compare modes' seven replays printed nothing of the three
    made (the table was printed only whole): they are printed, and one line says how many."""
    import kvreuse.reuse.compare as rc
    from kvreuse.cli import main

    monkeypatch.setattr(rc, "compare_actions", fail_on_call(rc.compare_actions, 4, stop("stopped")))
    with pytest.raises(SystemExit) as e:
        main(["compare", "modes", "--gate", "always", "--preset", "tiny-pi0", "--steps", "3", "--episodes", "1"])
    cap = capsys.readouterr()
    rows = [ln.split(" | ")[0] for ln in cap.out.splitlines() if ln.startswith("| ")][1:]
    assert rows == ["| never", "| always/full", "| always/vision_only"], cap.out
    kept = "3 of 7 rows replayed, in the table above"
    if stop is KeyboardInterrupt:
        assert e.value.code == 130 and cap.err.strip().splitlines() == [f"kvreuse: interrupted ({kept})"]
    else:
        assert e.value.code == 1 and cap.err.strip().splitlines()[-1] == (
            f"kvreuse: error: modes: state_only: RuntimeError: stopped ({kept})")


def test_compare_checks_the_stream_and_stats_before_a_model_is_made(tmp_path, monkeypatch):
    """Norm stats of another robot (--stats-from), a stream of another robot or one whose later
    file lacks a camera were refused only after the model was made or loaded (a random full-size
    one: 12 GB and half a minute on a CPU; the camera of a later file: mid-replay)."""
    import kvreuse.bench
    from kvreuse.assets import default_checkpoint
    from kvreuse.reuse.cli import Source, load

    monkeypatch.setattr(kvreuse.bench, "build_random", lambda *a, **k: pytest.fail("the model was made"))
    monkeypatch.setattr(Policy, "from_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    synthetic_stream(2, 1, SIZE, robot="libero", state_dim=8).save(tmp_path / "libero.safetensors")
    with pytest.raises(ValueError, match=r"^stats_from .*: norm stats: the state stats have 4 dims, robot 'libero'"):
        load(Source(preset="pi05", stream=str(tmp_path / "libero.safetensors"),
                    stats_from=str(default_checkpoint("pi05"))))
    with pytest.raises(ValueError, match="recorded for robot 'libero', the policy drives 'metaworld'"):
        load(Source(checkpoint=str(default_checkpoint("pi05")), stream=str(tmp_path / "libero.safetensors")))
    (tmp_path / "mw").mkdir()
    synthetic_stream(2, 1, SIZE).save(tmp_path / "mw" / "a.safetensors")
    s = synthetic_stream(2, 1, SIZE)
    for st in s:
        del st.raw["observation/wrist_image"]
    s.save(tmp_path / "mw" / "b.safetensors")
    with pytest.raises(ValueError, match=r"no \['observation/wrist_image'\] at step 2; the policy's robot"):
        load(Source(checkpoint=str(default_checkpoint("pi05")), stream=str(tmp_path / "mw")))


def test_compare_json_out_is_strict_json_without_timed_calls(tmp_path):
    """A replay with only warm-up calls has no speedup: the JSON said NaN, which is not JSON
    (JavaScript's JSON.parse and older jq refuse the file); it is null now."""
    import json

    from kvreuse.cli import main

    def no_nan(c):
        raise AssertionError(f"{c} in the JSON")

    for cmd in (["grid", "--grid", "gate=always"], ["actions"]):
        out = tmp_path / f"{cmd[0]}.json"
        main(["compare", *cmd, "--preset", "tiny-pi0", "--steps", "1", "--episodes", "1", "--json-out", str(out)])
        got = json.loads(out.read_text(), parse_constant=no_nan)
        summary = got["settings"][0]["summary"] if cmd[0] == "grid" else got["summary"]
        assert summary["speedup"] is None and summary["calls"] == 1


def test_a_bad_observation_names_its_file_and_step(tmp_path, capsys):
    """A folder of streams with one file of another state size: the error named the key only, not
    which of the files (or which step) held it."""
    from kvreuse.cli import main

    (tmp_path / "s").mkdir()
    synthetic_stream(3, 1, SIZE).save(tmp_path / "s" / "a.safetensors")
    synthetic_stream(3, 1, SIZE, state_dim=8).save(tmp_path / "s" / "b.safetensors")
    for cmd in (["actions"], ["deterministic"], ["grid", "--grid", "gate=always"]):
        with pytest.raises(SystemExit) as e:
            main(["compare", *cmd, "--preset", "tiny-pi0", "--stream", str(tmp_path / "s")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert err[0].startswith("kvreuse: error: stream step 3 (b.safetensors step 0): observation/state: "), err
    assert ObservationStream(meta=[]).where(3) == "step 3"  # a file's meta is any JSON: no AttributeError


def test_stream_with_a_malformed_header_is_one_error(tmp_path):
    """A safetensors file whose 'kvreuse_stream' metadata is JSON but not the stream header (another
    tool's, a hand edit) gave a TypeError / AttributeError traceback."""
    import json

    from safetensors.numpy import save_file

    for i, header in enumerate(([], {"format": "kvreuse-stream", "version": 1, "steps": 5},
                                {"format": "kvreuse-stream", "version": 1, "steps": ["a"]},
                                {"format": "kvreuse-stream", "version": 1, "robot": None, "steps": []})):
        f = tmp_path / f"h{i}.safetensors"
        save_file({"x": np.zeros(1)}, str(f), metadata={"kvreuse_stream": json.dumps(header)})
        with pytest.raises(ValueError, match=re.escape(f"stream {f}: unreadable (")):
            ObservationStream.load(f)


def test_compare_deterministic_cli_fails_on_a_difference(monkeypatch, capsys):
    """The CLI exits 1 when reuse-off is not bit-identical, its FAIL lines on stdout and its one
    error line on stderr (it was on stdout, where `2> err` scripts did not see it)."""
    from kvreuse.cli import main
    from kvreuse.reuse.policy import ReusePolicy

    orig = ReusePolicy.infer

    def off_on_the_second_call(self, obs, noise, *a, **k):
        out, rec = orig(self, obs, noise, *a, **k)
        return (out * (1 + 1e-6) if rec.call_index >= 1 else out), rec

    monkeypatch.setattr(ReusePolicy, "infer", off_on_the_second_call)
    with pytest.raises(SystemExit) as e:
        main(["compare", "deterministic", "--preset", "tiny-pi0", "--steps", "3", "--episodes", "1"])
    cap = capsys.readouterr()
    assert e.value.code == 1 and cap.err.strip().splitlines() == ["kvreuse: error: outputs are not bit-identical"]
    assert "FAIL Policy(reuse off) vs sample_actions" in cap.out and "OK   sample_actions twice" in cap.out


def test_compare_tables_escape_a_pipe_in_a_setting_name(capsys):
    """The phase gate's name, "phase(raw>=0.9|0.995)/...", put a bare | in the grid and modes tables'
    rows: rendered, the row split there and every number moved one column right."""
    import re

    from kvreuse.cli import main
    from kvreuse.reuse.config import MODES, ReuseConfig

    main(["compare", "grid", "--preset", "tiny-pi0", "--steps", "2", "--episodes", "1", "--grid", "gate=phase"])
    main(["compare", "modes", "--gate", "phase", "--preset", "tiny-pi0", "--steps", "2", "--episodes", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    cells = [re.split(r"(?<!\\)\|", ln)[1:-1] for ln in lines]  # what a Markdown renderer splits on
    phase = [c for c in cells if c[0].strip().startswith("phase(")]
    assert len(phase) == 1 + len(MODES) and len(phase[0]) == len(cells[0])  # grid's header first
    head_modes = next(c for c in cells if "vision ms" in "".join(c))
    assert all(len(c) == len(head_modes) for c in phase[1:])
    assert phase[0][0].strip() == ReuseConfig(gate="phase").label().replace("|", "\\|")


def test_settings_that_differ_only_in_a_field_the_name_left_out_get_different_names():
    """A sweep over `gate=threshold downsample=16,32` (or a phase cue) stored and printed two rows of
    one name, "threshold(raw>=0.985)/full": nothing told them apart. A field the setting reads away
    from its default is named; fields it does not read, and defaults, add nothing."""
    from kvreuse.eval.sweep import canonical_grid, parse_grid
    from kvreuse.reuse.config import ReuseConfig

    grid = canonical_grid(parse_grid(["gate=threshold downsample=16,32", "gate=phase gripper_delta=0.2,0.5",
                                      "gate=threshold image_metric=patch patch_threshold=0.9,0.99"]))
    names = [name for _, name in grid]
    assert len(grid) == 6 and len(set(names)) == 6, names
    assert "threshold(raw>=0.985)/full,downsample=16" in names and "threshold(raw>=0.985)/full" in names
    assert "phase(raw>=0.985|0.995)/full,gripper_delta=0.2" in names
    assert ReuseConfig(gate="period", period=2, downsample=16).label() == "period(2)/full"  # not read: no name
    assert ReuseConfig(gate="crossmodal", max_age_calls=3).label() == "crossmodal(raw>=0.985,state>=0.99)/full,age<=3"
