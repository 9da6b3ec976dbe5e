"""Meta-World adapter: protocol, observation contents, deterministic layouts, experts."""

from pathlib import Path

import numpy as np
import pytest

# Import the adapter first: it selects headless EGL before mujoco is first imported.
from kvreuse.envs.metaworld import TASKS, MetaWorldEnv, expert_policy  # noqa: E402

pytest.importorskip("metaworld")


@pytest.fixture(scope="module")
def env():
    e = MetaWorldEnv(image_size=64)
    yield e
    e.close()


def test_unknown_task_lists_valid_names(env):
    with pytest.raises(ValueError, match="reach-v3"):
        env.reset("no-such-task", 0, 0)
    with pytest.raises(ValueError, match="init_id"):
        env.reset("reach-v3", 10_000, 0)


def test_observation_contents(env):
    obs = env.reset("push-v3", 0, 0)
    assert set(obs) == {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
    for k in ("observation/image", "observation/wrist_image"):
        assert obs[k].shape == (64, 64, 3) and obs[k].dtype == np.uint8
    assert obs["observation/state"].shape == (4,)  # hand xyz + gripper, no object/goal
    np.testing.assert_allclose(obs["observation/state"][:3], env.raw_obs[:3], atol=1e-6)
    assert obs["prompt"] == TASKS["push-v3"]


def test_layout_is_deterministic_per_init_id(env):
    a = env.reset("push-v3", 3, 0)["observation/image"].copy()
    ra = env.raw_obs.copy()
    env.reset("reach-v3", 0, 0)  # switching tasks in between must not matter
    b = env.reset("push-v3", 3, 1)["observation/image"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ra, env.raw_obs)
    env.reset("push-v3", 4, 0)
    assert not np.allclose(ra[4:7], env.raw_obs[4:7])  # another layout moves the puck
    env.reset("push-v3", 53, 0)  # a later block of pre-sampled layouts
    assert not np.allclose(ra[4:7], env.raw_obs[4:7])


def test_first_frame_does_not_depend_on_the_previous_episode():
    """push-v3's goal marker was placed from the previous episode's last puck position at reset:
    the same (task, init) started from another first image after another episode in the worker."""
    fresh = MetaWorldEnv(image_size=64)
    first = fresh.reset("push-v3", 3, 0)
    fresh.close()
    env = MetaWorldEnv(image_size=64)
    env.reset("push-v3", 9, 0)
    pol = expert_policy("push-v3")
    for _ in range(150):  # the expert pushes the puck to init 9's goal
        env.step(pol.get_action(env.raw_obs))
    again = env.reset("push-v3", 3, 0)
    for k in ("observation/image", "observation/wrist_image"):
        np.testing.assert_array_equal(first[k], again[k])
    env.close()


def test_closing_one_env_or_renderer_leaves_the_others_images_intact():
    """mujoco's Renderer.close frees textures in the current GL context: under OSMesa (as the tests run)
    closing or dropping env A, or a video frame of another size, turned B's camera images into noise."""
    import gc

    b = MetaWorldEnv(image_size=64)
    first = b.reset("reach-v3", 0, 0)["observation/image"].copy()
    video = b.render(64).copy()
    b.render(128)
    assert np.array_equal(b.render(64), video)  # the 128-px renderer was freed while the new 64-px one was current
    assert np.array_equal(b.reset("reach-v3", 0, 0)["observation/image"], first)
    for drop in ("close", "del"):
        a = MetaWorldEnv(image_size=64)
        a.reset("reach-v3", 1, 0)
        b.reset("reach-v3", 0, 0)  # b's context is the current one now
        if drop == "close":
            a.close()
        del a
        gc.collect()
        assert np.array_equal(b.reset("reach-v3", 0, 0)["observation/image"], first), drop
    b.close()


def test_mujoco_imported_first_under_osmesa_is_no_crash():
    """prepare_gl loaded Triton whatever was imported before: after mujoco (OSMesa's LLVM) that was a segfault."""
    import os
    import subprocess
    import sys

    code = "import mujoco\nfrom kvreuse.envs.metaworld import MetaWorldEnv\nprint('ok')"
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-500:])


def test_expert_succeeds_and_episode_ends():
    env = MetaWorldEnv(render=False, max_steps=150)
    pol = expert_policy("button-press-topdown-v3")
    env.reset("button-press-topdown-v3", 0, 0)
    done, success = False, False
    while not done:
        _, success, done = env.step(pol.get_action(env.raw_obs))
    assert success and env.steps < 150
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(3))
    env.close()


def test_trim_metaworld_wheel_drops_only_unreferenced_images(tmp_path):
    """scripts/trim_metaworld_wheel.py (how the device sweeps carried Meta-World) keeps every image an
    XML or Python file names, and the wheel's RECORD lists exactly the files left."""
    import runpy
    import zipfile

    trim = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "trim_metaworld_wheel.py"))["trim"]
    files = {
        "metaworld/assets/scene.xml": b'<texture file="../textures/used.png"/>',
        "metaworld/envs/env.py": b'ICON = "code_used.png"',
        "metaworld/assets/textures/used.png": b"u" * 10,
        "metaworld/assets/textures/code_used.png": b"c" * 10,
        "metaworld/assets/textures/unused.png": b"x" * 10,
    }
    src = tmp_path / "metaworld-0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr("metaworld-0.dist-info/RECORD", "".join(f"{n},sha256=x,10\n" for n in files)
                   + "metaworld-0.dist-info/RECORD,,\n")
    out = trim(src, tmp_path / "out")
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        record = {line.split(",")[0] for line in z.read("metaworld-0.dist-info/RECORD").decode().splitlines()}
        assert z.read("metaworld/assets/textures/used.png") == files["metaworld/assets/textures/used.png"]
    assert names == set(files) - {"metaworld/assets/textures/unused.png"} | {"metaworld-0.dist-info/RECORD"}
    assert record == names
