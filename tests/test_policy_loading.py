"""Policy.from_checkpoint on reference (lerobot) files: the robot must be named, and the fast
runtime gives the eager actions."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from kvreuse.model import Pi0Model, preset
from kvreuse.policy import Policy
from kvreuse.ref_checkpoint import save_reference


def _raw(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(4),
        "prompt": "open the drawer",
    }


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ref")
    save_reference(d, Pi0Model(preset("tiny-pi0")).eval(), "lerobot", True)
    return d


def test_reference_checkpoint_needs_a_robot(ref_dir):
    with pytest.raises(ValueError, match="names no robot"):
        Policy.from_checkpoint(ref_dir)
    pol = Policy.from_checkpoint(ref_dir, robot="metaworld")
    actions, rec = pol.infer(_raw())
    assert actions.shape == (preset("tiny-pi0").chunk_size, 4) and np.isfinite(actions).all()


def test_unknown_robot_is_named(ref_dir):
    with pytest.raises(ValueError, match="unknown robot 'nope'"):
        Policy.from_checkpoint(ref_dir, robot="nope")


def test_fast_policy_matches_eager(ref_dir):
    eager = Policy.from_checkpoint(ref_dir, robot="metaworld")
    fast = Policy.from_checkpoint(ref_dir, robot="metaworld", fast=True)
    assert type(fast.model).__name__ == "FastPi0"
    a, _ = eager.infer(_raw(1))
    b, _ = fast.infer(_raw(1))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["tiny-pi0", "tiny-pi05"])
def test_cameras_the_robot_lacks_are_left_out_with_the_same_actions(variant, tmp_path):
    """A 3-camera checkpoint under a 2-camera robot (as a 3-slot Pi0 under LIBERO): by default the
    absent camera is left out of the prefix (no vision pass, rows or keys for it); fed black and
    masked instead, as lerobot / openpi do, the actions are the same up to float rounding."""
    torch.manual_seed(0)
    cfg = preset(variant).replace(cameras=("base", "extra", "wrist"))  # the absent one in the middle
    save_reference(tmp_path, Pi0Model(cfg).eval(), "lerobot", True)
    feats = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, 128, 128]} for c in cfg.cameras}
    (tmp_path / "config.json").write_text(json.dumps({"type": cfg.variant, "input_features": feats}))
    kept = Policy.from_checkpoint(tmp_path, robot="metaworld", keep_absent_cameras=True)
    left_out = Policy.from_checkpoint(tmp_path, robot="metaworld")
    assert kept.model.cfg.cameras == ("base", "extra", "wrist")
    assert left_out.model.cfg.cameras == ("base", "wrist")
    assert left_out.model.cfg.prefix_len == kept.model.cfg.prefix_len - cfg.vision.num_patches
    for seed in (1, 2):
        a, rec_a = kept.infer(_raw(seed))
        b, rec_b = left_out.infer(_raw(seed))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    fast = Policy.from_checkpoint(tmp_path, robot="metaworld", fast=True)
    assert fast.model.cfg.cameras == ("base", "wrist")
    kept.reset()  # the same noise as fast's first call
    np.testing.assert_allclose(fast.infer(_raw(1))[0], kept.infer(_raw(1))[0], rtol=1e-4, atol=1e-4)
    # kvreuse eval loads it the same way
    from kvreuse.eval.sweep import PolicySource, load_model

    model, tf, _ = load_model(PolicySource(str(tmp_path)), "metaworld")
    assert model.cfg.cameras == tf.cfg.cameras == ("base", "wrist")
    model, tf, _ = load_model(PolicySource(str(tmp_path), keep_absent_cameras=True, fast=True), "metaworld")
    assert type(model).__name__ == "FastPi0" and model.cfg.cameras == tf.cfg.cameras == cfg.cameras
    # and `kvreuse serve` (its random-model path too)
    from kvreuse.reuse.config import ReuseConfig
    from kvreuse.serve.command import build_policy

    served, _ = build_policy(str(tmp_path), ReuseConfig(), robot="metaworld", keep_absent_cameras=True)
    assert served.model.cfg.cameras == cfg.cameras
    served, _ = build_policy(None, ReuseConfig(), variant, robot="metaworld", fast=True)
    assert type(served.model).__name__ == "FastPi0"


def test_lerobot_libero_camera_names_run_under_the_libero_robot(tmp_path):
    """lerobot's LIBERO fine-tunes name their cameras image / image2 (its datasets' features): they were
    refused under --robot libero ("maps to camera(s) ['base_0_rgb', ...] the model does not have")."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    raw = {"observation/image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
           "observation/state": rng.standard_normal(8).astype(np.float32), "prompt": "put the bowl on the plate"}
    out = {}
    for names in (("image", "image2"), ("base_0_rgb", "left_wrist_0_rgb")):
        cfg = preset("tiny-pi0").replace(cameras=names)
        torch.manual_seed(0)
        d = tmp_path / names[0]
        save_reference(d, Pi0Model(cfg).eval(), "lerobot", True)
        feats = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, 128, 128]} for c in names}
        (d / "config.json").write_text(json.dumps({"type": "pi0", "input_features": feats}))
        pol = Policy.from_checkpoint(d, robot="libero")
        assert pol.model.cfg.cameras == names and [c for _, c in pol.transform.spec.cameras] == list(names)
        out[names] = pol.infer(raw)[0]
    np.testing.assert_array_equal(*out.values())


