"""The shipped testbed checkpoints: findable, loadable, and they solve an easy held-out episode."""

import pytest

from kvreuse.assets import default_checkpoint
from kvreuse.envs.metaworld import MetaWorldEnv  # selects headless GL before mujoco loads


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^variant: expected one of pi05, pi0, got 'pi1'$"):
        default_checkpoint("pi1")


@pytest.mark.parametrize("variant", ["pi05", "pi0"])
def test_shipped_policy_solves_a_held_out_episode(variant):
    pytest.importorskip("metaworld")
    import torch

    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.eval.rollout import run_episode
    from kvreuse.model.tokenizer import load_tokenizer
    from kvreuse.policy import Policy
    from kvreuse.transforms.robot import RobotTransform, robot_spec

    torch.set_num_threads(1)
    model, stats, meta = load_checkpoint(default_checkpoint(variant))
    assert meta["robot"] == "metaworld" and model.cfg.variant == variant
    assert "button-press-topdown-v3" in meta["training"]["tasks"]
    pol = Policy(model, RobotTransform(model.cfg, load_tokenizer(model.cfg), stats, robot_spec("metaworld")))
    env = MetaWorldEnv()
    try:
        # init id 0 is a held-out layout (never in the demos); 100% of 50 such episodes succeed.
        res = run_episode(pol, env, "button-press-topdown-v3", init_id=0, seed=1000)
    finally:
        env.close()
    assert res.status == "success", res
