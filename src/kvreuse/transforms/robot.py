"""Per-robot input/output transforms: an openpi-style observation dict -> Observation, and the
model's padded, normalized action chunk -> the robot's actions.

The dict uses openpi's flat keys (`observation/image`, `observation/wrist_image`,
`observation/state`, `prompt`), so the simulator adapters and the policy server share one path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..model.config import ModelConfig
from ..model.tokenizer import Tokenizer, tokenize_prompts
from ..observation import Observation
from .images import checked_image, device_image
from .normalize import NormMode, NormStats, normalize, pad_to, unnormalize
from .staging import Field, Staging


@dataclass(frozen=True)
class RobotSpec:
    name: str
    cameras: tuple[tuple[str, str], ...]  # (dict key, model camera name)
    state_dim: int
    action_dim: int
    flip180: tuple[str, ...] = ()  # dict keys whose images arrive upside down
    state_key: str = "observation/state"
    prompt_key: str = "prompt"

    @property
    def camera_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.cameras)


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
        staging: bool | None = None,
    ):
        """staging: send the inputs through transforms.staging (None: on a CUDA device)."""
        self.cfg, self.tok, self.stats, self.spec, self.truncate = cfg, tokenizer, stats, spec, truncate
        self.staging = staging
        self._stagings: dict = {}  # (device, fields) -> Staging
        self.mode: NormMode = norm_mode or ("quantile" if cfg.variant == "pi05" else "meanstd")
        unknown = [c for _, c in spec.cameras if c not in cfg.cameras]
        if unknown:
            raise ValueError(f"robot {spec.name!r} maps to camera(s) {unknown} the model does not have: {list(cfg.cameras)}")

    # ---- input ------------------------------------------------------------------------------
    def __call__(self, raw: dict, device=None) -> Observation:
        spec, cfg = self.spec, self.cfg
        known = set(spec.camera_keys) | {spec.state_key, spec.prompt_key}
        unknown_cams = [k for k in raw if k not in known and "image" in k]
        if unknown_cams:
            raise ValueError(f"unknown camera key(s) {unknown_cams}; this robot's cameras: {list(spec.camera_keys)}")
        missing = [k for k in (*spec.camera_keys, spec.state_key) if k not in raw]
        if missing:
            raise ValueError(f"missing key(s) {missing}; expected {sorted(known)}")

        state = np.asarray(raw[spec.state_key], dtype=np.float64)
        if state.ndim == 1:
            state = state[None]
        if state.ndim != 2 or state.shape[1] != spec.state_dim:
            raise ValueError(f"{spec.state_key}: expected ({spec.state_dim},) or (B, {spec.state_dim}), got {state.shape}")
        if not np.isfinite(state).all():
            raise ValueError(f"{spec.state_key}: contains NaN or inf")
        b = state.shape[0]

        cams = {}  # model camera -> (dict key, checked host pixels), or None where the robot lacks it
        to_model = dict((c, k) for k, c in spec.cameras)
        for cam in cfg.cameras:
            key = to_model.get(cam)
            if key is not None:
                img = checked_image(raw[key], key)
                if img.shape[0] != b:
                    raise ValueError(f"{key}: batch size {img.shape[0]} does not match the state's {b}")
            cams[cam] = None if key is None else (key, img)

        prompt = raw.get(spec.prompt_key, "")
        prompts = [prompt] * b if isinstance(prompt, str) else [str(p) for p in prompt]
        if len(prompts) != b:
            raise ValueError(f"{spec.prompt_key}: {len(prompts)} prompts for a batch of {b}")

        nstate = normalize(state, self.stats.state, self.mode) if self.stats else state
        toks = tokenize_prompts(cfg, self.tok, prompts, nstate if cfg.state_in_prompt else None, self.truncate)
        host = Observation(
            images={},
            image_masks={c: torch.full((b,), v is not None) for c, v in cams.items()},
            state=torch.from_numpy(pad_to(nstate, cfg.max_state_dim)),
            tokens=toks.tokens,
            token_mask=toks.mask,
            state_token_mask=toks.state_mask,
            prompt=tuple(prompts),
        )
        if device is not None and self._staged(device, cams):
            return self._stage(host, cams, torch.device(device))
        size = cfg.vision.image_size
        for cam, v in cams.items():
            host.images[cam] = (torch.full((b, 3, size, size), -1.0, device=device) if v is None else
                                device_image(v[1] if device is None else v[1].to(device), size, v[0] in spec.flip180))
        return host.to(device) if device is not None else host

    def _staged(self, device, cams: dict) -> bool:
        """Whether this call goes through a Staging: `staging` True, or None (the default) and a
        CUDA device; only host pixels (a caller's GPU tensors take the plain path)."""
        on = torch.device(device).type == "cuda" if self.staging is None else self.staging
        return on and all(v is None or v[1].device.type == "cpu" for v in cams.values())

    def _stage(self, host: Observation, cams: dict, device: torch.device) -> Observation:
        """host's tensors and the cameras' pixels to `device` through the Staging of their shapes
        (transforms.staging: pinned buffers and one CUDA graph on a GPU)."""
        size, b = self.cfg.vision.image_size, host.batch_size
        fields, sources = {}, {}
        for cam, v in cams.items():
            t = None if v is None else v[1]
            fields[f"images/{cam}"] = Field(
                (b, 3, size, size) if t is None else tuple(t.shape), torch.float32 if t is None else t.dtype,
                (b, 3, size, size), torch.float32, size, v is not None and v[0] in self.spec.flip180, t is None)
            if t is not None:
                sources[f"images/{cam}"] = t
        for name in ("state", "tokens", "token_mask", "state_token_mask", *(f"image_masks/{c}" for c in cams)):
            t = host.mask(name) if name != "state" else host.state
            fields[name] = Field(tuple(t.shape), t.dtype, tuple(t.shape), t.dtype)
            sources[name] = t
        key = (device, tuple(fields.items()))
        stage = self._stagings.get(key)
        if stage is None:
            if len(self._stagings) >= 8:  # a client that changes shapes every call: keep the newest few
                self._stagings.pop(next(iter(self._stagings)))
            stage = self._stagings[key] = Staging(fields, device)
        out = stage(sources)
        dev = replace(
            host,
            images={c: out[f"images/{c}"] for c in cams},
            image_masks={c: out[f"image_masks/{c}"] for c in cams},
            state=out["state"], tokens=out["tokens"], token_mask=out["token_mask"],
            state_token_mask=out["state_token_mask"],
        )
        dev.keep_host_copies(host)
        return dev

    # ---- output -----------------------------------------------------------------------------
    def actions(self, out: torch.Tensor) -> np.ndarray:
        """(B, chunk, max_action_dim) model output -> (B, chunk, action_dim) robot actions."""
        a = out.detach().float().cpu().numpy()[..., : self.spec.action_dim]
        return unnormalize(a, self.stats.actions, self.mode) if self.stats else a

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Robot actions -> padded, normalized training targets."""
        a = normalize(np.asarray(actions, dtype=np.float64), self.stats.actions, self.mode) if self.stats else actions
        return pad_to(a, self.cfg.max_action_dim)
