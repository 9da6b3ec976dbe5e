"""ReusePolicy: one inference path for the baseline and every reuse setting.

    invalidation -> signals -> gate -> mode plan -> execute (vision, prefix) -> denoise -> record

With the `never` gate every call is a full refresh through exactly the operations of
`Pi0Model.sample_actions` (vision tower, encode_prefix, denoise; `embed_images` runs the cameras
as the model's sample_actions does: one at a time on Pi0Model, batched on FastPi0; on FastPi0
with `overlap`, sample_with_prefix runs the prefix and the denoise as sample_actions does), so
actions are bit-identical to it for the same observation and noise (design invariant 1).

Per-part times (vision, prefix, denoise; "sample" for a refresh or an update through
sample_with_prefix / sample_with_update, whose prefix LM and denoise overlap and cannot be timed
apart) come from
CUDA events on a GPU, read once after the call's final sync, so the host queues each part while
the GPU runs the previous one; `total` is wall-clock from the call's start to that sync. On the
CPU all are wall-clock.

Bookkeeping per cached prefix token: the call index and time its K/V were computed (`births`).
Age = age of the oldest valid K/V row; `mixed` = rows of more than one call (or layer-wise
reuse, whose lower layers are older than its upper ones).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import replace

import numpy as np
import torch

from ..cache import PrefixCache, new_snapshot_id
from ..model.graphs import Graphs
from ..model.pi0 import Pi0Model
from ..observation import Observation, upload
from .config import ReuseConfig
from .gates import Decision, make_gate
from .modes import HostPrefix, Plan, host_prefix, plan_refresh, plan_reuse
from .records import ReuseStats, StepRecord
from .signals import (PhaseCues, Reference, SignalGraphs, Signals, camera_ref, measure, patchify, phase_cues,
                      present_cameras)

AGE_REASON = "max age exceeded"  # a refresh's reason when the cache outlived max_age_calls / max_age_s
_SERVED: weakref.WeakSet = weakref.WeakSet()  # models that have run a call in this process (see infer)


class _Parts:
    """Start/end marks of a call's parts: CUDA events (no host sync) or perf_counter."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.spans: list[tuple[str, object, object]] = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def add(self, part: str, start) -> None:
        self.spans.append((part, start, self.mark()))

    def resolve(self, timings: dict) -> None:
        """Add each span's ms to timings[part]; on CUDA only after a sync past the last mark."""
        for part, a, b in self.spans:
            timings[part] += a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _check_for_model(cfg: ReuseConfig, mc) -> None:
    """What a ReuseConfig cannot check alone: its fields against this model's dims."""
    if not isinstance(cfg, ReuseConfig):
        raise ValueError(f"reuse: expected a ReuseConfig (or None), got {type(cfg).__name__}")
    n = mc.action_dim
    if cfg.gate == "phase" and not -n <= cfg.gripper_dim < n:  # else it would wrap onto another dim
        raise ValueError(f"reuse.gripper_dim: {cfg.gripper_dim} is not one of this model's {n} action dims "
                         f"({-n} .. {n - 1})")
    if cfg.downsample > mc.vision.image_size:
        raise ValueError(f"reuse.downsample: {cfg.downsample} exceeds the model's {mc.vision.image_size}-px images")


