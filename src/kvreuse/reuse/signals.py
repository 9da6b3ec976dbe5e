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

from ..model.graphs import Graphs
from ..observation import Observation, version
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
    """Cosine of each batch row's flattened tensors -> (B,). Identical rows (two zero rows among
    them) give exactly 1, so a threshold of 1.0 means "anything changed". No host sync."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return torch.where((a == b).all(-1), torch.ones_like(cos), cos)


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
    image_masks: dict[str, torch.Tensor]  # on the CPU
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


def state_signals(state: torch.Tensor, ref: torch.Tensor, state_dim: int) -> list[torch.Tensor]:
    """[cosine, normalized L2] as 0-d tensors on the state's device. The state is already
    normalized (norm stats), so the L2 is the RMS per-dim difference in normalized units:
    ||s - s_ref|| / sqrt(state_dim)."""
    cos = row_cosine(state, ref).min()
    l2 = ((state.float() - ref.float()).norm(dim=-1) / max(state_dim, 1) ** 0.5).max()
    return [cos, l2]


def raw_scalars(images: list[torch.Tensor], smalls: list[torch.Tensor], size: int, state: torch.Tensor | None,
                ref_state: torch.Tensor | None, state_dim: int) -> torch.Tensor:
    """The raw-image cosine of each camera (min over batch rows) against its cached downsampled
    image, then, with a state, the state's cosine and L2 (state_signals): one float32 vector, so
    that the common gates' signals are one function (compiled on a GPU, _scalars_fn) and one read."""
    vals = [row_cosine(downsample(img, size), small).min() for img, small in zip(images, smalls, strict=True)]
    if state is not None:
        vals += state_signals(state, ref_state, state_dim)
    return torch.stack(vals)


_COMPILED: dict[str, object] = {}


def _scalars_fn(device: torch.device):
    """raw_scalars as run on `device`: compiled on a GPU (a few kernels instead of ~40), eager
    elsewhere."""
    if device.type != "cuda":
        return raw_scalars
    if "raw" not in _COMPILED:
        _COMPILED["raw"] = torch.compile(raw_scalars, dynamic=False, fullgraph=True)
    return _COMPILED["raw"]


class ScalarGraphs:
    """raw_scalars over static copies of its inputs, replayed from one CUDA graph per shape on a
    GPU. Each torch op costs ~20 us of host time on the H100 machines, a compiled call ~0.5 ms of
    guards and launches, and a hit waits for its signals: one graph launch and the inputs' copies
    cost least (docs/PERFORMANCE.md round 15). The new observation's images and state are copied
    every call; the cached side (downsampled images, state) only when it is another tensor or was
    written since (a refresh makes new ones). Off a GPU the same copies, then the eager function."""

    def __init__(self):
        self.graphs: Graphs | None = None
        self.static: dict[tuple, list[torch.Tensor]] = {}
        self.copied: dict[tuple, list] = {}  # per key: (tensor, version) last copied per cached slot

    def __call__(self, images, smalls, size: int, state, ref_state, state_dim: int) -> torch.Tensor:
        fresh = [*images, *([state] if state is not None else [])]
        cached = [*smalls, *([ref_state] if state is not None else [])]
        inputs = fresh + cached
        dev = inputs[0].device
        if self.graphs is None:
            self.graphs = Graphs(dev.type == "cuda")
        key = (size, state_dim, len(images), state is not None, *((t.shape, t.dtype, t.device) for t in inputs))
        if key not in self.static:
            self.static[key] = [torch.empty_like(t) for t in inputs]
            self.copied[key] = [None] * len(cached)
        bufs, seen, nf = self.static[key], self.copied[key], len(fresh)
        for i, t in enumerate(inputs):
            j = i - nf  # >= 0: the cached side
            if j >= 0 and seen[j] is not None and seen[j][0] is t and seen[j][1] is not None \
                    and seen[j][1] == version(t):
                continue
            bufs[i].copy_(t)
            if j >= 0:
                seen[j] = (t, version(t))
        n = len(images)
        st = (bufs[n], bufs[-1]) if state is not None else (None, None)
        return self.graphs.run(key, lambda: _scalars_fn(dev)(bufs[:n], bufs[nf:nf + n], size, *st, state_dim))


