"""Per-robot input/output transforms: an openpi-style observation dict -> Observation, and the
model's padded, normalized action chunk -> the robot's actions.

The dict uses openpi's flat keys (`observation/image`, `observation/wrist_image`,
`observation/state`, `prompt`), so the simulator adapters and the policy server share one path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..model.config import ModelConfig
from ..model.tokenizer import Tokenizer, tokenize_prompts
from ..observation import Observation
from .images import preprocess_image
from .normalize import NormMode, NormStats, check_modes, default_mode, normalize, pad_to, unnormalize


@dataclass(frozen=True)
class RobotSpec:
    name: str
    cameras: tuple[tuple[str, str], ...]  # (dict key, model camera name)
    state_dim: int
    action_dim: int
    flip180: tuple[str, ...] = ()  # dict keys whose images arrive upside down
    state_key: str = "observation/state"
    prompt_key: str = "prompt"
    # model camera -> other names checkpoints give it (lerobot's LIBERO fine-tunes: image, image2)
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def camera_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.cameras)

    def for_cameras(self, model_cameras) -> "RobotSpec":
        """This spec with each camera named as the model names it, where it uses one of the aliases."""
        names = dict(self.aliases)
        cams = tuple((k, c if c in model_cameras else next((a for a in names.get(c, ()) if a in model_cameras), c))
                     for k, c in self.cameras)
        return self if cams == self.cameras else replace(self, cameras=cams)


ROBOTS: dict[str, RobotSpec] = {
    # Meta-World testbed: corner camera + a gripper camera, hand xyz + gripper opening.
    "metaworld": RobotSpec(
        "metaworld", (("observation/image", "base"), ("observation/wrist_image", "wrist")), state_dim=4, action_dim=4
    ),
    # LIBERO as openpi serves it (the client flips the images before sending).
    "libero": RobotSpec(
        "libero",
        (("observation/image", "base_0_rgb"), ("observation/wrist_image", "left_wrist_0_rgb")),
        state_dim=8,
        action_dim=7,
        # lerobot's LIBERO datasets name them image / image2 (its pi0 / pi05 LIBERO fine-tunes keep those)
        aliases=(("base_0_rgb", ("image",)), ("left_wrist_0_rgb", ("image2", "wrist_image"))),
    ),
}


def robot_spec(name: str) -> RobotSpec:
    if name not in ROBOTS:
        raise ValueError(f"unknown robot {name!r}; valid robots: {', '.join(ROBOTS)}")
    return ROBOTS[name]


def fit_cameras(model, spec: RobotSpec):
    """`model` over the cameras this robot feeds (Pi0Model.with_cameras). A model camera the robot
    lacks would be fed black and masked out on every call (LIBERO under a 3-camera Pi0 / Pi0.5:
    the right wrist), which changes no action; leaving it out skips its share of the work."""
    fed = {c for _, c in spec.cameras}
    return model.with_cameras(tuple(c for c in model.cfg.cameras if c in fed) or model.cfg.cameras)


class RobotTransform:
    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: Tokenizer,
        stats: NormStats | None,
        spec: RobotSpec,
        norm_mode: NormMode | None = None,
        truncate: bool = False,
        default_prompt: str | None = None,
    ):
        self.cfg, self.tok, self.stats, self.spec, self.truncate = cfg, tokenizer, stats, spec, truncate
        # Used when an observation has no prompt key (as openpi's default_prompt); None: required.
        self.default_prompt = default_prompt
        # Per side: norm_mode (both), else what the stats say (NormStats.state_mode / actions_mode:
        # a lerobot Pi0.5 trained with MEAN_STD), else the variant's default.
        st, act = stats.modes(cfg.variant) if stats else (default_mode(cfg.variant),) * 2
        check_modes({"norm_mode": norm_mode, "stats state_mode": st, "stats actions_mode": act})
        self.state_mode: NormMode = norm_mode or st
        self.action_mode: NormMode = norm_mode or act
        if len(cfg.delta_action_mask) > min(spec.state_dim, spec.action_dim):
            raise ValueError(f"the model's delta_action_mask has {len(cfg.delta_action_mask)} dims; robot "
                             f"{spec.name!r} has {spec.state_dim} state / {spec.action_dim} action dims")
        unknown = [c for _, c in spec.cameras if c not in cfg.cameras]
        if unknown:
            raise ValueError(f"robot {spec.name!r} maps to camera(s) {unknown} the model does not have: {list(cfg.cameras)}")

    # ---- input ------------------------------------------------------------------------------
    def __call__(self, raw: dict, device=None) -> Observation:
        spec, cfg = self.spec, self.cfg
        if not isinstance(raw, Mapping):
            raise ValueError(f"observation: expected a dict of {[*spec.camera_keys, spec.state_key, spec.prompt_key]}, "
                             f"got {type(raw).__name__}")
        known = set(spec.camera_keys) | {spec.state_key, spec.prompt_key}
        unknown_cams = [k for k in raw if k not in known and "image" in k]
        if unknown_cams:
            raise ValueError(f"unknown camera key(s) {unknown_cams}; this robot's cameras: {list(spec.camera_keys)}")
        required = (*spec.camera_keys, spec.state_key, *((spec.prompt_key,) if self.default_prompt is None else ()))
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"missing key(s) {missing}; expected {sorted(known)}")

        state = self._state(raw[spec.state_key])
        if state.ndim == 1:
            state = state[None]
        if state.ndim != 2 or state.shape[1] != spec.state_dim:
            raise ValueError(f"{spec.state_key}: expected ({spec.state_dim},) or (B, {spec.state_dim}), got {state.shape}")
        if not np.isfinite(state).all():
            raise ValueError(f"{spec.state_key}: contains NaN or inf")
        b = state.shape[0]
        if b == 0:
            raise ValueError(f"{spec.state_key}: empty batch (shape {state.shape})")
        # Checked before the images, which may be copied to the device.
        prompt = raw.get(spec.prompt_key, self.default_prompt)
        if isinstance(prompt, str):
            prompts = [prompt] * b
        elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"{spec.prompt_key}: expected a string or a list of strings, got {type(prompt).__name__}")
        if len(prompts) != b:
            raise ValueError(f"{spec.prompt_key}: {len(prompts)} prompts for a batch of {b}")
        if not all(p.strip() for p in prompts):  # as bad as a missing one: a policy with no task
            raise ValueError(f"{spec.prompt_key}: empty; give the task in words")

        size = cfg.vision.image_size
        images, masks = {}, {}
        to_model = dict((c, k) for k, c in spec.cameras)
        for cam in cfg.cameras:
            key = to_model.get(cam)
            if key is None:  # the model has a camera this robot lacks: fed black, masked out
                images[cam] = torch.full((b, 3, size, size), -1.0, device=device)
                masks[cam] = torch.zeros(b, dtype=torch.bool)
                continue
            img = preprocess_image(raw[key], size, key in spec.flip180, name=key, device=device)
            if img.shape[0] != b:
                raise ValueError(f"{key}: batch size {img.shape[0]} does not match the state's {b}")
            images[cam], masks[cam] = img, torch.ones(b, dtype=torch.bool)

        nstate = normalize(state, self.stats.state, self.state_mode) if self.stats else state
        with np.errstate(over="ignore"):  # an overflow is refused just below, with the key's name
            model_state = pad_to(nstate, cfg.max_state_dim)
        if not np.isfinite(model_state).all():  # finite in float64, inf once normalised to float32
            raise ValueError(f"{spec.state_key}: out of range (the normalised state overflows float32)")
        toks = tokenize_prompts(cfg, self.tok, prompts, nstate if cfg.state_in_prompt else None, self.truncate)
        obs = Observation(
            images=images,
            image_masks=masks,
            state=torch.from_numpy(model_state),
            tokens=toks.tokens,
            token_mask=toks.mask,
            state_token_mask=toks.state_mask,
            prompt=tuple(prompts),
        )
        return obs.to(device) if device is not None else obs

    def _state(self, x) -> np.ndarray:
        """The state as float64; anything but numbers is refused here, naming the key (numpy's
        own errors do not)."""
        key = self.spec.state_key
        try:
            a = np.asarray(x)
        except ValueError:  # ragged nested lists
            raise ValueError(f"{key}: expected an array of numbers, got a ragged {type(x).__name__}") from None
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{key}: expected an array of numbers, got {type(x).__name__} of dtype {a.dtype}")
        return a.astype(np.float64, copy=False)

    # ---- output -----------------------------------------------------------------------------
    def batched(self, raw: dict) -> bool:
        """Whether `raw` came with a batch axis (state (B, state_dim)): then its actions keep one."""
        return np.ndim(raw[self.spec.state_key]) != 1

    def actions(self, out: torch.Tensor, raw: dict | None = None) -> np.ndarray:
        """(B, chunk, max_action_dim) model output -> (B, chunk, action_dim) robot actions. raw: the
        observation the output answers; its state is added back to the delta dims (a model with a
        delta_action_mask), after unnormalizing, as openpi's AbsoluteActions does."""
        a = out.detach().float().cpu().numpy()[..., : self.spec.action_dim]
        a = unnormalize(a, self.stats.actions, self.action_mode) if self.stats else a
        a = self._shift(a, raw, +1)
        if not np.isfinite(a).all():  # never hand a robot NaN or inf
            raise RuntimeError("the model produced non-finite actions (NaN or inf); none are returned")
        return a

    def normalize_actions(self, actions: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        """Robot actions -> padded, normalized training targets. With a delta_action_mask the delta dims
        become offsets from `state`, the observation a chunk answers: chunks (N, chunk, action_dim) with
        their observations' states (N, state_dim), as inference adds one state to a whole chunk."""
        raw = None if state is None else {self.spec.state_key: state}
        a = self._shift(np.asarray(actions, dtype=np.float64), raw, -1)
        a = normalize(a, self.stats.actions, self.action_mode) if self.stats else a
        return pad_to(a, self.cfg.max_action_dim)

    def _shift(self, a: np.ndarray, raw: dict | None, sign: int) -> np.ndarray:
        """a +- the state on the delta dims of the model's delta_action_mask (nothing without one)."""
        mask = np.asarray(self.cfg.delta_action_mask, dtype=bool)
        if not mask.any():
            return a
        if raw is None:
            raise ValueError(f"this model's actions are offsets from the state on dims {np.flatnonzero(mask).tolist()} "
                             "(delta_action_mask): the observation's state is needed to convert them")
        shift = np.where(mask, self._state(raw[self.spec.state_key])[..., : mask.size], 0.0)
        if a.ndim == 3:  # (B, d) against a chunk (B, chunk, .): one state for the whole chunk
            shift = shift[..., None, :]
        a = a.copy()
        a[..., : mask.size] += sign * shift
        return a
