"""Pi0 and Pi0.5 as one model: SigLIP + projector + Gemma prefix LM, Gemma action expert,
flow-matching Euler sampler. The API is split at the prefix cache:

    prefix  = model.encode_prefix(obs)            # vision + language -> PrefixCache
    actions = model.denoise(prefix, obs, noise)   # Euler steps of the expert, reads the cache

`denoise` never copies or writes the prefix K/V, so one cache serves every Euler step and, when
the reuse layer allows it, later control steps.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache import PrefixCache, Span, new_snapshot_id
from ..observation import Observation, upload
from .config import ModelConfig
from .gemma import GemmaStack
from .layers import NEG_INF, key_bias, sincos_time
from .siglip import SiglipVision


class Pi0Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ew = cfg.expert.width
        self.vision = SiglipVision(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.llm.width)
        self.llm = GemmaStack(cfg.llm, vocab_size=cfg.vocab_size)
        self.expert = GemmaStack(cfg.expert, cond_dim=ew if cfg.adarms else None)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, ew)
        self.action_out_proj = nn.Linear(ew, cfg.max_action_dim)
        if not cfg.state_token:
            self.time_mlp_in = nn.Linear(ew, ew)
            self.time_mlp_out = nn.Linear(ew, ew)
        else:
            self.state_proj = nn.Linear(cfg.max_state_dim, ew)
            self.action_time_mlp_in = nn.Linear(2 * ew, ew)
            self.action_time_mlp_out = nn.Linear(ew, ew)

    def with_cameras(self, cameras: tuple[str, ...]) -> "Pi0Model":
        """This model over some of its cameras (kept in its own order), sharing every weight; self
        when that is all of them. A camera masked out in every observation adds nothing to a valid
        token: its keys are masked for every query, and positions count valid tokens only. Leaving
        it out of the prefix therefore gives the same actions, up to float rounding (other row
        counts, other sums), without its vision pass, its prefix rows, or its keys in any attention."""
        unknown = [c for c in cameras if c not in self.cfg.cameras]
        if unknown or not cameras:
            raise ValueError(f"cameras {list(cameras)}: need a non-empty subset of {list(self.cfg.cameras)}")
        keep = tuple(c for c in self.cfg.cameras if c in cameras)
        if keep == self.cfg.cameras:
            return self
        narrowed = copy.copy(self)  # shares the submodules and their weights; only cfg is its own
        narrowed.cfg = self.cfg.replace(cameras=keep)
        return narrowed

    def with_robot_dims(self, state_dim: int, action_dim: int) -> "Pi0Model":
        """This model as it drives a robot of these dims (sharing every weight; self when its config
        says so already). An openpi config.json records no robot dims, so such a model keeps the
        padded 32 of its preset, and the reuse layer's state distance and gripper cue read them.
        A model whose config names other dims than the robot's (not the padded maximum, which says
        nothing) was trained for another robot."""
        c = self.cfg
        if (state_dim, action_dim) == (c.state_dim, c.action_dim):
            return self
        # Only dims nobody recorded (the padded maximum) narrow; recorded ones must be the robot's
        if (c.state_dim not in (state_dim, c.max_state_dim) or c.action_dim not in (action_dim, c.max_action_dim)
                or state_dim > c.state_dim or action_dim > c.action_dim):
            raise ValueError(f"the model drives {c.state_dim} state / {c.action_dim} action dims, the robot has "
                             f"{state_dim} / {action_dim} (a model trained for another robot?)")
        narrowed = copy.copy(self)  # as with_cameras: only cfg is its own
        narrowed.cfg = c.replace(state_dim=state_dim, action_dim=action_dim)
        return narrowed

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projector.weight.device

    # ---- prefix -----------------------------------------------------------------------------
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, patches, llm width). Image features are not scaled."""
        return self.projector(self.vision(images.to(self.dtype)))

    def embed_images(self, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`embed_image` of several cameras (name -> (B, 3, H, W)), one at a time as
        `encode_prefix` runs them (FastPi0 batches them in one pass)."""
        return {cam: self.embed_image(x) for cam, x in images.items()}

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llm.embed(tokens) * math.sqrt(self.cfg.llm.width)

    def spans(self, obs: Observation, snapshot: int) -> tuple[Span, ...]:
        """Token spans of the prefix; derived from the config (and, for Pi0.5, from where the
        state tokens start in the prompt)."""
        p = self.cfg.vision.num_patches
        out = [Span(cam, "camera", i * p, (i + 1) * p, snapshot) for i, cam in enumerate(self.cfg.cameras)]
        t0 = len(self.cfg.cameras) * p
        t1 = t0 + self.cfg.max_token_len
        st = obs.host_mask("state_token_mask") if self.cfg.state_in_prompt else None
        if self.cfg.state_in_prompt and bool(st.any()):
            # Everything from the first state token on can shift when the state's token count
            # changes, so the state span runs to the end of the prompt region.
            first = int(st.float().argmax(-1).min())
            out += [Span("text", "text", t0, t0 + first, snapshot), Span("state", "state", t0 + first, t1, snapshot)]
        else:
            out.append(Span("text", "text", t0, t1, snapshot))
        return tuple(out)

    def embed_prefix(self, obs: Observation, image_embeds: dict[str, torch.Tensor] | None = None):
        """Prefix input embeddings and validity. `image_embeds` may supply some cameras'
        embeddings (e.g. reused ones); the others run through the vision tower."""
        self._check(obs)
        p = self.cfg.vision.num_patches
        parts, valid = [], []
        for cam in self.cfg.cameras:
            e = image_embeds.get(cam) if image_embeds else None
            parts.append(self.embed_image(obs.images[cam]) if e is None else e)
            valid.append(obs.image_masks[cam][:, None].expand(-1, p))
        parts.append(self.embed_text(obs.tokens).to(parts[0].dtype))
        valid.append(obs.token_mask)
        return torch.cat(parts, 1), torch.cat(valid, 1)

    def encode_prefix(
        self,
        obs: Observation,
        *,
        snapshot: int | None = None,
        call_index: int = 0,
        keep_hidden: tuple[int, ...] = (),
        image_embeds: dict[str, torch.Tensor] | None = None,
    ) -> PrefixCache:
        check_keep_hidden(self.cfg, keep_hidden)
        embeds, valid = self.embed_prefix(obs, image_embeds)
        spans = self.spans(obs, new_snapshot_id() if snapshot is None else snapshot)
        return self._cache_from(embeds, valid, obs, spans, call_index, keep_hidden)

    def _cache_from(self, embeds, valid, obs, spans, call_index, keep_hidden) -> PrefixCache:
        positions = valid.long().cumsum(-1) - 1
        bias = key_bias(valid, valid.shape[1])
        k, v, hidden = self.llm.prefix_kv(embeds, positions, bias, self.cfg.rope_base, keep_hidden=keep_hidden)
        return PrefixCache(
            k=k, v=v, mask=valid, positions=positions, embeds=embeds, spans=spans,
            tokens=obs.tokens, state_tokens=obs.state_token_mask, hidden=hidden, call_index=call_index,
            created=time.monotonic(),
        )

    def _image_embeds(self, cache: PrefixCache, run_cameras, fresh: dict | None) -> dict[str, torch.Tensor]:
        """Cached embeddings for cameras not in `run_cameras`, plus any fresh ones supplied."""
        p = self.cfg.vision.num_patches
        out = {
            cam: cache.embeds[:, i * p : (i + 1) * p]
            for i, cam in enumerate(self.cfg.cameras)
            if cam not in run_cameras
        }
        out.update({c: e for c, e in (fresh or {}).items() if c in run_cameras})
        return out

    def update_prefix(
        self,
        cache: PrefixCache,
        obs: Observation,
        recompute: torch.Tensor,
        run_cameras: tuple[str, ...],
        spans: tuple[Span, ...],
        call_index: int,
        image_embeds: dict[str, torch.Tensor] | None = None,
    ) -> PrefixCache:
        """A new cache for `obs` that recomputes only the prefix tokens marked in `recompute`
        ((T,) bool, on the CPU or the device) and keeps the cached K/V of all others. Cameras in
        `run_cameras` go through the vision tower (or take their fresh embeddings from
        `image_embeds`, so a caller can time the vision pass or reuse one it already ran); the
        others reuse the cached image embeddings. Recomputing every token is exactly
        `encode_prefix` (same kernels, same result). A token valid in `obs` but not in the cache
        must be recomputed (ReusePolicy's plans do): FastPi0's cache rows past the cached prompt's
        bucket were never computed."""
        embeds, valid = self.embed_prefix(obs, self._image_embeds(cache, run_cameras, image_embeds))
        if bool(recompute.all()):
            return self._cache_from(embeds, valid, obs, spans, call_index, tuple(cache.hidden))
        positions = valid.long().cumsum(-1) - 1
        idx = upload(recompute.nonzero().squeeze(-1), embeds.device)
        bias = key_bias(valid, idx.numel())
        k, v = self.llm.prefix_kv_partial(
            embeds[:, idx], idx, positions[:, idx], cache.k, cache.v, bias, self.cfg.rope_base
        )
        return PrefixCache(
            k=k, v=v, mask=valid, positions=positions, embeds=embeds, spans=spans, tokens=obs.tokens,
            state_tokens=obs.state_token_mask, hidden={}, call_index=call_index, created=time.monotonic(),
        )

    def update_prefix_layers(
        self,
        cache: PrefixCache,
        obs: Observation,
        split: int,
        run_cameras: tuple[str, ...],
        spans: tuple[Span, ...],
        call_index: int,
        image_embeds: dict[str, torch.Tensor] | None = None,
    ) -> PrefixCache:
        """Layer-wise reuse: K/V of layers < split come from the cache; layers >= split are
        recomputed for every token. Their input is the cached residual stream at layer `split`
        with the embedding swapped: h_split(new) := h_split(cached) - e(cached) + e(new), i.e.
        the lower layers' residual contributions are reused and the fresh embeddings ride the
        skip path. Needs a cache made with keep_hidden=(split,), whose prompt has the same valid
        tokens as `obs`'s (ReusePolicy refreshes instead when they differ): FastPi0's cache rows past
        the cached prompt's bucket were never computed."""
        if split not in cache.hidden:
            raise ValueError(f"layer-wise reuse at split {split} needs a cache encoded with keep_hidden=({split},)")
        embeds, valid = self.embed_prefix(obs, self._image_embeds(cache, run_cameras, image_embeds))
        positions = valid.long().cumsum(-1) - 1
        x = cache.hidden[split] - cache.embeds + embeds
        bias = key_bias(valid, valid.shape[1])
        k, v, _ = self.llm.prefix_kv(x, positions, bias, self.cfg.rope_base, start=split)
        return PrefixCache(
            k=torch.cat([cache.k[:split], k]), v=torch.cat([cache.v[:split], v]), mask=valid,
            positions=positions, embeds=cache.embeds, spans=spans, tokens=obs.tokens,
            state_tokens=obs.state_token_mask, hidden=cache.hidden, call_index=call_index,
            created=time.monotonic(),
        )

    # ---- suffix -----------------------------------------------------------------------------
    def _suffix_masks(self, prefix: PrefixCache):
        cfg = self.cfg
        s = cfg.suffix_len
        dev = prefix.mask.device
        positions = prefix.num_valid[:, None] + torch.arange(s, device=dev)[None]
        bias_prefix = key_bias(prefix.mask, s)
        seen = torch.ones(s, s, dtype=torch.bool, device=dev)
        if cfg.state_token:
            seen[0, 1:] = False  # the state token sees the prefix and itself only
        bias_self = torch.zeros(s, s, device=dev).masked_fill(~seen, NEG_INF)
        bias_self = bias_self[None].expand(prefix.mask.shape[0], -1, -1)
        return positions, bias_prefix, bias_self

    def velocity(self, prefix: PrefixCache, obs: Observation, x_t: torch.Tensor, t: torch.Tensor, masks=None):
        """Flow-matching velocity v(x_t, t) given the prefix; x_t (B, chunk, max_action_dim)."""
        cfg = self.cfg
        positions, bias_prefix, bias_self = masks if masks is not None else self._suffix_masks(prefix)
        dt = self.dtype
        te = sincos_time(t, cfg.expert.width, cfg.time_min_period, cfg.time_max_period).to(dt)
        a = self.action_in_proj(x_t.to(dt))
        if cfg.adarms:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(te))))
            tokens = a
        else:
            cond = None
            at = torch.cat([a, te[:, None].expand(-1, a.shape[1], -1)], -1)
            tokens = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(at)))
            tokens = torch.cat([self.state_proj(obs.state.to(dt))[:, None], tokens], 1)
        out = self.expert.suffix(
            tokens, positions, prefix.k, prefix.v, bias_prefix, bias_self, cfg.rope_base, cond
        )
        return self.action_out_proj(out[:, -cfg.chunk_size :]).float()

    def denoise(
        self, prefix: PrefixCache, obs: Observation, noise: torch.Tensor, steps: int | None = None
    ) -> torch.Tensor:
        """Euler integration from t=1 (noise) to t=0 (actions). Reads, never writes, the prefix."""
        steps = self.steps_of(steps)
        dt = -1.0 / steps
        self.check_prefix(prefix, obs.batch_size)
        masks = self._suffix_masks(prefix)
        self.check_noise(noise, obs.batch_size)
        x = noise.float()
        b = x.shape[0]
        for i in range(steps):
            t = torch.full((b,), 1.0 + i * dt, device=x.device)
            x = x + dt * self.velocity(prefix, obs, x, t, masks)
        return x

    def check_noise(self, noise: torch.Tensor, batch: int) -> None:
        """noise must be (batch, chunk, max_action_dim): another shape broadcast (one row's noise
        for every row, one value over every action dim) or failed deep in a product."""
        c = self.cfg
        if tuple(noise.shape) != (batch, c.chunk_size, c.max_action_dim):
            raise ValueError(f"noise: expected shape {(batch, c.chunk_size, c.max_action_dim)} (batch, chunk, max "
                             f"action dim), got {tuple(noise.shape)}")
        if not noise.is_floating_point():  # int noise ran truncated, the actions ~1 off
            raise ValueError(f"noise: expected a floating-point tensor, got {noise.dtype}")

    def make_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.cfg
        return torch.randn(batch, c.chunk_size, c.max_action_dim, generator=generator, device=self.device)

    @torch.no_grad()
    def sample_actions(self, obs: Observation, noise: torch.Tensor | None = None, steps: int | None = None):
        noise = self.make_noise(obs.batch_size) if noise is None else noise
        return self.denoise(self.encode_prefix(obs), obs, noise, steps)

    def prepare(self, obs: Observation) -> None:
        """Nothing to read ahead here (FastPi0.prepare reads host-side values before a caller
        queues device work)."""

    @torch.no_grad()
    def sample_with_prefix(
        self,
        obs: Observation,
        noise: torch.Tensor,
        *,
        snapshot: int | None = None,
        call_index: int = 0,
        keep_hidden: tuple[int, ...] = (),
        image_embeds: dict[str, torch.Tensor] | None = None,
        steps: int | None = None,
    ) -> tuple[torch.Tensor, PrefixCache]:
        """(actions, prefix cache) of encode_prefix + denoise: one call, so that a fast runtime
        can overlap the two (FastPi0.sample_with_prefix)."""
        cache = self.encode_prefix(obs, snapshot=snapshot, call_index=call_index, keep_hidden=keep_hidden,
                                   image_embeds=image_embeds)
        return self.denoise(cache, obs, noise, steps), cache

    # ---- training ---------------------------------------------------------------------------
    def loss(self, obs: Observation, actions: torch.Tensor, noise=None, t=None, valid=None) -> torch.Tensor:
        """Flow-matching loss on (B, chunk, max_action_dim) normalized, padded actions; only the
        robot's real action dims count. valid: optional (B, chunk) weights of real (not padded)
        action steps, e.g. 0 past an episode's end."""
        b = actions.shape[0]
        noise = torch.randn_like(actions) if noise is None else noise
        if t is None:
            t = torch.distributions.Beta(1.5, 1.0).sample((b,)).to(actions.device) * 0.999 + 0.001
        tt = t[:, None, None]
        x_t = tt * noise + (1 - tt) * actions
        u = noise - actions
        v = self.velocity(self.encode_prefix(obs), obs, x_t, t)
        err = (v - u)[..., : self.cfg.action_dim].float().pow(2).mean(-1)  # (B, chunk)
        return err.mean() if valid is None else (err * valid).sum() / valid.sum().clamp(min=1)

    # ---- checks -----------------------------------------------------------------------------
    def steps_of(self, steps: int | None) -> int:
        """The Euler step count a call runs: the config's for None (0 ran the default and a negative
        count returned the noise as actions)."""
        if steps is None:
            return self.cfg.num_steps
        if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps: expected a whole number >= 1, got {steps!r}")
        return int(steps)

    def check_prefix(self, prefix: PrefixCache, batch: int) -> None:
        """A cache of this model for `batch` observations (another batch's K/V were broadcast, row 0's
        prefix answering every row)."""
        want = (batch, self.cfg.prefix_len)
        if tuple(prefix.k.shape[1:3]) != want or tuple(prefix.v.shape[1:3]) != want:
            raise ValueError(f"prefix: expected K/V of (layers, {batch}, {self.cfg.prefix_len}, ...), "
                             f"got {tuple(prefix.k.shape)}")

    def check_observation(self, obs: Observation) -> None:
        """One ValueError naming what does not fit the model (cameras, sizes, batch); no device work."""
        self._check(obs)

    def _check(self, obs: Observation) -> None:
        cfg = self.cfg
        missing = [c for c in cfg.cameras if c not in obs.images]
        if missing:
            raise ValueError(f"observation is missing camera(s) {missing}; model cameras: {list(cfg.cameras)}")
        unmasked = [c for c in cfg.cameras if c not in obs.image_masks]
        if unmasked:
            raise ValueError(f"observation has no image_masks entry for camera(s) {unmasked}")
        # Images are floats in [-1, 1]; uint8 0..255 would run as floats of 0..255, unnoticed.
        kinds = {f"images[{c!r}]": (obs.images[c], True) for c in cfg.cameras}
        kinds |= {f"image_masks[{c!r}]": (obs.image_masks[c], False) for c in cfg.cameras}
        kinds |= {"token_mask": (obs.token_mask, False), "state_token_mask": (obs.state_token_mask, False)}
        for name, (t, floating) in kinds.items():
            if not (t.is_floating_point() if floating else t.dtype == torch.bool):
                want = "a floating-point tensor in [-1, 1]" if floating else "a bool tensor"
                raise ValueError(f"{name}: expected {want}, got {t.dtype}")
        if obs.tokens.shape[1] != cfg.max_token_len:
            raise ValueError(f"tokens: expected length {cfg.max_token_len}, got {obs.tokens.shape[1]}")
        size = cfg.vision.image_size
        for cam in cfg.cameras:
            shp = tuple(obs.images[cam].shape)
            if len(shp) != 4 or shp[1:] != (3, size, size):
                raise ValueError(f"images[{cam!r}]: expected (B, 3, {size}, {size}), got {shp}")
        # Every part of one batch: a hand-built observation could pair a state of one batch with
        # images of another (Pi0.5 then broadcast one noise row over both image rows, no error).
        b = obs.batch_size
        parts = {"tokens": obs.tokens, "token_mask": obs.token_mask, "state_token_mask": obs.state_token_mask,
                 **{f"images[{c!r}]": obs.images[c] for c in cfg.cameras},
                 **{f"image_masks[{c!r}]": m for c, m in obs.image_masks.items() if c in cfg.cameras}}
        wrong = {k: tuple(t.shape) for k, t in parts.items() if t.ndim == 0 or t.shape[0] != b}
        if wrong:
            raise ValueError(f"observation: state has batch {b}, but {', '.join(f'{k} {s}' for k, s in wrong.items())}")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_keep_hidden(cfg, keep_hidden) -> None:
    """keep_hidden names LM layers whose input residual a cache keeps: 0 .. depth - 1 (a depth or more
    was kept by neither model: the eager one returned no such entry, FastPi0 raised KeyError)."""
    bad = [i for i in keep_hidden if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.llm.depth]
    if bad:
        raise ValueError(f"keep_hidden: {bad} are not LM layer indices (0 .. {cfg.llm.depth - 1})")