def test_with_cameras_shares_the_weights_and_checks_its_cameras():
    model = Pi0Model(preset("tiny-pi0")).eval()
    assert model.with_cameras(("wrist", "base")) is model  # all of them, in any order: itself
    one = model.with_cameras(("wrist",))
    assert one.cfg.cameras == ("wrist",) and model.cfg.cameras == ("base", "wrist")
    assert one.vision is model.vision and one.llm.embed.weight.data_ptr() == model.llm.embed.weight.data_ptr()
    with pytest.raises(ValueError, match="subset of"):
        model.with_cameras(("left",))
    with pytest.raises(ValueError, match="subset of"):
        model.with_cameras(())


def test_broken_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    """`kvreuse serve --checkpoint` goes through Policy.from_checkpoint: bad config types and
    unreadable weights are one ValueError naming the file, not a TypeError / SafetensorError."""
    from kvreuse.checkpoint import save_checkpoint
    from kvreuse.reuse.config import ReuseConfig
    from kvreuse.serve.command import build_policy

    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "ck", Pi0Model(preset("tiny-pi0")).eval(), None, "metaworld")
    meta = json.loads((ck / "config.json").read_text())
    meta["model"]["vision"]["width"] = "abc"
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{ck / 'config.json'}: model.vision.width: expected an integer")):
        Policy.from_checkpoint(ck)
    meta["model"]["vision"]["width"] = preset("tiny-pi0").vision.width
    (ck / "config.json").write_text(json.dumps(meta))
    Policy.from_checkpoint(ck)  # fixed: it loads
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{f}: not a readable safetensors file")):
        build_policy(str(ck), ReuseConfig())


def _obs(spec, b=None, size=64):
    shape = (size, size, 3) if b is None else (b, size, size, 3)
    raw = {k: np.zeros(shape, np.uint8) for k in spec.camera_keys}
    raw[spec.state_key] = np.zeros(spec.state_dim if b is None else (b, spec.state_dim))
    raw["prompt"] = "push the puck" if b is None else ["push the puck"] * b
    return raw


