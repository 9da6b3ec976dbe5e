"""Signals measured before the gate decides: how far the new observation is from the one the
cached K/V were computed from.

Images are compared with the *cached* snapshot (not with the previous frame), so a slow drift
adds up and eventually forces a refresh. Every similarity is the minimum over the batch rows
and over the cameras that are present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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


# The largest float32 below 1: what rows that differ get at most. Parallel vectors (a flat patch made
# brighter, a scaled state) have cosine 1, and rounding gives 1.0000006: at a threshold of 1.0 they
# counted as unchanged.
BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


def _exact_one(cos: torch.Tensor, equal: torch.Tensor) -> torch.Tensor:
    """cos, 1 exactly where the inputs are equal and below 1 elsewhere."""
    return torch.where(equal, torch.ones_like(cos), cos.clamp(max=BELOW_ONE))


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each batch row's flattened tensors -> (B,). Only identical rows (two zero rows among
    them) give 1, so a threshold of 1.0 means "anything changed". No host sync."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return _exact_one(cos, (a == b).all(-1))


def patch_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, P, D) x (B, P, D) -> (B, P) per-patch cosine; only identical patches give 1 (a
    threshold of 1.0 then means "any pixel changed")."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)
    return _exact_one(cos, (a == b).all(-1))


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
    camera_state: torch.Tensor  # the state when every camera's K/V were last computed (state_reference=cameras)
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
    changed_patches: dict[str, torch.Tensor] = field(default_factory=dict)  # (P,) bool on the CPU, any row
    pixels_changed: dict[str, bool] = field(default_factory=dict)  # any pixel differs from the cache's
    fresh_embeds: dict[str, torch.Tensor] = field(default_factory=dict)  # from the siglip metric
    state_cos: float | None = None
    state_l2: float | None = None
    prompt_same: bool = True
    age_calls: int = 0  # of the cache's oldest valid row
    since_refresh: int = 0  # calls since the last refresh (the period gate's clock)
    age_s: float = 0.0
    phase: PhaseCues | None = None

    def to_dict(self) -> dict:
        """Flat, JSON-friendly view for records (tensors left out)."""
        d: dict = {"prompt_same": self.prompt_same, "age_calls": self.age_calls,
                   "since_refresh": self.since_refresh, "age_s": round(self.age_s, 6)}
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


def raw_scalars(fresh: list[torch.Tensor], cached: list[torch.Tensor], size: int, state_dim: int,
                states: int) -> torch.Tensor:
    """The raw-image cosine of each camera (min over batch rows) against its cached downsampled
    image, then, with `states` reference states, the state's worst cosine and L2 over them
    (state_signals): fresh = the cameras' images [+ the state], cached = their downsampled references
    [+ the reference states]. One float32 vector, so that the common gates' signals are one function
    and one read."""
    n = len(cached) - states
    vals = [row_cosine(downsample(img, size), small).min() for img, small in zip(fresh[:n], cached[:n], strict=True)]
    if states:
        tests = torch.stack([torch.stack(state_signals(fresh[n], ref, state_dim)) for ref in cached[n:]])
        vals += [tests[:, 0].min(), tests[:, 1].max()]  # each test must pass: the worse of each
    return torch.stack(vals)


def patch_signals(images: list[torch.Tensor], refs: list[torch.Tensor], patch: int, pixels: bool,
                  threshold: float | None, max_diff: float | None) -> torch.Tensor:
    """Per camera, against the pixels its cached K/V were computed from (refs: patchified): with
    `pixels`, whether any pixel changed; with a `threshold`, the fraction of unchanged patches
    (min over batch rows) and the changed-patch mask (P values, any row). One float32 vector,
    camera by camera."""
    out = []
    for img, ref in zip(images, refs, strict=True):
        pix = patchify(img, patch)
        if pixels:
            out.append((pix != ref).any().float().reshape(1))
        if threshold is not None:
            unchanged = patch_cosine(pix, ref) >= threshold
            if max_diff is not None:
                unchanged &= (pix - ref).abs().amax(-1) <= max_diff
            out += [unchanged.float().mean(-1).min().reshape(1), (~unchanged).any(0).float()]
    return torch.cat(out)


_COMPILED: dict = {}


def _compiled(fn, device: torch.device):
    """fn as run on `device`: compiled on a GPU (a few kernels instead of dozens), eager elsewhere."""
    if device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


class SignalGraphs:
    """A signal function fn(fresh, cached, *settings) over static copies of its inputs, replayed
    from one CUDA graph per function, shapes and settings on a GPU (compiled first). Each torch op
    costs ~20-35 us of host time on the H100 machines, a compiled call ~0.7 ms of guards and
    launches, and a hit waits for its signals: one graph launch and the inputs' copies cost least
    (docs/PERFORMANCE.md round 15). `fresh` (the new observation) is copied every call, `cached`
    (the reference) only when it is another tensor or was written since (a refresh or a partial
    update makes new ones). Off a GPU the function is called directly, unless `static_off_gpu`
    (tests: the same copies, then the eager function)."""

    def __init__(self, static_off_gpu: bool = False):
        self.static_off_gpu = static_off_gpu
        self.graphs: Graphs | None = None
        self.static: dict[tuple, list[torch.Tensor]] = {}
        self.copied: dict[tuple, list] = {}  # per key: (tensor, version) last copied per cached slot

    def __call__(self, fn, fresh: list[torch.Tensor], cached: list[torch.Tensor], *settings) -> torch.Tensor:
        inputs = [*fresh, *cached]
        dev = inputs[0].device
        if dev.type != "cuda" and not self.static_off_gpu:
            return fn(fresh, cached, *settings)
        if self.graphs is None:
            self.graphs = Graphs(dev.type == "cuda")
        key = (fn, settings, len(fresh), *((t.shape, t.dtype, t.device) for t in inputs))
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
        return self.graphs.run(key, lambda: _compiled(fn, dev)(bufs[:nf], bufs[nf:], *settings))


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
    if m.shape[1] > 1:  # two actions make one pair: a reversal between them is a turn
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
    graphs: SignalGraphs | None = None,
) -> Signals:
    """Compute the signals named in `needs` ("image", "patches", "pixels", "state"). The siglip metric
    compares `fresh_embeds` (the caller ran the vision tower; they are kept in the result so a
    mode that recomputes cameras does not run it twice). The raw-image and state signals are one
    function (raw_scalars), the patch and pixel signals another (patch_signals), which `graphs`
    replays from CUDA graphs (what ReusePolicy passes; None: called directly). Every value comes
    back in one transfer (one host sync on a GPU, where the gate's decision has to wait for it
    anyway); the changed-patch masks are CPU tensors."""
    run = graphs or (lambda fn, fresh, cached, *settings: fn(fresh, cached, *settings))
    s = Signals(prompt_same=obs.prompt == ref.prompt)
    cams = present_cameras(obs)
    want_patches = "patches" in needs or ("image" in needs and cfg.image_metric == "patch")
    vecs: list[torch.Tensor] = []  # read back together at the end
    parts: list[tuple[str, str, int]] = []  # (Signals field, camera, values) in vecs' order
    raw = cams if "image" in needs or "raw" in needs else []
    with_state = "state" in needs
    if raw or with_state:
        fresh, cached = [obs.images[c] for c in raw], [ref.cameras[c].small for c in raw]
        parts += [("image_raw", c, 1) for c in raw]
        states = []  # both: the worse of the two tests (measured together: one read, one graph per mode)
        if with_state:
            states = [{"state": ref.state, "cameras": ref.camera_state}[r] for r in cfg.state_references()]
            fresh, cached = [*fresh, obs.state], [*cached, *states]
            parts += [("state_cos", "", 1), ("state_l2", "", 1)]
        vecs.append(run(raw_scalars, fresh, cached, cfg.downsample, state_dim, len(states)))
    if want_patches or "pixels" in needs:
        refs = [ref.cameras[c].patches for c in cams]
        for c, r in zip(cams, refs, strict=True):
            b, ch, h, w = obs.images[c].shape
            if r.shape != (b, (h // patch) * (w // patch), ch * patch * patch):
                raise ValueError(f"camera {c!r}: image {tuple(obs.images[c].shape)} does not match the "
                                 f"cached patches {tuple(r.shape)}")
            parts += [("pixels_changed", c, 1)] if "pixels" in needs else []
            parts += [("patch_unchanged", c, 1), ("changed_patches", c, r.shape[1])] if want_patches else []
        if cams:
            vecs.append(run(patch_signals, [obs.images[c] for c in cams], refs, patch, "pixels" in needs,
                            cfg.patch_threshold if want_patches else None, cfg.patch_max_diff))
    if "image" in needs and cfg.image_metric == "siglip":
        for cam in cams:
            e = fresh_embeds[cam]
            s.fresh_embeds[cam] = e
            if ref.cameras[cam].siglip is not None:
                vecs.append(row_cosine(e, ref.cameras[cam].siglip).min().reshape(1))
                parts.append(("siglip", cam, 1))
            else:
                s.siglip[cam] = -1.0
    if vecs:
        host = (vecs[0] if len(vecs) == 1 else torch.cat(vecs)).float().cpu()  # the one device read
        vals, i = host.tolist(), 0
        for name, cam, size in parts:
            if name == "changed_patches":
                s.changed_patches[cam] = host[i : i + size] > 0.5
            elif name == "pixels_changed":
                s.pixels_changed[cam] = vals[i] > 0.5
            elif cam:
                getattr(s, name)[cam] = vals[i]
            else:
                setattr(s, name, vals[i])
            i += size
    if "image" in needs:
        src = {"raw": s.image_raw, "patch": s.patch_unchanged, "siglip": s.siglip}[cfg.image_metric]
        s.image = dict(src)
    return s
