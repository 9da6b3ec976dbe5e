"""Policy.from_checkpoint on reference (lerobot) files: the robot must be named, and the fast
runtime gives the eager actions."""

from __future__ import annotations

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