def test_library_mistakes_are_value_errors_naming_the_argument(tmp_path):
    from kvreuse.assets import default_checkpoint
    from kvreuse.reuse.stream import ObservationStream

    ck = default_checkpoint("pi05")
    for kw, msg in (({"device": "tpu"}, "--device 'tpu': unknown device"), ({"dtype": "float64"}, "dtype: expected"),
                    ({"dtype": torch.int8}, "dtype: expected one of float32, bfloat16, got 'int8'"),
                    ({"seed": "1"}, "seed: expected an integer"), ({"seed": -1}, "seed: expected an integer in 0.."),
                    ({"seed": 2**64}, r"seed: expected an integer in 0..\d+ \(2\*\*64 - 1\), got 18446744073709551616"),
                    ({"reuse": "always"}, "reuse: expected a ReuseConfig")):
        with pytest.raises(ValueError, match=msg):
            Policy.from_checkpoint(ck, **kw)
    assert Policy.from_checkpoint(ck, dtype=torch.bfloat16).model.llm.embed.weight.dtype == torch.bfloat16
    p = Policy.from_checkpoint(ck, dtype="float32", reuse={"gate": "always"})  # CLI spellings and a stored config
    assert p.reuse_config.gate == "always"
    spec, cfg = p.transform.spec, p.model.cfg
    p.recorder = ObservationStream(robot=spec.name)
    bad_noise = (torch.zeros(2, cfg.chunk_size, cfg.max_action_dim), torch.zeros(1, 3, 3), np.zeros((1, 16, 32)),
                 torch.zeros(1, 16, 32, dtype=torch.int64))  # int noise once ran truncated, the actions ~1 off
    for noise in bad_noise:  # a batch of 2 for one observation once gave two chunks silently
        with pytest.raises(ValueError, match=r"noise: expected a floating-point torch.Tensor of shape \(1, 16, 32\)"):
            p.infer(_obs(spec), noise=noise)
    with pytest.raises(ValueError, match="seed: expected an integer in 0.."):
        p.reset(seed=-3)
    with pytest.raises(ValueError, match="observation: expected a dict"):
        p.infer([1, 2])
    assert len(p.recorder) == 0  # refused calls are not recorded
    assert p.infer(_obs(spec))[0].shape == (16, 4) and p.infer(_obs(spec, b=1))[0].shape == (1, 16, 4)
    assert p.infer(_obs(spec, b=2))[0].shape == (2, 16, 4) and len(p.recorder) == 3
    odd = ObservationStream(robot=spec.name)
    odd.add({**_obs(spec), "extra": object()})
    with pytest.raises(ValueError, match="neither an array nor JSON"):
        odd.save(tmp_path / "odd.safetensors")


def test_reuse_config_against_the_model_and_numpy_values():
    from kvreuse.assets import default_checkpoint
    from kvreuse.reuse.config import ReuseConfig

    cfg = ReuseConfig(gate="threshold", threshold=np.float32(0.5), period=np.int64(3), synchronized=np.bool_(True))
    assert (type(cfg.threshold), type(cfg.period), type(cfg.synchronized)) == (float, int, bool)
    for field in ("max_age_s", "state_max_l2", "patch_max_diff", "variance_threshold", "gripper_delta"):
        with pytest.raises(ValueError, match=f"reuse.{field}: expected a number"):  # NaN would switch its check off
            ReuseConfig(gate="always", **{field: float("nan")})
    ck = default_checkpoint("pi0")
    for reuse, msg in ((ReuseConfig(gate="phase", gripper_dim=4), r"gripper_dim: 4 is not one of .* 4 action dims"),
                       (ReuseConfig(gate="phase", gripper_dim=-5), "reuse.gripper_dim: -5"),
                       (ReuseConfig(gate="threshold", downsample=10_000), "reuse.downsample: 10000 exceeds")):
        with pytest.raises(ValueError, match=msg):
            Policy.from_checkpoint(ck, reuse=reuse)
    Policy.from_checkpoint(ck, reuse=ReuseConfig(gate="phase", gripper_dim=-4))


def _full_size_reference(d, variant="pi0"):
    """A full-size lerobot model.safetensors whose tensors are all zeros, written sparse: its header
    is that of a real checkpoint (GBs of bf16), its data takes no disk and is never read here."""
    import struct

    from kvreuse.ref_checkpoint import to_reference

    with torch.device("meta"):
        state = Pi0Model(preset(variant)).state_dict()
    header, off = {}, 0
    for name, t in state.items():
        header["model." + to_reference(name)] = {"dtype": "BF16", "shape": list(t.shape),
                                                 "data_offsets": [off, off + 2 * t.numel()]}
        off += 2 * t.numel()
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)
    return d


