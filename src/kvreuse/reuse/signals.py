"""Signals measured before the gate decides: how far the new observation is from the one the
cached K/V were computed from.

Images are compared with the *cached* snapshot (not with the previous frame), so a slow drift
adds up and eventually forces a refresh. Every similarity is the minimum over the batch rows
and over the cameras that are present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..observation import Observation
from .config import ReuseConfig


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size) average-pooled, float32: the cheap raw-image view."""
    return F.adaptive_avg_pool2d(images.float(), size)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, P, 3*patch*patch), patches in the vision tower's order (row-major
    over the grid, as the patch-embedding convolution flattens them)."""
    b, c, h, w = images.shape
    x = images.float().unfold(2, patch, patch).unfold(3, patch, patch)  # B, C, gh, gw, p, p
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each batch row's flattened tensors -> (B,). Two zero rows count as equal."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    if torch.equal(a, b):
        return torch.ones(a.shape[0], device=a.device)
    num = (a * b).sum(-1)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    both_zero = (na == 0) & (nb == 0)
    return torch.where(both_zero, torch.ones_like(num), num / (na * nb).clamp_min(1e-12))


def patch_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, P, D) x (B, P, D) -> (B, P) per-patch cosine; identical patches give exactly 1 (a
    threshold of 1.0 then means "any pixel changed")."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)
    return torch.where((a == b).all(-1), torch.ones_like(cos), cos)


@dataclass
class CameraRef:
    """What one camera's cached K/V were computed from."""

    small: torch.Tensor  # (B, 3, d, d) downsampled image at the camera's last full refresh
    patches: torch.Tensor  # (B, P, 3*p*p) pixels each patch's K/V were computed from
    siglip: torch.Tensor | None = None  # (B, P, W) embeddings at the last full refresh


@dataclass
class Reference:
    """The observation side of a cache: used for invalidation and for the signals."""

    cameras: dict[str, CameraRef]
    image_masks: dict[str, torch.Tensor]
    state: torch.Tensor  # (B, max_state_dim) state of the snapshot that set the state span
    prompt: tuple[str, ...]
    raw_shapes: tuple | None
    dtype: torch.dtype
    device: torch.device


@dataclass
class PhaseCues:
    """Cues from the last action chunk (model's normalized units)."""

    gripper_transition: bool = False
    variance: float = 0.0
    curvature: float = 0.0

    def to_dict(self) -> dict:
        return {"gripper_transition": self.gripper_transition, "variance": self.variance, "curvature": self.curvature}


@dataclass
class Signals:
    image: dict[str, float] = field(default_factory=dict)  # per camera, under the configured metric
    image_raw: dict[str, float] = field(default_factory=dict)  # raw downsampled cosine
    patch_unchanged: dict[str, float] = field(default_factory=dict)  # fraction of unchanged patches
    siglip: dict[str, float] = field(default_factory=dict)  # cosine of vision embeddings
    changed_patches: dict[str, torch.Tensor] = field(default_factory=dict)  # (P,) bool, any row
    pixels_changed: dict[str, bool] = field(default_factory=dict)  # any pixel differs from the cache's
    fresh_embeds: dict[str, torch.Tensor] = field(default_factory=dict)  # from the siglip metric
    state_cos: float | None = None
    state_l2: float | None = None
    prompt_same: bool = True
    age_calls: int = 0
    age_s: float = 0.0
    phase: PhaseCues | None = None

    def to_dict(self) -> dict:
        """Flat, JSON-friendly view for records (tensors left out)."""
        d: dict = {"prompt_same": self.prompt_same, "age_calls": self.age_calls, "age_s": round(self.age_s, 6)}
        for name in ("image", "image_raw", "patch_unchanged", "siglip"):
            for cam, v in getattr(self, name).items():
                d[f"{name}/{cam}"] = v
        if self.state_cos is not None:
            d["state_cos"] = self.state_cos
        if self.state_l2 is not None:
            d["state_l2"] = self.state_l2
        if self.phase is not None:
            d.update({f"phase/{k}": v for k, v in self.phase.to_dict().items()})
        return d


