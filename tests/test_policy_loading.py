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