def test_robot_and_tokenizer_are_checked_before_the_weights_load(ref_dir, tmp_path, sp_model, monkeypatch):
    """A full-size reference checkpoint loads for a minute or more: a missing robot, a missing or wrong
    tokenizer and cameras the robot does not have are refused from the headers, before that."""
    import kvreuse.checkpoint

    full = _full_size_reference(tmp_path / "pi0 full")
    monkeypatch.setattr(kvreuse.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("weights loaded"))
    (tmp_path / "tokenizer.json").write_text("{}")
    cases = [
        (ref_dir, {}, "names no robot"),
        (ref_dir, {"robot": "metaworld", "tokenizer": sp_model}, "uses the built-in byte tokenizer"),
        (full, {"robot": "libero"}, "this pi0 model needs the PaliGemma SentencePiece tokenizer"),
        (full, {"robot": "libero", "tokenizer": tmp_path / "tokenizer.json"}, "not a SentencePiece model"),
        (full, {"robot": "libero", "tokenizer": tmp_path}, "a directory, expected the PaliGemma tokenizer.model"),
        (full, {"robot": "metaworld", "tokenizer": sp_model}, r"robot 'metaworld' maps to camera\(s\)"),
    ]
    for path, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            Policy.from_checkpoint(path, **kw)


def test_eval_checks_a_reference_checkpoints_tokenizer_before_any_work(ref_dir, tmp_path, sp_model):
    """The tokenizer a reference checkpoint needs is known from its header: eval refuses a wrong one
    before the results DB, the workers and the weights (it used to fail in the worker, after them)."""
    from kvreuse.eval.sweep import PolicySource, SweepPlan, run_sweep

    full = _full_size_reference(tmp_path / "full")
    plan = SweepPlan(db=str(tmp_path / "t.db"), env="fake", tasks=("reach",), episodes=1, workers=0, progress=False)
    for src, msg in (((str(ref_dir), str(sp_model)), "uses the built-in byte tokenizer"),
                     ((str(full), None), "needs the PaliGemma SentencePiece tokenizer"),
                     ((str(full), str(tmp_path / "full" / "model.safetensors")),
                      r"model.safetensors: 6.5 GB, not a SentencePiece model")):  # not read whole to find out
        with pytest.raises(ValueError, match=msg):  # the source itself may refuse (the tokenizer file)
            run_sweep(plan, PolicySource(src[0], tokenizer=src[1]))
        assert not (tmp_path / "t.db").exists()


def test_a_checkpoint_without_norm_stats_is_named_where_it_runs(ref_dir, tmp_path, capsys):
    """Weights without their norm stats run (a random model needs none), but a trained one would get
    unnormalized states and give unnormalized actions: eval, serve and info say so."""
    from kvreuse.checkpoint import missing_stats_warning
    from kvreuse.eval.sweep import PolicySource, SweepPlan, run_sweep
    from kvreuse.info import describe
    from kvreuse.reuse.config import ReuseConfig
    from kvreuse.serve.command import build_policy

    warning = f"warning: checkpoint {ref_dir} has no norm stats beside its weights (norm_stats.json"
    assert missing_stats_warning(ref_dir).startswith(warning)
    assert "none found (looked for norm_stats.json" in describe(ref_dir)
    plan = SweepPlan(db=str(tmp_path / "t.db"), env="fake", tasks=("reach",), episodes=1, workers=0, progress=False,
                     env_kw={"max_steps": 2})
    assert run_sweep(plan, PolicySource(str(ref_dir))).ran == 1
    assert warning in capsys.readouterr().err
    build_policy(str(ref_dir), ReuseConfig(), robot="metaworld")
    assert warning in capsys.readouterr().err
    with_stats = tmp_path / "with stats"
    with_stats.mkdir()
    (with_stats / "model.safetensors").write_bytes((ref_dir / "model.safetensors").read_bytes())
    st = {"mean": [0.0] * 4, "std": [1.0] * 4, "q01": [-1.0] * 4, "q99": [1.0] * 4}
    (with_stats / "norm_stats.json").write_text(json.dumps({"state": st, "actions": st}))
    assert missing_stats_warning(with_stats) is None
    build_policy(str(with_stats), ReuseConfig(), robot="metaworld")
    assert "warning" not in capsys.readouterr().err
    # our own format reads its one norm_stats.json: the hint named openpi's assets and lerobot's files
    from kvreuse.checkpoint import save_checkpoint
    from kvreuse.model import Pi0Model, preset

    save_checkpoint(tmp_path / "ours", Pi0Model(preset("tiny-pi0")), None, robot="metaworld")
    for text in (missing_stats_warning(tmp_path / "ours"), describe(tmp_path / "ours")):
        assert 'norm_stats.json as kvreuse writes it: {"state"' in text and "lerobot" not in text