def camera_ref(images: torch.Tensor, cfg: ReuseConfig, patch: int, siglip: torch.Tensor | None = None) -> CameraRef:
    return CameraRef(downsample(images, cfg.downsample), patchify(images, patch), siglip)


def state_signals(state: torch.Tensor, ref: torch.Tensor, state_dim: int) -> tuple[float, float]:
    """(cosine, normalized L2). The state is already normalized (norm stats), so the L2 is the
    RMS per-dim difference in normalized units: ||s - s_ref|| / sqrt(state_dim)."""
    cos = float(row_cosine(state, ref).min())
    l2 = float(((state.float() - ref.float()).norm(dim=-1) / max(state_dim, 1) ** 0.5).max())
    return cos, l2


def phase_cues(chunk: torch.Tensor, cfg: ReuseConfig, action_dim: int) -> PhaseCues:
    """chunk: (B, chunk, max_action_dim) normalized model output of the last call."""
    a = chunk[..., :action_dim].float()
    if cfg.phase_horizon is not None:
        a = a[:, : cfg.phase_horizon]
    gd = cfg.gripper_dim % action_dim
    g = a[..., gd]  # (B, H)
    flips = (g[:, :-1] * g[:, 1:] < 0).any()
    span = (g.max(-1).values - g.min(-1).values).max()
    m = a[..., : min(cfg.motion_dims, action_dim)]
    variance = float(m.var(dim=1, unbiased=False).mean(-1).max()) if m.shape[1] > 1 else 0.0
    if m.shape[1] > 2:
        turn = 1.0 - F.cosine_similarity(m[:, :-1], m[:, 1:], dim=-1, eps=1e-8)  # (B, H-1)
        curvature = float(turn.mean(-1).max())
    else:
        curvature = 0.0
    return PhaseCues(bool(flips) or float(span) > cfg.gripper_delta, variance, curvature)


def measure(
    obs: Observation,
    ref: Reference,
    cfg: ReuseConfig,
    needs: set[str],
    patch: int,
    state_dim: int,
    fresh_embeds: dict[str, torch.Tensor] | None = None,
) -> Signals:
    """Compute the signals named in `needs` ("image", "patches", "pixels", "state"). The siglip metric
    compares `fresh_embeds` (the caller ran the vision tower; they are kept in the result so a
    mode that recomputes cameras does not run it twice)."""
    s = Signals(prompt_same=obs.prompt == ref.prompt)
    cams = [c for c, m in obs.image_masks.items() if bool(m.any())]
    want_patches = "patches" in needs or ("image" in needs and cfg.image_metric == "patch")
    for cam in cams:
        r = ref.cameras[cam]
        img = obs.images[cam]
        if "image" in needs or "raw" in needs:
            s.image_raw[cam] = float(row_cosine(downsample(img, cfg.downsample), r.small).min())
        pix = patchify(img, patch) if want_patches or "pixels" in needs else None
        if "pixels" in needs:
            s.pixels_changed[cam] = not torch.equal(pix, r.patches)
        if want_patches:
            pc = patch_cosine(pix, r.patches)  # (B, P)
            unchanged = pc >= cfg.patch_threshold
            if cfg.patch_max_diff is not None:
                unchanged &= (pix - r.patches).abs().amax(-1) <= cfg.patch_max_diff
            s.patch_unchanged[cam] = float(unchanged.float().mean(-1).min())
            s.changed_patches[cam] = (~unchanged).any(0)
        if "image" in needs and cfg.image_metric == "siglip":
            e = fresh_embeds[cam]
            s.fresh_embeds[cam] = e
            s.siglip[cam] = float(row_cosine(e, r.siglip).min()) if r.siglip is not None else -1.0
    if "image" in needs:
        src = {"raw": s.image_raw, "patch": s.patch_unchanged, "siglip": s.siglip}[cfg.image_metric]
        s.image = dict(src)
    if "state" in needs:
        s.state_cos, s.state_l2 = state_signals(obs.state, ref.state, state_dim)
    return s