def phase_cues(chunk: torch.Tensor, cfg: ReuseConfig, action_dim: int) -> PhaseCues:
    """chunk: (B, chunk, max_action_dim) normalized model output of the last call. One device
    read for all the cues."""
    a = chunk[..., :action_dim].float()
    if cfg.phase_horizon is not None:
        a = a[:, : cfg.phase_horizon]
    gd = cfg.gripper_dim % action_dim
    g = a[..., gd]  # (B, H)
    flips = (g[:, :-1] * g[:, 1:] < 0).any()
    span = (g.max(-1).values - g.min(-1).values).max()
    m = a[..., : min(cfg.motion_dims, action_dim)]
    zero = a.new_zeros(())
    variance = m.var(dim=1, unbiased=False).mean(-1).max() if m.shape[1] > 1 else zero
    if m.shape[1] > 2:
        turn = 1.0 - F.cosine_similarity(m[:, :-1], m[:, 1:], dim=-1, eps=1e-8)  # (B, H-1)
        curvature = turn.mean(-1).max()
    else:
        curvature = zero
    flips, span, variance, curvature = torch.stack([flips.float(), span, variance, curvature]).tolist()
    return PhaseCues(bool(flips) or span > cfg.gripper_delta, variance, curvature)


def present_cameras(obs: Observation) -> list[str]:
    """Cameras present in any batch row, read from the masks' host copies where they have them."""
    return [c for c in obs.image_masks if bool(obs.host_mask(f"image_masks/{c}").any())]


def measure(
    obs: Observation,
    ref: Reference,
    cfg: ReuseConfig,
    needs: set[str],
    patch: int,
    state_dim: int,
    fresh_embeds: dict[str, torch.Tensor] | None = None,
    scalars=raw_scalars,
) -> Signals:
    """Compute the signals named in `needs` ("image", "patches", "pixels", "state"). The siglip metric
    compares `fresh_embeds` (the caller ran the vision tower; they are kept in the result so a
    mode that recomputes cameras does not run it twice). Every scalar is computed on the
    observation's device and read back in one transfer (one host sync on a GPU, where the gate's
    decision has to wait for it anyway). `scalars` computes the raw-image and state signals:
    raw_scalars, or a ScalarGraphs (what ReusePolicy passes)."""
    s = Signals(prompt_same=obs.prompt == ref.prompt)
    want_patches = "patches" in needs or ("image" in needs and cfg.image_metric == "patch")
    pending: dict[tuple[str, str], torch.Tensor] = {}  # (Signals field, camera) -> 0-d tensor
    read: list[tuple[list, torch.Tensor]] = []  # (names, values) read back together at the end
    cams = present_cameras(obs)
    raw = cams if "image" in needs or "raw" in needs else []
    if raw or "state" in needs:
        names = [("image_raw", c) for c in raw]
        st = (None, None)
        if "state" in needs:
            names += [("state_cos", ""), ("state_l2", "")]
            st = (obs.state, ref.state)
        read.append((names, scalars(
            [obs.images[c] for c in raw], [ref.cameras[c].small for c in raw], cfg.downsample, *st, state_dim)))
    for cam in cams:
        r = ref.cameras[cam]
        img = obs.images[cam]
        pix = patchify(img, patch) if want_patches or "pixels" in needs else None
        if "pixels" in needs:
            if pix.shape != r.patches.shape:
                s.pixels_changed[cam] = True
            else:
                pending["pixels_changed", cam] = (pix != r.patches).any()
        if want_patches:
            pc = patch_cosine(pix, r.patches)  # (B, P)
            unchanged = pc >= cfg.patch_threshold
            if cfg.patch_max_diff is not None:
                unchanged &= (pix - r.patches).abs().amax(-1) <= cfg.patch_max_diff
            pending["patch_unchanged", cam] = unchanged.float().mean(-1).min()
            s.changed_patches[cam] = (~unchanged).any(0)
        if "image" in needs and cfg.image_metric == "siglip":
            e = fresh_embeds[cam]
            s.fresh_embeds[cam] = e
            if r.siglip is not None:
                pending["siglip", cam] = row_cosine(e, r.siglip).min()
            else:
                s.siglip[cam] = -1.0
    if pending:
        read.append((list(pending), torch.stack([t.float() for t in pending.values()])))
    names = [n for ns, _ in read for n in ns]
    values = (read[0][1] if len(read) == 1 else torch.cat([v for _, v in read])).tolist() if read else []
    for (name, cam), v in zip(names, values, strict=True):
        if name == "pixels_changed":
            s.pixels_changed[cam] = bool(v)
        elif cam:
            getattr(s, name)[cam] = v
        else:
            setattr(s, name, v)
    if "image" in needs:
        src = {"raw": s.image_raw, "patch": s.patch_unchanged, "siglip": s.siglip}[cfg.image_metric]
        s.image = dict(src)
    return s