def test_serve_takes_a_reference_checkpoint_file_with_its_robot(ref_dir, monkeypatch, capsys):
    """`kvreuse serve --checkpoint .../model.safetensors` (lerobot / openpi, docs/SERVE.md): without
    --robot one error line naming the flag; with it the server comes up on that model."""
    import kvreuse.cli as cli
    from kvreuse.serve.server import PolicyServer

    async def listen_once(self, ready=None, stop=None):  # the bound port, then return instead of serving
        ready(12345)

    monkeypatch.setattr(PolicyServer, "run", listen_once)
    weights = str(ref_dir / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--checkpoint", weights, "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"kvreuse: error: checkpoint {weights}: names no robot; pass one "
                                         "(e.g. robot='libero' / --robot libero)"]
    cli.main(["serve", "--checkpoint", weights, "--robot", "metaworld", "--port", "0"])
    assert f"kvreuse serve: {weights} (pi0, robot metaworld)" in capsys.readouterr().out


def test_norm_stats_shorter_than_the_robots_dims_are_refused_before_the_load(ref_dir, tmp_path, monkeypatch):
    """Stats of 3 dims for a 4-dim robot failed on the first call as 'operands could not be broadcast'
    (naming nothing); longer ones are fine (openpi keeps them padded)."""
    import shutil

    import kvreuse.checkpoint
    from kvreuse.policy import robot_runtime
    from kvreuse.transforms.robot import robot_spec

    d = tmp_path / "ck"
    shutil.copytree(ref_dir, d)

    def write(state_dims, action_dims):
        st = {k: [float(k == "std")] * state_dims for k in ("mean", "std", "q01", "q99")}
        act = {k: [float(k == "std")] * action_dims for k in ("mean", "std", "q01", "q99")}
        (d / "norm_stats.json").write_text(json.dumps({"state": st, "actions": act}))

    write(3, 4)
    load = kvreuse.checkpoint.load_checkpoint
    monkeypatch.setattr(kvreuse.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {d}: norm stats: the state stats have 3 dims, "
                                                   "robot 'metaworld' has 4")):
        Policy.from_checkpoint(d, robot="metaworld")
    monkeypatch.setattr(kvreuse.checkpoint, "load_checkpoint", load)
    model, stats, _ = load(d)
    write(4, 2)
    with pytest.raises(ValueError, match="the actions stats have 2 dims, robot 'metaworld' has 4"):
        robot_runtime(model, robot_spec("metaworld"), kvreuse.checkpoint.checkpoint_stats(d))
    write(6, 32)
    a, _ = Policy.from_checkpoint(d, robot="metaworld").infer(_raw())
    assert a.shape == (preset("tiny-pi0").chunk_size, 4) and np.isfinite(a).all()


def test_an_openpi_checkpoint_drives_the_robots_dims_not_its_padding(tmp_path):
    """An openpi config.json names no robot dims, so the model kept its preset's padded 32: the state
    distance was divided by sqrt(32) (state_max_l2 twice as loose at 8 dims), and the phase gate's
    gripper cue (gripper_dim -1) read padding dim 31."""
    from kvreuse.reuse.config import ReuseConfig

    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi0", state_dim=32, action_dim=32)).eval(), "openpi")
    pol = Policy.from_checkpoint(tmp_path, robot="metaworld", reuse=ReuseConfig(gate="crossmodal", state_max_l2=1.0))
    assert (pol.model.cfg.state_dim, pol.model.cfg.action_dim) == (4, 4)
    raw = _raw()
    pol.infer(raw)
    _, rec = pol.infer({**raw, "observation/state": raw["observation/state"] + 0.1})  # no stats: unnormalized
    assert rec.signals["state_l2"] == pytest.approx(0.1, rel=1e-5)  # RMS change per robot dim
    pol = Policy.from_checkpoint(tmp_path, robot="metaworld", reuse=ReuseConfig(gate="phase", gripper_dim=3))
    with pytest.raises(ValueError, match="gripper_dim: 4 is not one of this model's 4 action dims"):
        Policy.from_checkpoint(tmp_path, robot="metaworld", reuse=ReuseConfig(gate="phase", gripper_dim=4))
    with pytest.raises(ValueError, match=re.escape("the model drives 4 state / 4 action dims, the robot has 8 / 7")):
        Pi0Model(preset("tiny-pi0")).with_robot_dims(8, 7)
    # dims a lerobot config.json recorded (9) are a robot's: not narrowed onto LIBERO's 8 / 7
    with pytest.raises(ValueError, match=re.escape("the model drives 9 state / 9 action dims, the robot has 8 / 7")):
        Pi0Model(preset("tiny-pi0", state_dim=9, action_dim=9)).with_robot_dims(8, 7)


