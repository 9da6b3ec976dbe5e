"""Meta-World adapter (the embedded testbed), following the EpisodeEnv protocol of envs/base.py.

- Tasks: TASKS below, each with a written prompt (Meta-World has no language instruction).
- Layouts: Meta-World pre-samples layouts (object / goal positions) in blocks of 50 per seed
  (`metaworld.MT1(task, seed=block)`). Init id i is layout i % 50 of block i // 50, so a
  (task, init_id) pair is always the same scene. Split used by the testbed (train/demos.py):
  ids 0..49 (block 0) are held out for evaluation; demos use ids >= 50 (TRAIN_INIT_START).
- Cameras: a third-person "corner3" view (Meta-World's corner cameras are rolled 180°, so the
  image is rotated back here) and the "gripperPOV" camera on the hand, in the spirit of
  LIBERO's agent-view + wrist cameras. Rendered directly at `image_size` (default 128, the tiny
  policies' input size: no resize needed) with MuJoCo's speed settings (no multisampling, no
  shadows).
- State: hand xyz + gripper opening (4 floats). Object and goal positions are NOT in it: the
  policy must read them from the images.
- Success: Meta-World's own `info["success"]`.

mujoco / metaworld are imported inside the class so `import kvreuse` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import prepare_gl

prepare_gl()  # before MuJoCo is imported (metaworld / robosuite import it too)

# Prompts name what the images show (goal marker colours as Meta-World renders them).
TASKS: dict[str, str] = {
    "reach-v3": "reach the red goal point",
    "push-v3": "push the puck to the green goal",
    "pick-place-v3": "pick the puck and place it at the blue goal",
    "button-press-topdown-v3": "press the button down from the top",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "window-open-v3": "slide the window open",
    "plate-slide-v3": "slide the plate into the goal",
    "handle-press-v3": "press the handle down",
    "coffee-button-v3": "press the button on the coffee machine",
}

LAYOUTS_PER_BLOCK = 50  # Meta-World's _N_GOALS: layouts pre-sampled per MT1 seed
TRAIN_INIT_START = 50  # init ids below this are held out for evaluation (never in demos)
STATE_DIM = 4
ACTION_DIM = 4
MIN_IMAGE_SIZE = 8  # the smallest render the env takes (`kvreuse demos --image-size` checks it up front)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown Meta-World task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


def prompt_for(task: str) -> str:
    return TASKS[check_task(task)]


def expert_policy(task: str):
    """Meta-World's scripted expert for `task` (e.g. SawyerPickPlaceV3Policy)."""
    from metaworld import policies

    base = check_task(task).removesuffix("-v3")
    name = "Sawyer" + "".join(p.capitalize() for p in base.split("-")) + "V3Policy"
    return getattr(policies, name)()


@dataclass(frozen=True)
class MetaWorldConfig:
    image_size: int = 128  # rendered straight at this size (square)
    base_camera: str = "corner3"
    wrist_camera: str = "gripperPOV"
    max_steps: int = 200  # per episode (Meta-World itself stops at 500); experts need <= ~100
    num_inits: int = 500  # init ids 0..num_inits-1 (blocks of 50 pre-sampled layouts)
    render: bool = True  # False: no images in observations (fast expert checks)


