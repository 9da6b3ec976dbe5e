"""Reuse modes: what is recomputed when the gate says reuse (and, for text_fixed, on refresh).

A mode returns a Plan; ReusePolicy executes it with the model's prefix-update kernels, whose
cost is proportional to what they recompute:

    kind "all"     encode_prefix: every camera through the vision tower, T tokens x depth layers
    kind "tokens"  update_prefix: run_cameras through the vision tower, the marked tokens x depth
                   layers, attending over the cached K/V of the rest
    kind "layers"  update_prefix_layers: run_cameras through the vision tower, T tokens x
                   (depth - split) layers
    kind "none"    nothing: the cache is used as it is (denoise only)

Tokens whose input did not change are never recomputed when that would reproduce the cache
exactly (e.g. Pi0's prompt with the cameras reused): that would be cost without effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import PrefixCache
from ..model.config import ModelConfig
from ..observation import Observation
from .config import ReuseConfig
from .signals import Signals


@dataclass
class Plan:
    kind: str  # "all" | "tokens" | "layers" | "none"
    recompute: torch.Tensor | None = None  # (T,) bool on the CPU for kind "tokens"
    run_cameras: tuple[str, ...] = ()
    prompt_from_cache: bool = False  # keep the cached prompt tokens (state_only)
    note: str = ""
    refreshed: tuple[str, ...] = field(default_factory=tuple)  # spans that get the new snapshot

    @property
    def whole(self) -> bool:
        """Every prefix token recomputed: a refresh, or a token plan over all of them (_complete)."""
        return self.kind == "all" or (self.kind == "tokens" and bool(self.recompute.all()))

    def cost(self, model_cfg: ModelConfig, split: int | None = None) -> dict:
        """What this plan claims to compute: vision-tower camera passes and prefix LM
        token-layers (one token through one layer)."""
        t, depth = model_cfg.prefix_len, model_cfg.llm.depth
        if self.kind == "all":
            cams, tokens, layers = len(model_cfg.cameras), t, depth
        elif self.kind == "tokens":
            cams, tokens, layers = len(self.run_cameras), int(self.recompute.sum()), depth
        elif self.kind == "layers":
            cams, tokens, layers = len(self.run_cameras), t, depth - split
        else:
            cams, tokens, layers = 0, 0, 0
        return {"vision_cameras": cams, "lm_tokens": tokens, "lm_token_layers": tokens * layers}


def _valid(image_masks: list[torch.Tensor], token_mask: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(B, T): each camera's (B,) mask over its patches, then the prompt's."""
    p = cfg.vision.num_patches
    return torch.cat([m[:, None].expand(-1, p) for m in image_masks] + [token_mask], 1)


def new_valid(obs: Observation, cfg: ModelConfig) -> torch.Tensor:
    """(B, T) validity of the prefix tokens of `obs` (as the model builds it)."""
    return _valid([obs.image_masks[c] for c in cfg.cameras], obs.token_mask, cfg)


