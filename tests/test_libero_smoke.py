"""LIBERO adapter: protocol helpers always; a smoke test of the real simulator when the
`kvreuse[libero]` extra is installed (scripts/install_libero.sh), skipped otherwise."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from kvreuse.envs.libero import (
    DUMMY_ACTION, ENV_SEED, SETTLE_STEPS, SUITES, check_suite, quat2axisangle, resize_with_pad,
)


def test_protocol_constants():
    assert SUITES == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                      "libero_90": 400}
    assert SETTLE_STEPS == 10 and DUMMY_ACTION == [0, 0, 0, 0, 0, 0, -1]
    with pytest.raises(ValueError, match="valid suites: libero_spatial, libero_object"):
        check_suite("libero_100")


def test_quat2axisangle():
    assert np.allclose(quat2axisangle([0, 0, 0, 1]), 0)  # identity
    s = math.sin(math.pi / 4)
    assert np.allclose(quat2axisangle([0, 0, s, math.cos(math.pi / 4)]), [0, 0, math.pi / 2])  # 90° about z
    assert np.allclose(quat2axisangle([1, 0, 0, 0]), [math.pi, 0, 0])  # 180° about x
    assert np.allclose(quat2axisangle([0, 0, 0, 1.0000001]), 0)  # w slightly > 1 is clipped


def test_resize_with_pad():
    img = np.full((256, 256, 3), 200, np.uint8)
    out = resize_with_pad(img, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and (out == 200).all()
    wide = np.full((100, 200, 3), 255, np.uint8)
    out = resize_with_pad(wide, 224)
    assert out.shape == (224, 224, 3)
    assert (out[:50] == 0).all() and (out[-50:] == 0).all() and (out[60:160] == 255).all()


libero_installed = importlib.util.find_spec("libero") is not None and importlib.util.find_spec("robosuite") is not None


@pytest.fixture(scope="module")
def env():
    from kvreuse.envs.libero import LiberoEnv

    e = LiberoEnv("libero_spatial")
    yield e
    e.close()


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_reset_settle_flips_state(env):
    task = env.tasks[0]
    assert len(env.tasks) == 10 and env.num_inits(task) == 50 and env.max_steps(task) == 220
    with pytest.raises(ValueError, match="valid tasks"):
        env.max_steps("no_such_task")
    obs = env.reset(task, 0, seed=0)  # builds the scene
    calls = []
    inner = env._env.step
    env._env.step = lambda a: (calls.append(list(a)), inner(a))[1]
    try:
        obs = env.reset(task, 3, seed=0)
    finally:
        env._env.step = inner
    assert calls == [DUMMY_ACTION] * SETTLE_STEPS
    raw = env.last_raw
    assert raw["agentview_image"].shape == (256, 256, 3)
    for key, cam in (("observation/image", "agentview_image"), ("observation/wrist_image", "robot0_eye_in_hand_image")):
        img = obs[key]
        assert img.shape == (224, 224, 3) and img.dtype == np.uint8
        flipped = resize_with_pad(np.ascontiguousarray(raw[cam][::-1, ::-1]), 224)
        assert np.array_equal(img, flipped)
        assert not np.array_equal(img, resize_with_pad(np.ascontiguousarray(raw[cam]), 224))
    st = obs["observation/state"]
    assert st.shape == (8,) and np.isfinite(st).all()
    assert np.allclose(st[:3], raw["robot0_eef_pos"], atol=1e-6)
    assert np.allclose(st[3:6], quat2axisangle(raw["robot0_eef_quat"]), atol=1e-5)
    assert np.allclose(st[6:], raw["robot0_gripper_qpos"], atol=1e-6)
    assert obs["prompt"] == env.prompt(task) and "bowl" in obs["prompt"]


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_policy_steps_tiny_model(env):
    from kvreuse.eval.rollout import run_episode
    from kvreuse.eval.sweep import PolicySource, load_model, make_policy

    model, tf, _ = load_model(PolicySource(None, "tiny-pi05"), "libero")
    pol = make_policy(model, tf, None)
    task = env.tasks[1]
    raw = env.reset(task, 0, seed=0)
    actions, rec = pol.infer(raw)
    assert actions.shape == (model.cfg.chunk_size, 7) and np.isfinite(actions).all()
    r = run_episode(pol, env, task, 0, seed=1, replan=5, max_steps=7)
    assert r.error == "" and r.status in ("success", "failure")
    assert r.steps == 7 and r.calls == 2


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_gripper_sign_is_passed_through(env):
    """openpi's LIBERO actions go to the env as they are: gripper -1 opens, +1 closes."""
    task = env.tasks[0]
    env.reset(task, 0, seed=0)
    width = {}
    for g in (1.0, -1.0):
        for _ in range(5):
            obs, _, _ = env.step(np.array([0, 0, 0, 0, 0, 0, g]))
        width[g] = obs["observation/state"][6] - obs["observation/state"][7]  # finger qpos: +x / -x
    assert width[-1.0] > width[1.0] + 0.01


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_sweep_refuses_inits_and_step_limits_past_the_suites(tmp_path):
    from kvreuse.eval.sweep import PolicySource, SweepPlan, run_sweep

    for kw, msg in (({"init_start": 50}, r"init_start: 50 is past the last init state of libero:libero_goal task "
                                         r"'.*' \(ids 0\.\.49\)"),
                    ({"max_steps": 301}, "max_steps: 301 is above libero:libero_goal's episode limit of 300 steps")):
        plan = SweepPlan(db=str(tmp_path / "l.db"), env="libero:libero_goal", episodes=1, workers=0,
                         progress=False, **kw)
        with pytest.raises(ValueError, match=msg):
            run_sweep(plan, PolicySource(None, "tiny-pi05"))
    assert not (tmp_path / "l.db").exists()


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_a_libero_config_of_ones_own_names_the_assets(tmp_path, monkeypatch):
    """A LIBERO set up by hand (LIBERO_CONFIG_PATH set, its own assets) was refused for lacking
    kvreuse's asset packages, whose folder also replaced the one its config names."""
    import libero.libero as ll

    from kvreuse.envs import libero as lb

    own = tmp_path / "my_assets"
    (own / "scenes").mkdir(parents=True)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text(f"benchmark_root: /x\nassets: {own}\n")
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    monkeypatch.setenv("KVREUSE_LIBERO_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("KVREUSE_LIBERO_ASSETS", raising=False)
    monkeypatch.setattr(ll, "_assets_path_cache", None, raising=False)
    lb._prepare_libero_import()
    assert ll._assets_path_cache == str(own)


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_task_given_as_its_instruction_points_at_its_name(env):
    from kvreuse.eval.envs import check_tasks

    task = env.tasks[2]
    with pytest.raises(ValueError, match=f"did you mean {task}\\?"):
        check_tasks(env, (env.prompt(task),))


def _sim_state(e) -> np.ndarray:
    return e._env.env.sim.get_state().flatten()


def _count_renders(e):
    """Counts the offscreen renders of `e`'s current sim (the camera sensors call sim.render)."""
    sim = e._env.env.sim
    calls = []
    inner = sim.render
    sim.render = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
    return calls


def _reference_reset(e, task: str, init_id: int) -> tuple[dict, int]:
    """The settle loop as it was: every settle step renders both cameras (the reference for exactness)."""
    e._fresh_sim()
    renders = _count_renders(e)
    e._env.set_init_state(e.init_states(task)[init_id])
    for _ in range(SETTLE_STEPS):
        raw, _, _, _ = e._env.step(DUMMY_ACTION)
    return raw, len(renders)


RAW_KEYS = ("agentview_image", "robot0_eye_in_hand_image", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
POLICY_ACTIONS = [[0.4, -0.3, 0.2, 0.05, -0.05, 0.1, 1.0], [-0.2, 0.5, -0.4, 0.0, 0.1, -0.1, -1.0]] * 2


def _policy_steps(e) -> tuple[list[dict], list[np.ndarray]]:
    """From the observation reset() left, POLICY_ACTIONS through LiberoEnv.step: (raw observations, MuJoCo
    states), one per step and the reset's first."""
    raws, states = [{k: e.last_raw[k].copy() for k in RAW_KEYS}], [_sim_state(e)]
    for a in POLICY_ACTIONS:
        e.step(np.array(a))
        raws.append({k: e.last_raw[k].copy() for k in RAW_KEYS})
        states.append(_sim_state(e))
    return raws, states


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
@pytest.mark.parametrize("suite,cases", [("libero_spatial", ((6, 41),)), ("libero_object", ((2, 19),))])
def test_libero_settle_renders_once_and_matches_the_rendering_loop_bit_for_bit(suite, cases):
    """The settle steps render the cameras in the last step only, yet the observation, the MuJoCo state and
    the later policy steps (which render every step) are bit-identical to the loop that rendered every step."""
    from kvreuse.envs.libero import LiberoEnv

    e = LiberoEnv(suite, scenes="first")  # _reference_reset is that path's
    try:
        for task_i, init_id in cases:
            task = e.tasks[task_i]
            e.reset(task, init_id)  # builds the scene
            ref_raw, ref_renders = _reference_reset(e, task, init_id)
            ref = [{k: ref_raw[k].copy() for k in RAW_KEYS}], [_sim_state(e)]
            for a in POLICY_ACTIONS:
                raw, _, _, _ = e._env.step(a)
                ref[0].append({k: raw[k].copy() for k in RAW_KEYS})
                ref[1].append(_sim_state(e))

            inner_reset = e._env.reset
            renders = []  # counted from the new sim on, as for the reference
            e._env.reset = lambda f=inner_reset, n=renders: (f(), n.append(_count_renders(e)))[0]
            try:
                obs = e.reset(task, init_id)
            finally:
                del e._env.reset
            assert ref_renders - len(renders[0]) == 2 * (SETTLE_STEPS - 1)  # 2 cameras, settle steps 1..9 skipped
            got = _policy_steps(e)
            for step, (r, g) in enumerate(zip(ref[0], got[0], strict=True)):
                for k in RAW_KEYS:
                    assert r[k].dtype == g[k].dtype and np.array_equal(r[k], g[k]), (task, init_id, step, k)
            for step, (r, g) in enumerate(zip(ref[1], got[1], strict=True)):
                assert np.array_equal(r, g), (task, init_id, step, "sim state")
            assert np.array_equal(obs["observation/image"], resize_with_pad(ref[0][0]["agentview_image"][::-1, ::-1],
                                                                            224))
            assert not np.array_equal(ref[0][0]["agentview_image"], ref[0][1]["agentview_image"])  # steps render
    finally:
        e.close()


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_settle_error_leaves_the_cameras_rendering(env):
    from kvreuse.envs.libero import CAMERA_OBSERVABLES

    task = env.tasks[0]
    env.reset(task, 0)
    inner, calls = env._env.step, []

    def failing(a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulator crash")
        return inner(a)

    env._env.step = failing
    try:
        with pytest.raises(RuntimeError, match="simulator crash"):
            env.reset(task, 1)
    finally:
        env._env.step = inner
    cams = [env._env.env._observables[name] for name in CAMERA_OBSERVABLES]
    assert [cam._sensor.__name__ for cam in cams] == ["camera_rgb"] * 2  # robosuite's own sensors again
    renders = _count_renders(env)
    raw, _, _, _ = env._env.step(DUMMY_ACTION)
    assert len(renders) == 2


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_settle_refuses_to_return_a_held_frame(env):
    """A camera sampled less often than every control step would keep a held frame: an error, not a stale image;
    one that samples nothing during the settle steps returns the same frame as the rendering loop."""
    task = env.tasks[0]
    env.reset(task, 0)
    cam = env._env.env._observables["agentview_image"]
    rate = 1.0 / cam._sampling_timestep
    try:
        cam.set_sampling_rate(1 / 0.3)  # samples at ~0.3 s (settle step 7), next at ~0.6 s: none in step 10
        with pytest.raises(RuntimeError, match="agentview_image sampled a held frame and was not rendered"):
            env.reset(task, 1)
    finally:
        cam.set_sampling_rate(rate)
    # The frame held from reset time is compared on a hard-reset env: the soft reset keeps the GL context,
    # and once another env's context was made in the process (earlier tests) its reset-time render is not
    # the scene's. No observation uses that render (the settle's last step renders; see above).
    from kvreuse.envs.libero import LiberoEnv

    hard = LiberoEnv("libero_spatial", hard_reset=True, scenes="first")
    try:
        hard.reset(task, 0)
        cam = hard._env.env._observables["agentview_image"]
        cam.set_sampling_rate(1.0)  # no sample after set_init_state's within the 0.5 s of settle steps
        ref_raw, _ = _reference_reset(hard, task, 1)
        hard.reset(task, 1)
        assert np.array_equal(hard.last_raw["agentview_image"], ref_raw["agentview_image"])
    finally:
        hard.close()


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
@pytest.mark.parametrize("suite,task_i,images_vs_hard", [("libero_spatial", 0, True), ("libero_object", 2, True),
                                                         ("libero_goal", 1, True), ("libero_10", 3, False)])
def test_libero_soft_reset_gives_the_hard_resets_episodes_bit_for_bit(suite, task_i, images_vs_hard):
    """LiberoEnv resets softly (the model and GL context kept: 0.8-0.9 s against 3.4-3.6 s). Its episodes, in any
    order, have the MuJoCo state of LIBERO's hard reset (which rebuilds the model each time) at every settle
    and policy step, bit for bit, and the same observations. Without zeroing the gripper's incremental
    command the second episode started from the first one's (state up to 0.03 apart); without the hard
    reset's warm start, libero_object's drifted from 1e-12. libero_10's scene renders another image from
    the same state after a hard reset (LIBERO's own path differs from itself between episodes there), so its
    images are compared between the soft env's episodes of one init only."""
    from kvreuse.envs.libero import LiberoEnv

    soft, hard = LiberoEnv(suite, scenes="first"), LiberoEnv(suite, hard_reset=True, scenes="first")
    task = soft.tasks[task_i]
    runs = {"soft": [], "hard": []}
    try:
        for init_id in (1, 2, 1):
            for name, e in (("soft", soft), ("hard", hard)):
                e.reset(task, init_id)
                runs[name].append(_policy_steps(e))
        assert soft._env.env.hard_reset is False and hard._env.env.hard_reset is True  # after the first reset
    finally:
        soft.close()
        hard.close()
    keys = RAW_KEYS if images_vs_hard else tuple(k for k in RAW_KEYS if not k.endswith("_image"))
    for ep, ((rs, ss), (rh, sh)) in enumerate(zip(runs["soft"], runs["hard"], strict=True)):
        for step in range(len(rs)):
            assert np.array_equal(ss[step], sh[step]), (ep, step, "sim state")
            for k in keys:
                assert np.array_equal(rs[step][k], rh[step][k]), (ep, step, k)
    (first, _), (again, _) = runs["soft"][0], runs["soft"][2]  # init 1 before and after init 2
    for step in range(len(first)):
        for k in RAW_KEYS:
            assert np.array_equal(first[step][k], again[step][k]), (step, k)


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_episode_k_has_openpis_kth_fixture_layout_in_any_order(tmp_path, monkeypatch):
    """openpi seeds once per task and hard-resets per episode: its episode k has the k-th fixture layout
    (model.body_pos, not in the init state). Every episode here had episode 0's (fixtures up to 1.3 cm
    off in episode 1, scripts/libero_fixtures.py). Now the same images, bit for bit, in any order, and
    the generator states found on the way are kept on disk for the next process."""
    from kvreuse.envs.libero import LiberoEnv

    monkeypatch.setenv("KVREUSE_LIBERO_SCENES", str(tmp_path / "scenes"))
    ours = LiberoEnv("libero_spatial")  # first: it writes LIBERO's config, which LIBERO's import would ask for
    from libero.libero.envs import OffScreenRenderEnv

    task = ours.tasks[0]
    inits = ours.init_states(task)
    ref = OffScreenRenderEnv(bddl_file_name=ours._bench.get_task_bddl_file_path(0),
                             camera_heights=ours.render_size, camera_widths=ours.render_size)
    try:
        ref.seed(ENV_SEED)  # openpi's sequence first: both use numpy's global generator
        theirs = []
        for k in range(3):
            ref.reset()
            ref.set_init_state(inits[k])
            for _ in range(SETTLE_STEPS):
                raw, _, _, _ = ref.step(DUMMY_ACTION)
            body = ref.env.sim.model.body_pos.copy()
            theirs.append((body, raw["agentview_image"].copy()))
        assert not np.array_equal(theirs[0][0], theirs[1][0])  # the layouts do differ
        for k in (2, 0, 1):
            ours.reset(task, k)
            assert np.array_equal(ours._env.env.sim.model.body_pos, theirs[k][0]), k
            assert np.array_equal(ours.last_raw["agentview_image"], theirs[k][1]), k
        resets = []
        again = LiberoEnv("libero_spatial")  # another process: the states are on disk, no walk
        inner = again._hard_reset
        monkeypatch.setattr(again, "_hard_reset", lambda: (resets.append(1), inner())[1])
        again.reset(task, 2)
        assert len(resets) == 1 and np.array_equal(again.last_raw["agentview_image"], theirs[2][1])
        again.close()
        with pytest.raises(ValueError, match="scenes: expected one of openpi, first"):
            LiberoEnv("libero_spatial", scenes="all")
    finally:
        ref.close()
        ours.close()


@pytest.mark.skipif(not libero_installed, reason="LIBERO not installed (bash scripts/install_libero.sh)")
def test_libero_scene_states_are_shared_between_running_workers_and_mended(tmp_path, monkeypatch):
    """Each process read the scenes folder once per task, so running workers walked through each other's
    layouts (hard resets, ~3.5 s each, up to one per worker per episode); a wrong file was trusted for
    good. Hard resets here are stand-ins that draw from numpy's global generator as LIBERO's do."""
    from kvreuse.envs.libero import LiberoEnv

    monkeypatch.setenv("KVREUSE_LIBERO_SCENES", str(tmp_path))
    a, b = LiberoEnv("libero_spatial"), LiberoEnv("libero_spatial")
    task, walks = a.tasks[0], {"a": 0, "b": 0}
    for name, e in (("a", a), ("b", b)):
        monkeypatch.setattr(e, "_hard_reset", lambda n=name: (walks.__setitem__(n, walks[n] + 1), np.random.random(7)))
    b._openpi_reset(task, 0)  # b has read the folder (state 1 is on disk now)
    a._openpi_reset(task, 3)  # from state 1: resets 1, 2, 3
    assert walks == {"a": 3, "b": 1}
    b._openpi_reset(task, 3)  # a's states are found, not walked again
    assert walks == {"a": 3, "b": 2}
    state_3 = b._states[task][3][1]
    f = a._scene_file(task, 2)
    np.savez(f, keys=np.zeros(3, np.uint32), pos=0, has_gauss=0, gauss=0.0)  # another shape: ignored
    c = LiberoEnv("libero_spatial")
    monkeypatch.setattr(c, "_hard_reset", lambda: np.random.random(7))
    c._openpi_reset(task, 2)  # from state 1, through the wrong file's k
    assert np.array_equal(np.random.get_state()[1], state_3)
    with np.load(f) as z:
        assert z["keys"].shape == (624,)  # mended on the way