@pytest.mark.parametrize("state,action", [("MEAN_STD", "MEAN_STD"), ("QUANTILES", "mean_std"),
                                          ("mean_std", "QUANTILES")])
def test_a_lerobot_pi05_trained_with_mean_std_runs_with_its_modes(state, action, tmp_path):
    """lerobot trains a Pi0.5 with MEAN_STD where the dataset lacks quantiles (or sets STATE and ACTION
    apart): Policy.from_checkpoint normalizes its state and unnormalizes its actions as lerobot 0.6.1
    does (by hand below). It was refused (86c6635); before that, scaled with quantiles."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi05")).eval(), "lerobot", True)
    rng = np.random.default_rng(1)
    st = {"mean": rng.normal(0.5, 1, 4), "std": rng.uniform(0.2, 3, 4)}
    act = {"mean": rng.normal(-1, 1, 4), "std": rng.uniform(0.2, 3, 4)}
    for s in (st, act):  # quantiles far from mean +- std: the wrong mode is far off
        s["q01"], s["q99"] = s["mean"] - 7 * s["std"], s["mean"] + 2 * s["std"]
    quantiles = {"observation.state": state.upper() == "QUANTILES", "action": action.upper() == "QUANTILES"}

    def keys(prefix):  # a dataset without quantiles has mean/std only
        return ("q01", "q99") if quantiles[prefix] else ("mean", "std")

    for name, groups in (("policy_preprocessor_step_3_normalizer_processor", (("observation.state", st),
                                                                            ("action", act))),
                         ("policy_postprocessor_step_0_unnormalizer_processor", (("action", act),))):
        save_file({f"{p}.{k}": torch.tensor(s[k], dtype=torch.float32) for p, s in groups for k in keys(p)},
                  str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi05", "normalization_mapping": {
        "VISUAL": "IDENTITY", "STATE": state, "ACTION": action}}))
    q, m = ({k: v.astype(np.float32).astype(np.float64) for k, v in s.items()} for s in (st, act))  # as stored

    def norm(x):  # lerobot 0.6.1's NormalizerProcessorStep (eps 1e-8)
        if quantiles["observation.state"]:
            return 2 * (x - q["q01"]) / (q["q99"] - q["q01"]) - 1
        return (x - q["mean"]) / (q["std"] + 1e-8)

    def unnorm(y):  # and its UnnormalizerProcessorStep
        if quantiles["action"]:
            return (y + 1) * (m["q99"] - m["q01"]) / 2 + m["q01"]
        return y * m["std"] + m["mean"]

    pol = Policy.from_checkpoint(tmp_path, robot="metaworld")
    raw = _raw(2)
    obs = pol.transform(raw)
    np.testing.assert_allclose(obs.state[0, :4].numpy(), norm(raw["observation/state"]), rtol=1e-5, atol=1e-6)
    noise = pol.model.make_noise(1, torch.Generator().manual_seed(0))
    out = pol.model.sample_actions(obs, noise.clone())
    actions, _ = pol.infer(raw, noise=noise.clone())
    # kvreuse keeps openpi's eps (1e-6, in the inverse too): within |y| * 1e-6 of lerobot's
    np.testing.assert_allclose(actions, unnorm(out[0, :, :4].numpy()), rtol=1e-5,
                               atol=1e-6 * float(out.abs().max()))
