"""Testbed training pieces: demo format round trip, augmentation, masked loss, a tiny train run."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kvreuse.envs.metaworld import TRAIN_INIT_START  # noqa: F401  (selects headless GL first)
from kvreuse.train.train import random_shift

pytest.importorskip("metaworld")


def test_random_shift_bounds_and_identity():
    img = torch.randint(0, 256, (3, 20, 24, 3), dtype=torch.uint8)
    same = random_shift(img, 0)
    assert same.shape == (3, 3, 20, 24)
    torch.testing.assert_close(same, img.permute(0, 3, 1, 2).float() / 255)
    shifted = random_shift(img, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == (3, 3, 20, 24) and 0 <= shifted.min() and shifted.max() <= 1
    # the interior of a shifted image is a translated copy of the original
    x = img.permute(0, 3, 1, 2).float() / 255
    found = [any(torch.equal(shifted[i, :, 4:16, 4:20], x[i, :, 4 + dy : 16 + dy, 4 + dx : 20 + dx])
                 for dy in range(-2, 3) for dx in range(-2, 3)) for i in range(3)]
    assert all(found)


def test_masked_loss_matches_model_loss_and_ignores_padding():
    from kvreuse.model import Pi0Model, preset
    from kvreuse.model.tokenizer import load_tokenizer
    from kvreuse.transforms.robot import RobotTransform, robot_spec

    cfg = preset("tiny-pi0")
    torch.manual_seed(0)
    model = Pi0Model(cfg)
    tf = RobotTransform(cfg, load_tokenizer(cfg), None, robot_spec("metaworld"))
    raw = {"observation/image": np.zeros((2, 128, 128, 3), np.uint8),
           "observation/wrist_image": np.zeros((2, 128, 128, 3), np.uint8),
           "observation/state": np.zeros((2, 4)), "prompt": "reach"}
    obs = tf(raw)
    a = torch.randn(2, cfg.chunk_size, cfg.max_action_dim)
    noise, t = torch.randn_like(a), torch.tensor([0.3, 0.7])
    ones = torch.ones(2, cfg.chunk_size)
    full = model.loss(obs, a, noise, t, valid=ones)
    torch.testing.assert_close(full, model.loss(obs, a, noise, t))
    # A fully masked sample contributes nothing: the loss equals that of the other sample alone.
    valid = ones.clone()
    valid[1] = 0
    obs0 = tf({k: (v[:1] if not isinstance(v, str) else v) for k, v in raw.items()})
    torch.testing.assert_close(model.loss(obs, a, noise, t, valid=valid),
                               model.loss(obs0, a[:1], noise[:1], t[:1]))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from kvreuse.train.demos import collect_demos

    out = tmp_path_factory.mktemp("demos")
    collect_demos(str(out), tasks=("button-press-topdown-v3",), demos_per_task=1, image_size=32,
                  max_steps=120, workers=1, counts=("button-press-topdown-v3=2",))  # override -> 2
    return out


def test_demo_counts_bad_entry(tmp_path):
    from kvreuse.train.demos import collect_demos

    for bad, msg in ((("reach-v3",), "expected TASK=N"), (("nosuch-v3=3",), "expected TASK=N with TASK one of"),
                     (("reach-v3=x",), "N must be an integer >= 1, got 'x'"), (("reach-v3=0",), "N must be"),
                     (("reach-v3=-2",), "N must be"), (("reach-v3=2", "reach-v3=3"), "reach-v3 given twice")):
        with pytest.raises(ValueError, match=f"--counts.*{msg}"):
            collect_demos(str(tmp_path), tasks=("reach-v3",), counts=bad)
    for kw, msg in (({"workers": 0}, "--workers must be >= 1"), ({"image_size": 4}, "--image-size must be >= 8"),
                    ({"noise": -1.0}, "--noise .* expected >= 0"), ({"max_steps": 0}, "--max-steps"),
                    ({"parts_per_task": 500}, "--parts-per-task 500: more parts than the 450 training layouts")):
        with pytest.raises(ValueError, match=msg):
            collect_demos(str(tmp_path), tasks=("reach-v3",), **kw)
    assert list(tmp_path.iterdir()) == []


def test_demo_format(demo_dir):
    from kvreuse.train.demos import load_demos

    index = json.loads((demo_dir / "index.json").read_text())
    eps = index["tasks"]["button-press-topdown-v3"]["episodes"]
    assert len(eps) == 2 and all(e["init_id"] >= TRAIN_INIT_START for e in eps)  # never held-out layouts
    d = load_demos(demo_dir)
    assert d.base.shape == (len(d), 32, 32, 3) and d.base.dtype == np.uint8
    assert d.state.shape == (len(d), 4) and d.actions.shape == (len(d), 4)
    assert len(d) == sum(e["length"] for e in eps)
    first_end = eps[0]["start"] + eps[0]["length"]
    assert (d.ep_end[:first_end] == first_end).all() and (d.ep_end[first_end:] == len(d)).all()
    assert np.abs(d.actions).max() <= 1
    with pytest.raises(ValueError, match="not in"):
        load_demos(demo_dir, tasks=("reach-v3",))
    task = next(iter(index["tasks"]))
    assert len(load_demos(demo_dir, tasks=(task, task))) == len(d)  # a repeated task was loaded twice


def test_train_tiny_run_saves_a_loadable_policy(demo_dir, tmp_path, capsys, monkeypatch):
    import kvreuse.model.pi0 as pi0_mod
    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.model.tokenizer import load_tokenizer
    from kvreuse.policy import Policy
    from kvreuse.train.train import _lr_factor, run_train
    from kvreuse.transforms.robot import RobotTransform, robot_spec

    start = []  # the weights training starts from: those of the first model run_train builds

    def recording(cfg, real=pi0_mod.Pi0Model):
        m = real(cfg)
        if not start:
            start.append({k: v.clone() for k, v in m.state_dict().items()})
        return m

    monkeypatch.setattr(pi0_mod, "Pi0Model", recording)  # run_train imports it when called
    out = tmp_path / "ck"
    run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=2, batch_size=2, device="cpu", log_every=100)
    printed = capsys.readouterr().out
    assert "preparing data" in printed and "data ready" in printed and "step      1 " in printed
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # weights readable like the JSON files
    model, stats, meta = load_checkpoint(out)
    assert meta["robot"] == "metaworld" and meta["training"]["steps"] == 2
    assert stats is not None and len(stats.actions.mean) == 4
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, start[0][k])]
    assert len(moved) > 0.9 * len(start[0]), len(moved)  # the optimizer stepped and the saved EMA weights followed
    pol = Policy(model, RobotTransform(model.cfg, load_tokenizer(model.cfg), stats, robot_spec("metaworld")))
    raw = {"observation/image": np.zeros((128, 128, 3), np.uint8), "observation/wrist_image": np.zeros((128, 128, 3), np.uint8),
           "observation/state": np.zeros(4, np.float32), "prompt": "press the button down from the top"}
    actions, _ = pol.infer(raw)
    assert actions.shape == (model.cfg.chunk_size, 4) and np.isfinite(actions).all()

    # An existing checkpoint is refused up front, and an interrupted --overwrite run leaves it whole.
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(ValueError, match="already holds a checkpoint; pass --overwrite"):
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=2, batch_size=2, device="cpu")

    def interrupt(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr("kvreuse.train.train._lr_factor", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=2, batch_size=2, device="cpu",
                  overwrite=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging directory left

    # Interrupted after two steps: `out` still as it was, the EMA weights so far a whole checkpoint
    # beside it (to continue from with --init), and the interrupt says where.
    def interrupt_third(progress, warmup):  # progress = step / steps: stop in the third of 5 steps
        if progress > 2.5 / 5:
            raise KeyboardInterrupt
        return _lr_factor(progress, warmup)

    monkeypatch.setattr("kvreuse.train.train._lr_factor", interrupt_third)
    with pytest.raises(KeyboardInterrupt) as e:
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=5, batch_size=2, device="cpu",
                  overwrite=True)
    kept = tmp_path / "ck.interrupted"
    assert getattr(e.value, "kept", "") == (f"{out} is as it was; the EMA weights after 2 of up to 5 steps are in "
                                            f"{kept}: continue from them with --init {kept} (a new LR schedule) and "
                                            "a --seed other than 0 (the same one would draw this run's batches again)")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ck.interrupted"]
    _, _, meta = load_checkpoint(kept)
    assert meta["training"]["steps"] == 2 and meta["training"]["interrupted"] is True
    assert [json.loads(x)["step"] for x in (kept / "train_log.jsonl").read_text().splitlines()] == [1]
    # Continued from it and stopped again: it is replaced, and its history goes into the new one (its
    # record said only "init: <itself>", with its log and step count gone).
    first = meta["training"]
    with pytest.raises(KeyboardInterrupt):
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=5, batch_size=2, device="cpu",
                  overwrite=True, init=str(kept))
    again = load_checkpoint(kept)[2]["training"]
    assert again["init"] == str(kept.absolute()) and again["init_training"] == first
    log = [json.loads(x) for x in (kept / "train_log.jsonl").read_text().splitlines()]
    assert log == [log[0], {"continued_from": str(kept.absolute()), "init_steps": 2}, log[2]]
    assert log[0]["step"] == log[2]["step"] == 1


def test_train_failing_mid_run_keeps_the_weights_reached(demo_dir, tmp_path, monkeypatch):
    """An error after some steps (the device, a data error on a later batch) lost the EMA weights
    reached: they are kept at OUT.interrupted as on Ctrl-C, and the one error line says where."""
    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.train.train import _lr_factor, run_train

    def fail_third(progress, warmup):  # progress = step / steps: fail in the third of 5 steps
        if progress > 2.5 / 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _lr_factor(progress, warmup)

    monkeypatch.setattr("kvreuse.train.train._lr_factor", fail_third)
    out, kept = tmp_path / "ck", tmp_path / "ck.interrupted"
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access") as e:  # (its traceback kept)
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=5, batch_size=2, device="cpu")
    assert (e.value.what, e.value.kept) == ("train", (  # the CLI's last line (test_cli)
        f"{out} is as it was; the EMA weights after 2 of up to 5 steps are in {kept}: "
        f"continue from them with --init {kept} (a new LR schedule) and a --seed other than 0 "
        "(the same one would draw this run's batches again)"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.interrupted"]  # no staging directory left
    _, _, meta = load_checkpoint(kept)
    assert meta["training"]["steps"] == 2 and meta["training"]["error"].startswith("RuntimeError: CUDA error")


def _fail_third_step(monkeypatch) -> None:
    """The run fails with "boom" at its third learning-rate lookup (one per parameter group a step),
    after a sound step."""
    calls = []

    def fail_third(progress, warmup):
        calls.append(progress)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 1.0

    monkeypatch.setattr("kvreuse.train.train._lr_factor", fail_third)


def test_an_interrupt_after_weights_went_nan_between_loss_reads_keeps_the_last_sound_ema(
        demo_dir, tmp_path, monkeypatch):
    """Past step 49 the loss is read every 10th step: weights gone NaN in between, then Ctrl-C, kept
    nothing ("its EMA weights are not finite") though the EMA at the last finite loss was at hand (an
    error there does the same)."""
    import kvreuse.model.pi0 as pi0
    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.train.train import run_train

    real, calls = pi0.Pi0Model.loss, []

    def loss(self, *a, **k):
        calls.append(1)
        if len(calls) == 53:
            raise RuntimeError("boom")  # (a KeyboardInterrupt takes the same path, then ends pytest too)
        return real(self, *a, **k) * (float("nan") if len(calls) == 51 else 1.0)  # step 51: not read

    monkeypatch.setattr(pi0.Pi0Model, "loss", loss)
    with pytest.raises(RuntimeError, match="boom"):
        run_train(demos=str(demo_dir), out=str(tmp_path / "ck"), preset="tiny-pi0", steps=80, batch_size=2,
                  device="cpu")
    model, _, meta = load_checkpoint(tmp_path / "ck.interrupted")
    assert meta["training"]["steps"] == 49 and all(torch.isfinite(p).all() for p in model.parameters())


def test_weights_gone_nan_after_the_last_loss_read_are_not_saved_as_the_run(demo_dir, tmp_path, monkeypatch):
    """A NaN in the unread steps at the end (past step 49 the loss is read every 10th step) was saved to
    --out with "saved ..." and the last finite loss as its final_loss; the EMA at the last sound read is kept."""
    import kvreuse.model.pi0 as pi0
    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.train.train import run_train

    real, calls = pi0.Pi0Model.loss, []

    def loss(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k) * (float("nan") if len(calls) >= 53 else 1.0)  # steps 53-55: none read

    monkeypatch.setattr(pi0.Pi0Model, "loss", loss)
    out = tmp_path / "ck"
    with pytest.raises(ValueError, match=r"^train: the EMA weights are not finite after step 55 \(the loss, last read "
                                         r"finite at step 50, diverged since"):
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=55, batch_size=2, device="cpu")
    assert not out.exists()
    model, _, meta = load_checkpoint(tmp_path / "ck.interrupted")
    assert meta["training"]["steps"] == 49 and all(torch.isfinite(p).all() for p in model.parameters())


def test_train_stops_when_the_loss_is_not_finite(demo_dir, tmp_path, monkeypatch):
    """A diverged run (here --lr 1e30: the loss is NaN from step 2) trained to the end and saved NaN
    weights to --out as a checkpoint; it stops with one error. The EMA at the last finite loss is kept,
    not one that holds the weights whose loss was not finite: lr 1e30's step-1 weights were finite but
    gave NaN actions, and the EMA kept with them could not be continued from (it was, with its NaN
    final loss in config.json). A NaN before any sound step keeps nothing."""
    import kvreuse.model.pi0 as pi0
    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.train.train import run_train

    out, kept = tmp_path / "ck", tmp_path / "ck.interrupted"
    with pytest.raises(ValueError, match=r"^train: the loss is not finite at step 2 \(training diverged; try a "
                       rf"lower --lr\) \({out} is as it was; nothing of this run was kept \(no step before"):
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=4, batch_size=2, device="cpu", lr=1e30)
    assert list(tmp_path.iterdir()) == []
    real, calls = pi0.Pi0Model.loss, []

    def loss(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k) * (float("nan") if len(calls) % 4 == 0 else 1.0)  # each run's 4th batch

    monkeypatch.setattr(pi0.Pi0Model, "loss", loss)
    # (a run not continued from ck.interrupted leaves it as it is: a restart stopped after a step
    # replaced a long run's weights)
    for name in ("ck.interrupted", "ck.interrupted-1"):
        with pytest.raises(ValueError, match=r"^train: the loss is not finite at step 4 .*after 2 of up to 8 steps are "
                           r"in "
                           + re.escape(f"{tmp_path / name}: continue from them with --init {tmp_path / name}")):
            run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=8, batch_size=2, device="cpu")
    model, _, meta = load_checkpoint(f"{kept}-1")
    assert meta["training"]["steps"] == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(meta["training"]["final_loss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.interrupted", "ck.interrupted-1"]
    monkeypatch.setattr(pi0.Pi0Model, "loss", real)  # a run continued from it replaces it
    _fail_third_step(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=8, batch_size=2, device="cpu",
                  init=f"{kept}-1")
    assert "boom" in load_checkpoint(f"{kept}-1")[2]["training"]["error"]  # this run's, in place of the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.interrupted", "ck.interrupted-1"]


def test_train_prints_progress_at_least_once_a_minute(demo_dir, tmp_path, capsys, monkeypatch):
    """Slow steps (a CPU: ~5 s each at batch 16) with the default --log-every 200 printed nothing
    for over 15 minutes after step 1; the log file keeps its --log-every cadence."""
    import kvreuse.train.train as tr

    clock = iter(range(0, 10**6, 61))  # every reading of the clock 61 s later: each step over a minute
    monkeypatch.setattr(tr.time, "perf_counter", lambda: float(next(clock)))
    tr.run_train(demos=str(demo_dir), out=str(tmp_path / "ck"), preset="tiny-pi0", steps=4, batch_size=2,
                 device="cpu", log_every=100)
    steps = [int(x.split()[1]) for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert steps == [1, 2, 3, 4]
    assert [json.loads(x)["step"] for x in (tmp_path / "ck" / "train_log.jsonl").read_text().splitlines()] == [1, 4]


def test_train_progress_shows_seconds_per_step_when_slow(demo_dir, tmp_path, capsys, monkeypatch):
    """A step over a second long (a large batch on a CPU) printed "0.0 it/s"; the log rounded its
    speed to 0.02 steps/s, a fifth off at 61 s a step."""
    import kvreuse.train.train as tr

    clock = iter(range(0, 10**6, 61))  # 61 s per clock reading
    monkeypatch.setattr(tr.time, "perf_counter", lambda: float(next(clock)))
    tr.run_train(demos=str(demo_dir), out=str(tmp_path / "ck"), preset="tiny-pi0", steps=2, batch_size=2,
                 device="cpu", log_every=1)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert len(lines) == 2 and all(" it/s" not in x and " s/it " in x for x in lines), lines
    for x, rec in zip(lines, map(json.loads, (tmp_path / "ck" / "train_log.jsonl").read_text().splitlines()),
                      strict=True):
        spi = float(x.split(" s/it")[0].split()[-1])
        assert spi == pytest.approx(1 / rec["steps_per_s"], rel=0.01) and spi > 1
    assert tr.rate_text(2.0) == "2.0 it/s" and tr.rate_text(0.5) == "2.0 s/it"


def test_train_checks_options_before_loading(tmp_path):
    from kvreuse.train.train import run_train

    (tmp_path / "file").write_text("x")
    bad = [({"log_every": 0}, "--log-every"), ({"max_minutes": -1}, "--max-minutes"), ({"warmup": 1.0}, "--warmup"),
           ({"device": "nosuch"}, "--device 'nosuch'"), ({"out": str(tmp_path / "file")}, "is a file"),
           ({"out": str(tmp_path / "file" / "ck")}, "is a file"), ({"lr": -1.0}, "--lr must be > 0"),
           ({"ema": 2.0}, "--ema must be in"), ({"shift": -3}, "--shift must be >= 0"),
           ({"preset": "pi0"}, "--preset 'pi0': train makes testbed policies; expected one of tiny-pi0, tiny-pi05"),
           ({"init": str(tmp_path / "nope")}, "--init: ")]
    if not torch.cuda.is_available():
        bad.append(({"device": "cuda"}, "CUDA is not available"))
    for kw, msg in bad:  # the demos do not exist: these must fail before anything is loaded
        with pytest.raises(ValueError, match=msg):
            run_train(**{"demos": str(tmp_path / "none"), "out": str(tmp_path / "ck"), **kw})


def test_train_and_demos_help(capsys):
    from kvreuse.cli import main

    for cmd, words in (("train", ("wall-clock", "warm-up", "fine-tuning", "--overwrite")), ("demos", ("--overwrite",))):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert all(w in out for w in words), (cmd, words)


def test_load_demos_rejects_mixed_and_damaged_sets(demo_dir, tmp_path):
    from kvreuse.train.demos import load_demos

    d = tmp_path / "demos"
    shutil.copytree(demo_dir, d)
    part = d / "button-press-topdown-v3"
    # an interrupted re-run replaced a part with other episodes while index.json stayed old
    np.save(part / "part00_state.npy", np.load(part / "part00_state.npy")[:-3])
    with pytest.raises(ValueError, match="part00_state.npy has .* frames but"):
        load_demos(d)
    (part / "part00_state.npy").unlink()
    with pytest.raises(ValueError, match="cannot read .*part00_state.npy"):
        load_demos(d)
    good = json.loads((demo_dir / "index.json").read_text())
    shutil.copy(demo_dir / "button-press-topdown-v3" / "part00_state.npy", part)
    task = "button-press-topdown-v3"
    for edit, msg in ((lambda i: i["tasks"][task].pop("episodes"), "lacks or misstates 'episodes'"),
                      (lambda i: i.pop("tasks"), "lacks or misstates 'tasks'"),
                      (lambda i: i.update(image_size=224), r"frames of shape \(32, 32, 3\); .*image_size 224")):
        index = json.loads(json.dumps(good))
        edit(index)
        (d / "index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=msg):
            load_demos(d)
    (d / "index.json").write_text(json.dumps(good))
    np.save(part / "part00_state.npy", np.zeros((len(np.load(part / "part00_actions.npy")), 8), np.float32))
    with pytest.raises(ValueError, match=r"part00_state.npy holds frames of shape \(8,\); .* mean \(4,\)"):
        load_demos(d)
    with pytest.raises(ValueError, match="index.json is a file; pass the demo set's folder"):
        load_demos(d / "index.json")
    (d / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        load_demos(d)


def test_demos_keep_an_existing_set(demo_dir, tmp_path):
    from kvreuse.train.demos import collect_demos

    d = tmp_path / "demos"
    shutil.copytree(demo_dir, d)
    before = {str(f): f.read_bytes() for f in d.rglob("*") if f.is_file()}
    kw = {"tasks": ("button-press-topdown-v3",), "demos_per_task": 1, "image_size": 32, "workers": 1}
    with pytest.raises(ValueError, match="already holds a demo set; pass --overwrite"):
        collect_demos(str(d), **kw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        collect_demos(str(tmp_path / "file"), **kw)
    # 2 steps are too few for the expert: an error naming the task, and the old set stays whole
    with pytest.raises(ValueError, match="button-press-topdown-v3: 0 of 1, .* cut off at --max-steps 2"):
        collect_demos(str(d), max_steps=2, overwrite=True, **kw)
    assert {str(f): f.read_bytes() for f in d.rglob("*") if f.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos", "file"]  # no staging directory left
    (d / "notes.txt").write_text("mine")  # --overwrite replaces only what a demo set consists of
    with pytest.raises(ValueError, match="notes.txt"):
        collect_demos(str(d), overwrite=True, **kw)


def test_demos_overwrite_replaces_the_whole_set(tmp_path, capsys):
    from kvreuse.train.demos import collect_demos, load_demos

    d = tmp_path / "demos"
    (d / "reach-v3").mkdir(parents=True)  # a set of another task: no orphans may remain
    np.save(d / "reach-v3" / "part00_base.npy", np.zeros(3))
    (d / "index.json").write_text("{}")
    collect_demos(str(d), tasks=("button-press-topdown-v3",), demos_per_task=2, image_size=32, max_steps=120,
                  workers=1, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["button-press-topdown-v3", "index.json"]
    assert load_demos(d).episodes == 2
    err = capsys.readouterr().err
    assert "1/2" in err  # the bar moves per recorded episode, not per part
    assert "\r" not in err  # not a terminal: lines, not tqdm's redraws (which flood a log file)


def test_interrupted_demos_keep_finished_parts_and_a_rerun_continues(tmp_path, monkeypatch, capsys):
    """Ctrl-C after parts finished: `out` untouched, the parts kept beside it with one line saying
    so; the rerun records only a part whose marker is missing (half-written) and matches a fresh run."""
    import signal

    import kvreuse.train.demos as dm
    from kvreuse.cli import main
    from kvreuse.train.outdir import resumable

    task = "button-press-topdown-v3"
    args = ["demos", "--tasks", task, "--demos-per-task", "2", "--parts-per-task", "2", "--workers", "2",
            "--image-size", "32", "--max-steps", "120"]
    real_tidy = dm._tidy

    def interrupt(*a):  # every part is recorded; the run is stopped before it swaps in
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "_tidy", interrupt, raising=False)
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "d")])
    assert e.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "\r" not in err  # no tqdm redraws in a log: progress comes as lines
    part = tmp_path / ".d.partial"
    assert err.splitlines()[-1] == (f"kvreuse: interrupted (2 of 2 parts are kept in {part}; "
                                    "the same command continues from them)")
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="another run is writing it"):  # two runs on one out
        lock = os.open(part, os.O_RDONLY)
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            resumable(tmp_path / "d")
        finally:
            os.close(lock)

    # part01 was cut off while writing: its arrays are there, its marker is not.
    full = {f.name: f.read_bytes() for f in (part / task).iterdir()}
    (part / task / "part01.json").unlink()
    np.save(part / task / "part01_base.npy", np.zeros((2, 32, 32, 3), np.uint8))
    monkeypatch.setattr(dm, "_tidy", real_tidy)
    main([*args, "--out", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert f"continuing the unfinished run in {part}: 1 of 2 parts (1 demos) already recorded" in out
    assert not part.exists()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [task, "index.json"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "d" / task).iterdir()} == \
        {k: v for k, v in full.items() if k.endswith(".npy")}  # the redone part is the same as first recorded
    assert dm.load_demos(tmp_path / "d").episodes == 2


def test_failed_demos_keep_finished_parts_and_a_rerun_continues(tmp_path, capsys):
    """An error in a worker (here: the disk refuses a part's files) after another part finished:
    the finished part stays in .NAME.partial, one error line says so, and the same command
    continues from it; the failed run deleted every finished part."""
    from kvreuse.cli import main

    done, bad = "button-press-topdown-v3", "reach-v3"
    part = tmp_path / ".d.partial"
    (part / bad / "part00.json").mkdir(parents=True)  # the worker cannot clear this part's marker
    args = ["demos", "--tasks", done, bad, "--demos-per-task", "1", "--workers", "1", "--image-size", "32",
            "--max-steps", "120", "--out", str(tmp_path / "d")]
    with pytest.raises(SystemExit) as e:
        main(args)  # one worker: the parts run in order, the failing one second
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and "Traceback (most recent call last):" in err, err  # not bad input: maybe a bug
    assert err[-1].startswith("kvreuse: error: demos: IsADirectoryError"), err
    assert err[-1].endswith(f"(1 of 2 parts are kept in {part}; the same command continues from them)"), err
    assert (part / done / "part00.json").is_file() and not (tmp_path / "d").exists()
    (part / bad / "part00.json").rmdir()
    main(args)
    assert "continuing the unfinished run in" in capsys.readouterr().out
    assert not part.exists() and sorted(p.name for p in (tmp_path / "d").iterdir()) == [done, "index.json", bad]


def test_demos_failing_while_writing_the_set_keep_every_part(tmp_path, monkeypatch, capsys):
    """A late error (the disk, while writing index.json after _tidy dropped the markers) kept nothing:
    every part is kept, with its marker, and the rerun records none again."""
    import kvreuse.train.demos as dm
    from kvreuse.cli import main

    task = "button-press-topdown-v3"
    args = ["demos", "--tasks", task, "--demos-per-task", "1", "--workers", "1", "--image-size", "32",
            "--max-steps", "120", "--out", str(tmp_path / "d")]
    real_tidy = dm._tidy

    def tidy_then_fail(tmp, units):
        real_tidy(tmp, units)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dm, "_tidy", tidy_then_fail)
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1] == (
        "kvreuse: error: demos: OSError: [Errno 28] No space left on device "
        f"(1 of 1 parts are kept in {tmp_path / '.d.partial'}; the same command continues from them)"), err
    monkeypatch.setattr(dm, "_tidy", real_tidy)
    main(args)
    assert "1 of 1 parts (1 demos) already recorded" in capsys.readouterr().out
    assert dm.load_demos(tmp_path / "d").episodes == 1


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_demo_workers_die_with_a_killed_run(tmp_path):
    """kill -9 of `kvreuse demos`: its workers went on recording their parts, unseen."""
    import signal
    import subprocess
    import sys
    import time

    args = ["--tasks", "button-press-topdown-v3", "--demos-per-task", "60", "--parts-per-task", "2",
            "--workers", "2", "--image-size", "32", "--max-steps", "120", "--out", str(tmp_path / "d")]
    run = subprocess.Popen([sys.executable, "-m", "kvreuse.train.demos", *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both workers at work: torch is loaded in _collect_unit
            kids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == run.pid]
            workers = [k for k in kids if "multiprocessing" in _read(f"/proc/{k}/cmdline")
                       and "resource_tracker" not in _read(f"/proc/{k}/cmdline")]
            if len(workers) == 2 and all("libtorch" in _read(f"/proc/{k}/maps") for k in workers):
                break
            assert run.poll() is None, "the run ended before its workers started"
            time.sleep(0.2)
        else:
            pytest.fail(f"no two working workers within 60 s: {workers}")
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived the killed run"
    finally:
        if run.poll() is None:
            run.kill()
        for w in workers:  # without the fix: stop them here
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def _read(path: str) -> str:
    try:
        return Path(path).read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _ppid(p: Path) -> int:
    s = _read(str(p / "stat"))
    return int(s.rsplit(")", 1)[1].split()[1]) if ")" in s else -1


def test_demo_workers_leave_ctrl_c_to_the_parent():
    """Ctrl-C reaches every process of the group: a worker's own KeyboardInterrupt printed a
    traceback fragment ('Process SpawnPoolWorker-2:') before the one-line message."""
    import signal
    import warnings

    import kvreuse.train.demos as dm

    before = signal.getsignal(signal.SIGINT)
    try:
        with warnings.catch_warnings():
            dm._init_worker(None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_interrupted_demos_close_their_progress_bar(tmp_path, monkeypatch):
    """On a terminal, the one-line interrupt message was printed on the still-open tqdm bar's line."""
    import kvreuse.progress
    from kvreuse.train.demos import collect_demos

    closed = []

    class Bar:
        def update(self, n=1):
            raise KeyboardInterrupt  # Ctrl-C as the first demo is counted

        def set_postfix_str(self, s):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(kvreuse.progress, "progress", lambda *a, **kw: Bar())
    with pytest.raises(KeyboardInterrupt):
        collect_demos(out=str(tmp_path / "d"), tasks=("button-press-topdown-v3",), demos_per_task=1, image_size=32,
                      max_steps=120, workers=1)
    assert closed == [True]


@pytest.mark.parametrize("module, args, msg", [
    ("kvreuse.train.train", ["--demos", "{tmp}/none", "--out", "{tmp}/ck"], "demos: no index.json in"),
    ("kvreuse.train.demos", ["--tasks", "nope", "--out", "{tmp}/d"], "nope"),
])
def test_python_m_runs_as_the_kvreuse_command(module, args, msg, tmp_path, monkeypatch, capsys):
    """scripts/testbed_device.sh runs `python -m kvreuse.train.*`: bad input is one error line, as with
    `kvreuse train` / `kvreuse demos` (and Ctrl-C / SIGTERM end the same way), not a traceback."""
    import runpy
    import sys
    import warnings

    monkeypatch.setattr(sys, "argv", [module, *(a.format(tmp=tmp_path) for a in args)])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as e:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        runpy.run_module(module, run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("kvreuse: error: ") and msg in err[0], err


def test_swap_in_failing_leaves_the_previous_result(tmp_path):
    """swap_in moved `out` aside, then failed to move the new one in: `out` was left missing."""
    from kvreuse.train.outdir import swap_in

    out = tmp_path / "d"
    out.mkdir()
    (out / "index.json").write_text("old")
    with pytest.raises(FileNotFoundError):
        swap_in(tmp_path / ".d.partial", out)  # the new result is gone: the rename fails
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and (out / "index.json").read_text() == "old"


def test_init_of_another_preset_and_a_blocked_out_fail_before_the_data_loads(demo_dir, tmp_path, monkeypatch):
    """An --init of another preset, or a --out that cannot take the work in progress, were found only
    after the demos loaded (9 GB for the v2 set) and the models were built."""
    from kvreuse.assets import shipped_checkpoint
    from kvreuse.train.train import run_train

    monkeypatch.setattr("kvreuse.train.demos.load_demos", lambda *a, **k: pytest.fail("the data loaded"))
    with pytest.raises(ValueError, match="is a different model than preset 'tiny-pi0'"):
        run_train(demos=str(demo_dir), out=str(tmp_path / "ck"), preset="tiny-pi0", steps=1, batch_size=2,
                  device="cpu", init=str(shipped_checkpoint("tiny-pi05")))
    (tmp_path / f".ck.partial-{os.getpid()}").write_text("in the way")  # where the run would work
    with pytest.raises(ValueError, match="cannot write its work in progress"):
        run_train(demos=str(demo_dir), out=str(tmp_path / "ck"), preset="tiny-pi0", steps=1, batch_size=2,
                  device="cpu")


def test_a_second_train_on_one_out_fails_at_once(demo_dir, tmp_path, monkeypatch):
    """Two runs on one --out each trained in their own staging folder; the one that finished last
    replaced the other's checkpoint at its swap, without --overwrite and without a word."""
    from kvreuse.train.outdir import claimed
    from kvreuse.train.train import run_train

    kw = dict(demos=str(demo_dir), out=str(tmp_path / "ck"), preset="tiny-pi0", steps=1, batch_size=2, device="cpu")
    with claimed(tmp_path / "ck"):  # the first run, still going
        monkeypatch.setattr("kvreuse.train.demos.load_demos", lambda *a, **k: pytest.fail("the data loaded"))
        with pytest.raises(ValueError, match="another run is writing it"):
            run_train(**kw)
        monkeypatch.undo()
    run_train(**kw)  # the first one done: the lock is free again and its file gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    with pytest.raises(ValueError, match="already holds a checkpoint"):  # the next one sees its result
        run_train(**kw)


def test_a_symlinked_out_is_replaced_where_it_points(demo_dir, tmp_path, monkeypatch):
    """--out a symlink: the swap moved the link aside, put the new result in its place and failed to
    remove the moved link (rmtree refuses links); train then said "out is as it was". The directory
    the link names is replaced, on its disk, and the link stays."""
    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.train.train import run_train

    real, link = tmp_path / "disk" / "ck", tmp_path / "ck"
    real.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    for overwrite in (False, True):  # a new directory, then one replaced
        run_train(demos=str(demo_dir), out=str(link), preset="tiny-pi0", steps=1 + overwrite, batch_size=2,
                  device="cpu", overwrite=overwrite)
        assert link.is_symlink() and load_checkpoint(link)[2]["training"]["steps"] == 1 + overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "disk"]
    assert [p.name for p in real.parent.iterdir()] == ["ck"]
    # a failed run keeps its weights beside the directory too, where its work in progress was (beside
    # the link, on another disk, the rename failed and nothing was kept)
    _fail_third_step(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        run_train(demos=str(demo_dir), out=str(link), preset="tiny-pi0", steps=4, batch_size=2, device="cpu",
                  overwrite=True)
    assert sorted(p.name for p in real.parent.iterdir()) == ["ck", "ck.interrupted"]


def test_work_in_progress_folder_in_the_way_is_one_error(tmp_path, capsys):
    """A file where a run keeps its work in progress (`.NAME.partial` for demos, the staging folder
    for train) is one error line naming it, before any work; it was an OSError traceback."""
    from kvreuse.cli import main
    from kvreuse.train.outdir import staging

    (tmp_path / ".d.partial").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        main(["demos", "--tasks", "button-press-topdown-v3", "--demos-per-task", "1", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0] == (f"kvreuse: error: --out {tmp_path / 'd'}: cannot write its work in progress "
                      f"{tmp_path / '.d.partial'}: a file is in the way"), err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*/file/out: cannot write its work in progress .*: "):
        staging(blocker / "out")


def test_train_failing_to_write_its_log_still_says_what_was_kept(demo_dir, tmp_path, monkeypatch):
    """A disk error while writing train_log.jsonl: closing the log in the error path raised the same
    error again, which replaced the first one, lost its note ("OUT is as it was ...") and skipped
    saving the weights reached."""
    import builtins

    from kvreuse.train.train import run_train

    def full_log(path, *a, **kw):  # the log's writes fail as on a full disk
        return builtins.open("/dev/full" if str(path).endswith("train_log.jsonl") else path, *a, **kw)

    monkeypatch.setattr("kvreuse.train.train.open", full_log, raising=False)
    out, kept = tmp_path / "ck", tmp_path / "ck.interrupted"
    with pytest.raises(OSError, match="No space left on device") as e:
        run_train(demos=str(demo_dir), out=str(out), preset="tiny-pi0", steps=3, batch_size=2, device="cpu")
    assert e.value.what == "train" and e.value.kept.startswith(f"{out} is as it was; the EMA weights after 1 of")
    assert kept.is_dir() and not out.exists()


def _die_before_marking_part_1(u):
    """Worker stand-in (spawned: it is imported by name): part 1 records its arrays, then its
    process dies (as the OOM killer or a simulator crash would end it) before its marker."""
    import kvreuse.train.demos as dm

    if u.part == 1:
        dm._write_marker = lambda *a: os._exit(3)
    return dm._collect_unit(u)


def test_demos_stop_when_a_worker_dies_and_a_rerun_redoes_only_its_part(tmp_path, monkeypatch, capsys):
    """A worker process killed mid-part (OOM killer, a segfault): multiprocessing.Pool never
    reports its lost part, so the run waited forever. Now one error line, the finished part kept,
    the half-written one not; the rerun records only that part."""
    import signal

    import kvreuse.train.demos as dm
    from kvreuse.cli import main

    task = "button-press-topdown-v3"
    args = ["demos", "--tasks", task, "--demos-per-task", "2", "--parts-per-task", "2", "--workers", "1",
            "--image-size", "32", "--max-steps", "120", "--out", str(tmp_path / "d")]
    part = tmp_path / ".d.partial"

    def hung(*a):
        raise TimeoutError("the run still waits for the dead worker's part")

    monkeypatch.setattr(dm, "_collect_unit", _die_before_marking_part_1)
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with pytest.raises(SystemExit) as e:
            main(args)  # one worker: part 0 finishes, then part 1's worker dies
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("kvreuse: error: demos: a worker process died (exit code 3)"), err
    assert err[-1].endswith(f"(1 of 2 parts are kept in {part}; the same command continues from them)"), err
    assert (part / task / "part00.json").is_file() and (part / task / "part01_actions.npy").is_file()
    assert not (part / task / "part01.json").exists() and not (tmp_path / "d").exists()
    monkeypatch.undo()
    main(args)
    assert "1 of 2 parts (1 demos) already recorded" in capsys.readouterr().out
    assert dm.load_demos(tmp_path / "d").episodes == 2