class MetaWorldEnv:
    """One Meta-World scene at a time; switching task rebuilds the underlying env."""

    robot = "metaworld"
    tasks: tuple[str, ...] = tuple(TASKS)

    def __init__(self, cfg: MetaWorldConfig | None = None, **overrides):
        cfg = cfg or MetaWorldConfig()
        if overrides:
            import dataclasses

            cfg = dataclasses.replace(cfg, **overrides)
        if cfg.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size: expected a positive size >= {MIN_IMAGE_SIZE}, got {cfg.image_size}")
        if not 1 <= cfg.max_steps <= 500:
            raise ValueError(f"max_steps: expected 1..500 (Meta-World's episode limit), got {cfg.max_steps}")
        self.cfg = cfg
        self._task: str | None = None
        self._env = None
        self._renderer = None
        self._video_renderer = None
        self._layouts: dict[tuple[str, int], list] = {}
        self._raw: np.ndarray | None = None
        self._steps = 0

    # ---- protocol ---------------------------------------------------------------------------
    def max_steps(self, task: str) -> int:
        check_task(task)
        return self.cfg.max_steps

    def num_inits(self, task: str) -> int:
        check_task(task)
        return self.cfg.num_inits

    def reset(self, task: str, init_id: int, seed: int = 0) -> dict:
        check_task(task)
        if not 0 <= init_id < self.cfg.num_inits:
            raise ValueError(f"init_id: expected 0..{self.cfg.num_inits - 1}, got {init_id}")
        if task != self._task:
            self._build(task)
        block, idx = divmod(init_id, LAYOUTS_PER_BLOCK)
        self._env.set_task(self._layout_block(task, block)[idx])
        raw, _ = self._env.reset(seed=seed)
        # Meta-World's reset runs reset_model once on the previous episode's sim data before
        # resetting it, and push places its goal marker from where that episode left the puck;
        # step() re-places the target sites, reset does not. Without this, push's first frame
        # depended on the worker's previous episode (so a baseline and a reuse run of one
        # episode could start from different images).
        for site in self._env._target_site_config:
            self._env._set_pos_site(*site)
        self._raw, self._steps = np.asarray(raw), 0
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        if self._env is None:
            raise ValueError("step() before reset(): start an episode first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,) or not np.isfinite(a).all():
            raise ValueError(f"action: expected {ACTION_DIM} finite floats (dx, dy, dz, gripper), got {np.asarray(action).shape}")
        raw, _, _, _, info = self._env.step(np.clip(a, -1.0, 1.0))
        self._raw, self._steps = np.asarray(raw), self._steps + 1
        success = bool(info["success"])
        done = success or self._steps >= self.cfg.max_steps
        return self._obs(), success, done

    def render(self, size: int = 256) -> np.ndarray:
        """RGB frame of the third-person camera for videos (upright)."""
        import mujoco

        if self._env is None:
            raise ValueError("render() before reset(): start an episode first")
        if self._video_renderer is None or self._video_renderer.height != size:
            _free(self._video_renderer)
            self._video_renderer = mujoco.Renderer(self._env.model, size, size)
        return self._camera(self._video_renderer, self.cfg.base_camera)

    def __del__(self) -> None:  # a dropped env: its renderers freed in their own GL contexts too
        try:
            if hasattr(self, "_renderer"):
                self.close()
        except Exception:  # at interpreter exit
            pass

    def close(self) -> None:
        _free(self._renderer)
        _free(self._video_renderer)
        self._renderer = self._video_renderer = None
        if self._env is not None:
            self._env.close()
        self._env, self._task = None, None

    # ---- extras for demos / experts ---------------------------------------------------------
    @property
    def raw_obs(self) -> np.ndarray:
        """Meta-World's full 39-float observation (object/goal positions included): for the
        scripted experts only, never for the policy."""
        if self._raw is None:
            raise ValueError("no observation yet: call reset() first")
        return self._raw

    @property
    def steps(self) -> int:
        return self._steps

    # ---- internals --------------------------------------------------------------------------
    def _build(self, task: str) -> None:
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.close()
        env = ALL_V3_ENVIRONMENTS[task]()
        env.max_path_length = 500
        if self.cfg.render:
            # Speed settings must be in place before the first GL context is made.
            env.model.vis.quality.offsamples = 0
            env.model.vis.quality.shadowsize = 0
            s = self.cfg.image_size
            env.model.vis.global_.offwidth = max(env.model.vis.global_.offwidth, s, 256)
            env.model.vis.global_.offheight = max(env.model.vis.global_.offheight, s, 256)
            for cam in (self.cfg.base_camera, self.cfg.wrist_camera):
                if mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, cam) < 0:
                    raise ValueError(f"camera {cam!r} not in the Meta-World model")
            self._renderer = mujoco.Renderer(env.model, s, s)
        self._env, self._task = env, task

    def _layout_block(self, task: str, block: int) -> list:
        key = (task, block)
        if key not in self._layouts:
            import metaworld

            self._layouts[key] = metaworld.MT1(task, seed=block).train_tasks
        return self._layouts[key]

    def _camera(self, renderer, cam: str) -> np.ndarray:
        renderer.update_scene(self._env.data, camera=cam)
        img = renderer.render()
        if cam.startswith("corner"):  # these cameras are rolled 180° in Meta-World's model
            img = img[::-1, ::-1]
        return np.ascontiguousarray(img)

    def _obs(self) -> dict:
        raw = self._raw
        obs = {
            "observation/state": np.concatenate([raw[0:3], raw[3:4]]).astype(np.float32),
            "prompt": TASKS[self._task],
        }
        if self.cfg.render:
            obs["observation/image"] = self._camera(self._renderer, self.cfg.base_camera)
            obs["observation/wrist_image"] = self._camera(self._renderer, self.cfg.wrist_camera)
        return obs


def _free(r) -> None:
    """Close a mujoco Renderer with its own GL context current: close() frees textures in whichever
    context is current, and under OSMesa another env's (or the other renderer's) images turned to
    noise (mujoco issue #1186)."""
    if r is None:
        return
    try:
        ctx = getattr(r, "_gl_context", None)
        if ctx is not None:
            ctx.make_current()
        r.close()
    except Exception:  # GL contexts torn down at exit: nothing left to free
        pass