class ReusePolicy:
    def __init__(self, model: Pi0Model, config: ReuseConfig | None = None):
        self.model = model
        self.config = config or ReuseConfig()
        mc = model.cfg
        _check_for_model(self.config, mc)
        self.split = self.config.split_for(mc.llm.depth) if self.config.mode == "layer_wise" else None
        self.gate = make_gate(self.config)
        mode_needs = {"partial": {"patches"}, "state_only": {"pixels"}, "layer_wise": {"pixels"}}
        self.needs = set(self.gate.needs) | mode_needs.get(self.config.mode, set())
        self.stats = ReuseStats()
        self._graphs = SignalGraphs()  # the signals as CUDA graphs on a GPU (see measure)
        self._signals_ready = False  # see _execute
        self.reset()

    def reset(self) -> None:
        """Start an episode: forget the cache, its reference and the phase cues."""
        self.cache: PrefixCache | None = None
        self.ref: Reference | None = None
        # numpy, not torch: the per-call lookups on them would cost a torch op's dispatch each
        self.births: np.ndarray | None = None  # (T,) call index of each row's K/V
        self.birth_times: np.ndarray | None = None  # (T,) monotonic seconds
        self._valid_rows: torch.Tensor | None = None  # see valid_rows
        self._host: HostPrefix | None = None  # the cache's tokens, validity and positions on the CPU
        self._oldest: tuple[int, float] | None = None  # see age
        self._ref_update: tuple | None = None  # see _execute
        self.layer_mixed = False
        self.mixed = False  # the cache's K/V combine more than one observation
        self.phase: PhaseCues | None = None
        self.call_index = 0
        self._refreshed_at = 0  # call index of the last refresh (the period gate counts from it)
        # layer_wise: the cameras the cache's upper layers took fresh, their images as that update saw them
        self._layer_imgs: dict[str, torch.Tensor] = {}
        self._base_tokens: torch.Tensor | None = None  # layer_wise: the refresh's prompt ids (CPU)

    # ---- bookkeeping ------------------------------------------------------------------------
    def _prompt_ids(self) -> torch.Tensor:
        """The cache's prompt ids on the CPU: the host copy, else read from the cache (a device
        read, only where the observations came without host copies)."""
        return self._host.tokens if self._host is not None else self.cache.tokens.cpu()

    @property
    def valid_rows(self) -> torch.Tensor | None:
        """(T,) CPU bool: the cache's rows valid in any batch row. From the cache's HostPrefix
        where the policy has one (observations moved to the device by Observation.to), else read
        from the device when first needed (a host sync), once per cache: a full refresh, the never
        gate's every call, needs it only if a later call reuses the cache."""
        if self._valid_rows is None and self.cache is not None:
            self._valid_rows = self._host.mask.any(0) if self._host is not None else self.cache.mask.any(0).cpu()
        return self._valid_rows

    def _sync(self) -> float:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    def age(self, call: int, now: float) -> tuple[int, float]:
        """(calls, seconds) since the oldest valid K/V row of the cache was computed (its birth
        is looked up once per cache: the lookup costs more host time than the rest of a hit's
        bookkeeping)."""
        if self._oldest is None:
            valid = self.valid_rows.numpy()
            self._oldest = int(self.births[valid].min()), float(self.birth_times[valid].min())
        return call - self._oldest[0], now - self._oldest[1]

    def invalid_reason(self, obs: Observation, raw_shapes, call: int, now: float) -> str | None:
        """Why the cache may not be reused at all, or None."""
        if self.cache is None:
            return "no cache (episode start)"
        r, cfg = self.ref, self.config
        if obs.batch_size != r.state.shape[0]:
            return "batch size changed"
        if obs.prompt != r.prompt:
            return "prompt changed"
        if set(obs.image_masks) != set(r.image_masks) or any(  # (host copies: no device read)
            not torch.equal(obs.host_mask(f"image_masks/{c}"), r.image_masks[c]) for c in r.image_masks
        ):
            return "camera set changed"
        if raw_shapes is not None and r.raw_shapes is not None and tuple(raw_shapes) != tuple(r.raw_shapes):
            return "image size changed"
        if self.model.dtype != r.dtype or obs.device != r.device:
            return "dtype/device changed"
        calls, secs = self.age(call, now)
        if cfg.max_age_calls is not None and calls > cfg.max_age_calls:
            return f"{AGE_REASON} ({calls} > {cfg.max_age_calls} calls)"
        if cfg.max_age_s is not None and secs > cfg.max_age_s:
            return f"{AGE_REASON} ({secs:.3f} > {cfg.max_age_s:g} s)"
        return None

    # ---- one call ---------------------------------------------------------------------------
    @torch.no_grad()
    def infer(
        self, obs: Observation, noise: torch.Tensor, raw_shapes: tuple | None = None, started: float | None = None
    ) -> tuple[torch.Tensor, StepRecord]:
        """-> ((B, chunk, max_action_dim) normalized actions, record). `started` (perf_counter)
        lets a caller include its input transform in the record's total."""
        model, cfg, mc = self.model, self.config, self.model.cfg
        # What a refresh would refuse, a hit must too (it computes nothing that would check it)
        model.check_observation(obs)
        t_start = self._sync() if started is None else started
        captured = Graphs.captured
        call = self.call_index
        self.call_index += 1
        now = time.monotonic()
        timings = {"signals": 0.0, "vision": 0.0, "prefix": 0.0, "denoise": 0.0, "sample": 0.0}
        self._parts = parts = _Parts(model.device.type == "cuda")
        self._passes = 0  # vision-tower camera passes this call (signals + plan)
        self._ahead = False  # see _vision_ahead
        sig = Signals()

        # The never gate refreshes every call whatever the cache, so the invalidation checks (two
        # device syncs on the camera masks among them) would only delay the call's first launch.
        invalid = self.invalid_reason(obs, raw_shapes, call, now) if cfg.enabled else None
        if invalid is not None:
            decision = Decision(False, invalid)
        elif not cfg.enabled:
            decision = Decision(False, "gate never")
        else:
            sig = self._measure(obs, timings)
            sig.age_calls, sig.age_s = self.age(call, now)
            sig.since_refresh = call - self._refreshed_at
            decision = self.gate.decide(sig)

        new_host = None  # obs's HostPrefix, made only where a plan compares it (a hit is host-bound)
        if not decision.reuse:
            plan = plan_refresh(cfg, mc, self.cache if invalid is None else None, obs)
        else:
            if cfg.mode in ("partial", "state_only") and not cfg.synchronized:
                self._vision_ahead(obs, sig)
            if self._host is not None and cfg.mode not in ("full", "text_fixed"):
                new_host = host_prefix(obs, mc)
            plan = plan_reuse(cfg, mc, self.cache, obs, sig, (self._host, new_host) if new_host is not None else None,
                              self._layer_imgs)
            if cfg.synchronized and plan.kind in ("tokens", "layers"):
                plan = Plan("all", note=f"synchronized: {plan.note} -> refresh every span")

        out = self._execute(plan, obs, sig, call, now, raw_shapes, noise, new_host)

        dobs, state_source = obs, "prefix" if mc.state_in_prompt else "none"
        if mc.state_token:
            state_source = "fresh"
            if cfg.synchronized and plan.kind == "none":
                dobs, state_source = replace(obs, state=self.ref.state), "snapshot"
        if out is None:  # (a refresh or an update on an overlapping model has denoised already)
            t = parts.mark()
            out = model.denoise(self.cache, dobs, noise)
            parts.add("denoise", t)
        if self._ref_update is not None:
            self._update_ref(*self._ref_update)
            self._ref_update = None
        if plan.kind != "none":
            self._valid_rows = self._oldest = None
            # A full refresh gives every row the same birth; a partial or layer-wise one may not.
            self.mixed = plan.kind != "all" and (
                self.layer_mixed or len(np.unique(self.births[self.valid_rows.numpy()])) > 1)  # (denoise queued)
        # A token plan over every token with the observation's own prompt (modes._complete) ran the
        # refresh's exact path: nothing was reused, so it counts as a refresh (rate, period clock).
        whole = plan.whole and not plan.prompt_from_cache
        reused = decision.reuse and not whole
        if not reused:
            self._refreshed_at = call
        rec = StepRecord(  # made while the device still works; its timings are filled in below
            decision="reuse" if reused else "refresh",
            mode=cfg.mode if not whole else "none",
            reason=f"{decision.reason}; {plan.note}",
            # nothing measured where the cache was invalid or the gate never reuses: no defaults posing as
            # readings ("prompt_same": true on a prompt change, "age_calls": 0 past the age cap)
            signals=sig.to_dict() if invalid is None and cfg.enabled else {},
            snapshots=tuple(s.snapshot for s in self.cache.spans),
            mixed=self.mixed,
            timings=timings,
            plan="all" if whole else plan.kind,
            cost={**plan.cost(mc, self.split), "vision_cameras": self._passes},
            call_index=call,
            state_source=state_source,
        )
        # A warm-up: the call captured CUDA graphs (with any compilation), or was its model's first
        # in this process (lazy CUDA / BLAS set-up). Its time is not the steady state's.
        first = model not in _SERVED
        if first:
            _SERVED.add(model)
        rec.warmup = first or Graphs.captured != captured
        if "phase" in self.needs:
            self.phase = phase_cues(out, cfg, mc.action_dim)

        timings["total"] = (self._sync() - t_start) * 1e3
        parts.resolve(timings)
        self.stats.add(rec)
        return out, rec

    def _measure(self, obs: Observation, timings: dict) -> Signals:
        cfg = self.config
        fresh = None
        if "image" in self.needs and cfg.image_metric == "siglip":
            t = self._parts.mark()
            fresh = self.model.embed_images({c: obs.images[c] for c in present_cameras(obs)})
            self._passes += len(fresh)
            self._parts.add("vision", t)
        t = time.perf_counter()
        sig = measure(obs, self.ref, cfg, self.needs, self.model.cfg.vision.patch_size, self.model.cfg.state_dim,
                      fresh, self._graphs)
        sig.phase = self.phase
        timings["signals"] = (time.perf_counter() - t) * 1e3
        return sig

    def _vision_ahead(self, obs: Observation, sig: Signals) -> None:
        """Queue the vision pass of the cameras a partial / state_only plan runs (known from the
        signals alone) before the plan is made, so that the device runs it while the host makes
        the plan (round 16); the plan's own _vision call finds them in sig.fresh_embeds. Neither
        mode's plan turns into a refresh, which would have run all cameras in one pass."""
        cams = self.model.cfg.cameras
        if self.config.mode == "partial":
            run = tuple(c for c in cams if c in sig.changed_patches and bool(sig.changed_patches[c].any()))
        else:
            run = tuple(c for c in cams if sig.pixels_changed.get(c, False))
        if run:
            self.model.prepare(obs)  # (as _execute: FastPi0's host syncs for obs before the pass)
            self._ahead = True
            sig.fresh_embeds.update(self._vision(obs, run, sig))

    def _vision(self, obs: Observation, cams, sig: Signals) -> dict[str, torch.Tensor]:
        """Image embeddings of `cams`, reusing the ones the siglip signal or _vision_ahead computed."""
        todo = [c for c in cams if c not in sig.fresh_embeds]
        if not todo:
            return {c: sig.fresh_embeds[c] for c in cams}
        t = self._parts.mark()
        new = self.model.embed_images({c: obs.images[c] for c in todo})  # one pass on FastPi0
        out = {c: sig.fresh_embeds[c] if c in sig.fresh_embeds else new[c] for c in cams}
        self._passes += len(todo)
        self._parts.add("vision", t)
        return out

    def _execute(
        self, plan: Plan, obs: Observation, sig: Signals, call: int, now: float, raw_shapes, noise: torch.Tensor,
        new_host: HostPrefix | None = None,
    ) -> torch.Tensor | None:
        """Runs the plan's vision and prefix work. On a model that overlaps the prefix with the
        denoise (FastPi0's `overlap`) a refresh runs both through sample_with_prefix, a partial or
        layer-wise update through sample_with_update, timed as the part "sample", and returns the
        actions; otherwise None (the caller denoises)."""
        model, mc, cfg = self.model, self.model.cfg, self.config
        patch = mc.vision.patch_size
        if plan.kind == "none":
            return None
        if not self._ahead:  # (done before a vision pass queued ahead of the plan)
            model.prepare(obs)  # FastPi0: its host syncs for obs now, not behind the vision pass
        snap = new_snapshot_id()
        out = None
        if plan.kind == "all":
            embeds = self._vision(obs, mc.cameras, sig)
            t = self._parts.mark()
            kw = dict(snapshot=snap, call_index=call, keep_hidden=(self.split,) if self.split is not None else (),
                      image_embeds=embeds)
            if getattr(model, "overlap", False):
                out, self.cache = model.sample_with_prefix(obs, noise, **kw)
                self._parts.add("sample", t)
            else:
                self.cache = model.encode_prefix(obs, **kw)
                self._parts.add("prefix", t)
            self._host = host_prefix(obs, mc) if cfg.enabled else None  # (made while the device works)
            T = self.cache.length
            self.births = np.full(T, call, dtype=np.int64)
            self.birth_times = np.full(T, now, dtype=np.float64)
            self.layer_mixed = False
            self._layer_imgs = {}
            self._base_tokens = self._prompt_ids() if cfg.enabled and cfg.mode == "layer_wise" else None
            if not cfg.enabled:  # the never gate compares nothing with it: no reference to build
                self.ref = None  # (its copies would queue behind the graph and delay the call's end)
                return out
            state = obs.state.clone()
            self.ref = Reference(
                cameras={c: camera_ref(obs.images[c], cfg, patch, embeds[c]) for c in mc.cameras},
                image_masks={c: obs.host_mask(f"image_masks/{c}").clone() for c in obs.image_masks},  # CPU
                state=state,
                camera_state=state,  # replaced, never written in place: one tensor serves both
                prompt=obs.prompt,
                raw_shapes=tuple(raw_shapes) if raw_shapes is not None else None,
                dtype=model.dtype,
                device=obs.device,
            )
            if not self._signals_ready:  # on a GPU the signals compile and are captured now, not in a hit
                measure(obs, self.ref, cfg, self.needs, patch, mc.state_dim, embeds, self._graphs)
                self._signals_ready = True
            return out

        embeds = self._vision(obs, plan.run_cameras, sig)
        names = plan.refreshed
        if plan.whole:  # (a tokens or layers plan here)
            names = tuple(sp.name for sp in self.cache.spans)
        spans = self.cache.with_spans(**{name: snap for name in names})
        t = self._parts.mark()
        pobs = obs
        if plan.prompt_from_cache:  # (tokens plans only)
            t0 = len(mc.cameras) * mc.vision.num_patches
            pobs = replace(
                obs, tokens=self.cache.tokens, token_mask=self.cache.mask[:, t0:],
                state_token_mask=self.cache.state_tokens,
            )
        # With `overlap` the denoise runs in the update's graph, Euler step 0 trailing the
        # recomputed layers (FastPi0.sample_with_update), as a refresh's does in sample_with_prefix.
        # (pobs differs from obs in its prompt only, which the denoise does not read.)
        overlap = getattr(model, "overlap", False)
        if overlap:
            what = dict(recompute=plan.recompute) if plan.kind == "tokens" else dict(split=self.split)
            out, self.cache = model.sample_with_update(
                self.cache, pobs, noise, plan.run_cameras, spans, call, image_embeds=embeds, **what)
        elif plan.kind == "tokens":
            self.cache = model.update_prefix(
                self.cache, pobs, plan.recompute, plan.run_cameras, spans, call, image_embeds=embeds)
        else:
            self.cache = model.update_prefix_layers(
                self.cache, obs, self.split, plan.run_cameras, spans, call, image_embeds=embeds)
        if plan.prompt_from_cache:
            self._host = host_prefix(obs, mc, prompt_from=self._host) if self._host is not None else None
        else:
            self._host = new_host if new_host is not None else host_prefix(obs, mc)
        if plan.kind == "tokens":
            rec = plan.recompute.cpu().numpy()
            self.births[rec] = call
            self.birth_times[rec] = now
        else:  # layers: lower layers (and the signal references) stay those of the base snapshot
            # The upper layers took this call's cameras that moved and its prompt (Pi0.5's state
            # digits): with neither differing from the base, the K/V are one observation's.
            same_prompt = self._base_tokens is not None and torch.equal(self._prompt_ids(), self._base_tokens)
            self.layer_mixed = bool(plan.run_cameras) or not same_prompt
            self._layer_imgs = {c: obs.images[c].clone() for c in plan.run_cameras}
        self._parts.add("sample" if overlap else "prefix", t)
        if plan.kind == "tokens":  # done once the denoise is queued: it needs none of it
            self._ref_update = (plan, obs, embeds)
        return out

    def _update_ref(self, plan: Plan, obs: Observation, embeds: dict) -> None:
        """Move the signal references of recomputed tokens to the new observation."""
        mc, cfg = self.model.cfg, self.config
        p, patch = mc.vision.num_patches, mc.vision.patch_size
        every_camera = True  # every camera's rows recomputed: the cameras' K/V are this call's

        def absent(cam: str) -> bool:  # in no batch row: no K/V to go stale (and none recomputed)
            return cam not in obs.image_masks or not bool(obs.host_mask(f"image_masks/{cam}").any())

        for i, cam in enumerate(mc.cameras):
            rows = plan.recompute[i * p : (i + 1) * p].cpu()
            whole = bool(rows.all()) or absent(cam)
            every_camera &= whole
            if whole:
                self.ref.cameras[cam] = camera_ref(obs.images[cam], cfg, patch, embeds.get(cam))
            elif bool(rows.any()):
                r = self.ref.cameras[cam]
                new = patchify(obs.images[cam], patch)
                # Row indices, not a mask: a mask index on a GPU is a device sync, here one that
                # would wait for the denoise queued before this.
                idx = upload(rows.nonzero().squeeze(-1), r.patches.device)
                r.patches = r.patches.index_copy(1, idx, new.index_select(1, idx))
        if mc.state_in_prompt:  # the state's tokens: this call's unless the cached prompt was kept
            state_span = not plan.prompt_from_cache and (plan.whole or "state" in plan.refreshed)
        else:  # no state in the prefix (Pi0's is a fresh suffix token): the prefix is this call's once
            # every camera is, whatever text was kept (text_fixed, state_only refreshed every camera and
            # left the reference behind: the gate then refreshed on a state long since reused)
            state_span = every_camera
        if state_span or every_camera:
            state = obs.state.clone()  # replaced, never written in place: one tensor may serve both
            if state_span:
                self.ref.state = state
            if every_camera:
                self.ref.camera_state = state