@dataclass(frozen=True)
class HostPrefix:
    """CPU copies of what a prefix cache records about its tokens (the PrefixCache fields of the
    same names): prompt ids (B, L), validity and rotary positions (B, T)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


def host_prefix(obs: Observation, cfg: ModelConfig, prompt_from: HostPrefix | None = None) -> HostPrefix | None:
    """The HostPrefix of the cache the model builds from `obs`, from the host copies that
    Observation.to keeps (no device read); None where obs has none. prompt_from: the prompt's
    ids and validity are that cache's (what state_only's update keeps)."""
    cams = [f"image_masks/{c}" for c in cfg.cameras]
    if any(c not in obs.image_masks for c in cfg.cameras) or not all(
        obs.on_host(n) for n in cams + ([] if prompt_from is not None else ["tokens", "token_mask"])
    ):
        return None
    if prompt_from is not None:
        tokens, prompt = prompt_from.tokens, prompt_from.mask[:, len(cams) * cfg.vision.num_patches :]
    else:
        tokens, prompt = obs.host_mask("tokens").clone(), obs.host_mask("token_mask")
    valid = _valid([obs.host_mask(n) for n in cams], prompt, cfg)
    return HostPrefix(tokens, valid, valid.long().cumsum(-1) - 1)


def prompt_changes(
    cache: PrefixCache | HostPrefix, tokens: torch.Tensor, cfg: ModelConfig, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) bool: prompt tokens whose id, validity or rotary position differs from the cache
    in any batch row (Pi0.5: the state is spelled in the prompt); and whether any prompt
    token's validity or position moved (a shift), a 0-d bool. Both on valid's device (all
    inputs on one device). `tokens`, `valid`: the new observation's ids and new_valid."""
    t0 = len(cfg.cameras) * cfg.vision.num_patches
    pos = valid.long().cumsum(-1) - 1
    out = torch.zeros(cfg.prefix_len, dtype=torch.bool, device=valid.device)
    ids_diff = (tokens != cache.tokens) & valid[:, t0:]
    valid_diff = valid[:, t0:] != cache.mask[:, t0:]
    pos_diff = (pos[:, t0:] != cache.positions[:, t0:]) & valid[:, t0:]
    shift = valid_diff | pos_diff
    out[t0:] = (ids_diff | shift).any(0)
    return out, shift.any()


def region(cfg: ModelConfig, start: int, end: int, device) -> torch.Tensor:
    m = torch.zeros(cfg.prefix_len, dtype=torch.bool, device=device)
    m[start:end] = True
    return m


def plan_reuse(
    cfg: ReuseConfig, model_cfg: ModelConfig, cache: PrefixCache, obs: Observation, s: Signals,
    hosts: tuple[HostPrefix, HostPrefix] | None = None, layer_imgs: dict[str, torch.Tensor] | None = None,
) -> Plan:
    """The gate said reuse: what the mode recomputes. The plan is made on the host, and its
    recompute mask is a CPU tensor. What it compares (the new tokens' validity, the prompt's
    changes) comes from `hosts`, the HostPrefix of the cache and of obs, where the caller has
    them (no device work at all: round 16), else from the device in one transfer; the changed
    patches come from the signals, on the CPU. layer_imgs (layer_wise): the images of the cameras
    whose fresh embeddings the cache's upper layers were computed from (the last layer-wise
    update's), by camera."""
    mode = cfg.mode
    if mode in ("full", "text_fixed"):
        return Plan("none", note="whole prefix reused")
    dev = torch.device("cpu")
    t, p = model_cfg.prefix_len, model_cfg.vision.num_patches
    t0 = len(model_cfg.cameras) * p
    prompt = region(model_cfg, t0, t, dev)
    if hosts is not None:
        cached, new = hosts
        changed, shift = prompt_changes(cached, new.tokens, model_cfg, new.mask)
        valid, shifted = new.mask.any(0), bool(shift)
    else:
        valid_rows = new_valid(obs, model_cfg)
        changed, shift = prompt_changes(cache, obs.tokens, model_cfg, valid_rows)
        host = torch.cat([valid_rows.any(0), changed, shift.reshape(1)]).cpu()
        valid, changed, shifted = host[:t], host[t : 2 * t], bool(host[2 * t])
    prompt_spans = [sp.name for sp in cache.spans if sp.kind != "camera"]
    cams = tuple(model_cfg.cameras)

    if mode == "vision_only":
        # Camera K/V kept; the prompt region recomputed (over the cached camera K/V) when any of
        # its tokens changed. Unchanged prompt over unchanged cameras would reproduce the cache.
        if not bool(changed.any()):
            return Plan("none", note="camera spans reused; prompt unchanged: nothing to recompute")
        return _complete(Plan("tokens", prompt & valid, (), note="camera spans reused, prompt region recomputed",
                              refreshed=tuple(prompt_spans)), valid)
    moved = tuple(c for c in cams if s.pixels_changed.get(c, False))  # present cameras only
    if mode == "state_only":
        # Prompt (text + state) K/V kept as cached, with the cached tokens; the cameras whose
        # pixels changed are recomputed (vision tower + their tokens over the cached rest).
        if not moved:
            return Plan("none", note="prompt region reused; no camera changed: nothing to recompute")
        rec = torch.zeros(t, dtype=torch.bool, device=dev)
        for i, cam in enumerate(cams):
            if cam in moved:
                rec[i * p : (i + 1) * p] = True
        return _complete(Plan("tokens", rec & valid, moved, prompt_from_cache=True,
                              note="prompt region reused, camera spans recomputed", refreshed=moved), valid)
    if mode == "layer_wise":
        if shifted:
            return Plan("all", note="layer-wise reuse cannot move token positions/validity: refresh")
        layer_cams = tuple(layer_imgs or ())
        if layer_cams and moved == layer_cams and not bool(changed.any()) and all(
                torch.equal(obs.images[c], layer_imgs[c]) for c in moved):  # a moved frame seen again
            return Plan("none", note=f"{', '.join(layer_cams)} as the upper layers saw them: nothing to recompute")
        if not moved and not bool(changed.any()):
            if not layer_cams:
                return Plan("none", note="no camera or prompt token changed: nothing to recompute")
            # Cameras are compared with the base, but the upper layers hold a later update's
            # embeddings of layer_cams: back at the base's pixels, they go back to its embeddings.
            return Plan("layers", note=f"{', '.join(layer_cams)} back at the base: upper layers recomputed",
                        refreshed=tuple(sp.name for sp in cache.spans))
        return Plan("layers", run_cameras=moved, note="lower layers reused, upper layers recomputed",
                    refreshed=tuple(sp.name for sp in cache.spans))
    if mode == "partial":
        rec = torch.zeros(t, dtype=torch.bool, device=dev)
        run = []
        changed_patches = {c: m.cpu() for c, m in s.changed_patches.items()}  # (measure gives them on the CPU)
        for i, cam in enumerate(cams):
            ch = changed_patches.get(cam)
            if ch is not None and bool(ch.any()):
                rec[i * p : (i + 1) * p] = ch
                run.append(cam)
        if not run and not bool(changed.any()):
            return Plan("none", note="no patch or prompt token changed: nothing to recompute")
        rec |= prompt
        rec &= valid
        full_cams = tuple(c for c in run if bool(changed_patches[c].all()))
        return _complete(Plan("tokens", rec, tuple(run), note=f"{int(rec[:t0].sum())} patch tokens + prompt recomputed",
                              refreshed=full_cams + tuple(prompt_spans)), valid)
    raise ValueError(f"reuse.mode: unknown mode {mode!r}")


def _complete(plan: Plan, valid: torch.Tensor) -> Plan:
    """A token plan that covers every valid token recomputes the padding too, so it runs the
    exact encode_prefix path (bit-identical to a refresh) instead of the partial kernel."""
    if plan.kind == "tokens" and bool((plan.recompute | ~valid).all()):
        plan.recompute = torch.ones_like(plan.recompute)
        plan.note += " (every valid token: exact refresh path)"
    return plan


def plan_refresh(cfg: ReuseConfig, model_cfg: ModelConfig, cache: PrefixCache | None, obs: Observation) -> Plan:
    """The gate said refresh (reuse allowed otherwise): text_fixed keeps the text span within an
    episode, every other mode recomputes everything."""
    if cfg.mode != "text_fixed" or cache is None or cfg.synchronized or not cfg.enabled:
        return Plan("all", note="full refresh")
    text = cache.span("text")
    keep = region(model_cfg, text.start, text.end, "cpu")
    new = host_prefix(obs, model_cfg)  # no device read where obs has host copies
    valid = new.mask if new is not None else new_valid(obs, model_cfg)
    rec = ~keep & valid.any(0).cpu()  # a CPU mask, as plan_reuse makes
    refreshed = tuple(sp.name for sp in cache.spans if sp.name != "text")
    return Plan("tokens", rec, tuple(model_cfg.cameras), note="text span kept, cameras (and state) recomputed",
                refreshed=refreshed)
