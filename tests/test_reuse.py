"""Invariants of gated prefix-KV reuse (hypothesis property tests + mode cost accounting).

Models are small variants of the tiny presets (same code paths, fewer/narrower layers, 64px
images with 16 patches per camera) so the whole file runs in well under a minute.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvreuse.model import Pi0Model, preset
from kvreuse.model.config import GemmaConfig, VisionConfig
from kvreuse.model.tokenizer import load_tokenizer
from kvreuse.observation import Observation
from kvreuse.policy import Policy
from kvreuse.reuse.config import MODES, ReuseConfig
from kvreuse.reuse.policy import ReusePolicy
from kvreuse.reuse.signals import patchify
from kvreuse.transforms.robot import RobotTransform, robot_spec

torch.set_num_threads(1)
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SIZE = 64


def small_cfg(variant: str):
    vision = VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16, image_size=SIZE)
    llm = GemmaConfig(width=64, depth=3, mlp_dim=96, num_heads=2, num_kv_heads=1, head_dim=16)
    expert = GemmaConfig(width=48, depth=3, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
    return preset(f"tiny-{variant}", vision=vision, llm=llm, expert=expert, num_steps=2, chunk_size=4)


_MODELS: dict[str, tuple] = {}


def model_and_tf(variant: str):
    if variant not in _MODELS:
        torch.manual_seed(0)
        m = Pi0Model(small_cfg(variant)).eval()
        tf = RobotTransform(m.cfg, load_tokenizer(m.cfg), None, robot_spec("metaworld"))
        _MODELS[variant] = (m, tf)
    return _MODELS[variant]


def raw_obs(rng: np.random.Generator, prompt="pick up the puck", state=None) -> dict:
    img = lambda: rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)  # noqa: E731
    return {
        "observation/image": img(),
        "observation/wrist_image": img(),
        "observation/state": rng.uniform(-1, 1, 4) if state is None else state,
        "prompt": prompt,
    }


def nudge(raw: dict, rng: np.random.Generator, pixels: int = 1, state_delta: float = 0.0) -> dict:
    """A copy of `raw` with a few pixels of the base camera changed (and the state moved)."""
    out = dict(raw)
    im = raw["observation/image"].copy()
    for _ in range(pixels):
        y, x = rng.integers(0, SIZE, 2)
        im[y, x] = 255 - im[y, x]
    out["observation/image"] = im
    out["observation/state"] = raw["observation/state"] + state_delta
    return out


def noise_for(model, seed: int):
    return model.make_noise(1, torch.Generator().manual_seed(seed))


# ---- invariant 1: reuse off is the plain model, bit for bit ---------------------------------


@FAST
@given(variant=st.sampled_from(["pi0", "pi05"]), seed=st.integers(0, 2**16), mode=st.sampled_from(MODES))
def test_reuse_off_is_bit_identical_to_sample_actions(variant, seed, mode):
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(seed)
    pol = Policy(m, tf, reuse=ReuseConfig(gate="never", mode=mode))
    for i in range(3):
        raw = raw_obs(rng) if i != 1 else nudge(raw, rng)  # noqa: F821 - raw from the first step
        n = noise_for(m, seed + i)
        a, rec = pol.infer(raw, n.clone())
        expect = tf.actions(m.sample_actions(tf(raw), n.clone()))[0]
        assert np.array_equal(a, expect)
        assert rec.decision == "refresh" and rec.plan == "all" and not rec.mixed


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("mode", MODES)
def test_a_gate_that_never_fires_is_bit_identical_to_sample_actions(variant, mode):
    """Design invariant 1 for reusing gates whose test always fails (every frame changes): each call
    refreshes through the same path as sample_actions, the siglip metric's own vision pass
    included; text_fixed keeps its text span on such a refresh, by design, so it differs."""
    m, tf = model_and_tf(variant)
    settings_ = [dict(gate="threshold", image_metric=metric, threshold=1.0) for metric in ("raw", "patch", "siglip")]
    settings_ += [dict(gate="crossmodal", threshold=-1.0, state_threshold=1.0), dict(gate="period", period=1),
                  dict(gate="phase", threshold=1.0, phase_threshold=1.0)]
    for kw in settings_:
        rng = np.random.default_rng(0)
        pol = ReusePolicy(m, ReuseConfig(mode=mode, **kw))
        raw, same = raw_obs(rng), []
        for i in range(3):
            raw = nudge(raw, rng, pixels=3, state_delta=0.01)
            obs, n = tf(raw), noise_for(m, i)
            a, rec = pol.infer(obs, n.clone())
            assert rec.decision == "refresh", (kw, i)
            same.append(torch.equal(a, m.sample_actions(obs, n.clone())))
        assert same == ([True, False, False] if mode == "text_fixed" else [True] * 3), kw


@pytest.mark.parametrize("mode", MODES)
def test_a_hit_refuses_what_a_refresh_refuses(mode):
    """A reuse computes nothing that would check its observation: images of another size, or of another
    batch than the state, were answered from the cache where a refresh raised."""
    m, tf = model_and_tf("pi0")
    for kw in (dict(gate="always"), dict(gate="threshold", threshold=0.5), dict(gate="period", period=9)):
        pol = ReusePolicy(m, ReuseConfig(mode=mode, **kw))
        obs = tf(raw_obs(np.random.default_rng(0)))
        pol.infer(obs, noise_for(m, 0))
        cam = m.cfg.cameras[0]
        small = replace(obs, images={**obs.images, cam: obs.images[cam][..., ::2, ::2]})
        two = replace(obs, images={**obs.images, cam: obs.images[cam].expand(2, -1, -1, -1)})
        for bad, match in ((small, r"images\[.*expected \(B, 3, 64, 64\)"), (two, "observation: state has batch 1")):
            with pytest.raises(ValueError, match=match):
                m.sample_actions(bad, noise_for(m, 1))
            with pytest.raises(ValueError, match=match):
                pol.infer(bad, noise_for(m, 1))
        assert pol.infer(obs, noise_for(m, 2))[1].decision == "reuse", kw  # the refused calls changed nothing


# ---- a lower threshold never reuses less -----------------------------------------------------


def _rotating_stream(m, n_steps: int, theta: float, seed: int) -> list[Observation]:
    """Model-space images y_t = cos(t theta) u + sin(t theta) v with u, v orthogonal and constant
    over the 2x2 blocks the raw metric pools (64 -> 32): the raw cosine between frames a and b is
    cos(theta |a - b|), so a greedy threshold gate refreshes every r(threshold) + 1 calls."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, 3, SIZE // 2, SIZE // 2, generator=g)
    v = torch.randn(1, 3, SIZE // 2, SIZE // 2, generator=g)
    v = v - (v * u).sum() / (u * u).sum() * u
    u, v = u / u.norm(), v / v.norm()
    up = lambda x: x.repeat_interleave(2, -1).repeat_interleave(2, -2) * 20  # noqa: E731
    _, tf = model_and_tf("pi0")
    base = tf(raw_obs(np.random.default_rng(seed), state=np.zeros(4)))
    out = []
    for t in range(n_steps):
        y = math.cos(t * theta) * up(u) + math.sin(t * theta) * up(v)
        out.append(replace(base, images={"base": y, "wrist": y.clone()}))
    return out


@settings(max_examples=6, deadline=None)
@given(k_low=st.integers(1, 4), dk=st.integers(0, 3), seed=st.integers(0, 100))
def test_lower_threshold_never_reuses_less(k_low, dk, seed):
    m, _ = model_and_tf("pi0")
    theta = 0.05
    # thresholds placed between the cosines of whole frame distances, away from ties
    t_high = math.cos((k_low - 0.5) * theta)
    t_low = math.cos((k_low + dk + 0.5) * theta)
    stream = _rotating_stream(m, 10, theta, seed)
    counts = []
    for thr in (t_high, t_low):
        rp = ReusePolicy(m, ReuseConfig(gate="threshold", threshold=thr, downsample=SIZE // 2))
        counts.append(sum(rp.infer(o, noise_for(m, 0))[1].reused for o in stream))
    assert counts[1] >= counts[0]
    assert counts[0] == 10 - math.ceil(10 / k_low)  # the greedy block structure, exactly


# ---- never reuse across prompt change / reset ------------------------------------------------


@FAST
@given(events=st.lists(st.sampled_from(["same", "nudge", "prompt", "reset"]), min_size=3, max_size=8),
       variant=st.sampled_from(["pi0", "pi05"]), mode=st.sampled_from(MODES))
def test_never_reuse_across_prompt_change_or_reset(events, variant, mode):
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(0)
    pol = Policy(m, tf, reuse=ReuseConfig(gate="always", mode=mode))
    raw = raw_obs(rng)
    seen: set[int] = set()
    pol.infer(raw)
    seen |= set(pol.runner.cache.snapshots)
    prompts = iter(f"task number {i}" for i in range(100))
    for ev in events:
        if ev == "nudge":
            raw = nudge(raw, rng)
        elif ev == "prompt":
            raw = {**raw, "prompt": next(prompts)}
        elif ev == "reset":
            pol.reset()
        _, rec = pol.infer(raw)
        if ev in ("prompt", "reset"):
            assert rec.decision == "refresh" and rec.plan == "all"
            assert not set(rec.snapshots) & seen, "a span survived a prompt change or reset"
            assert len(set(rec.snapshots)) == 1 and not rec.mixed
        seen |= set(rec.snapshots)


@pytest.mark.parametrize("gate", ["phase", "period", "crossmodal"])
@pytest.mark.parametrize("mode", ["layer_wise", "text_fixed", "partial"])
def test_reset_leaves_nothing_of_the_last_episode(gate, mode):
    """After reset() a policy acts as a new one (phase cues, period clock, layer-wise cameras,
    references all per episode): same actions, decisions and plans on the next episode."""
    m, tf = model_and_tf("pi05")
    cfg = ReuseConfig(gate=gate, mode=mode, period=3, threshold=0.9, phase_threshold=0.999, state_threshold=0.9)
    rng = np.random.default_rng(6)
    first, second = [raw_obs(rng)], [raw_obs(rng)]
    for ep in (first, second):
        for i in range(4):
            ep.append(nudge(ep[-1], rng, pixels=4 * (i % 2), state_delta=0.1 * (i % 3)))
    used, new = ReusePolicy(m, cfg), ReusePolicy(m, cfg)
    for i, r in enumerate(first):
        used.infer(tf(r), noise_for(m, i))
    used.reset()
    for i, r in enumerate(second):
        (a, ra), (b, rb) = used.infer(tf(r), noise_for(m, i)), new.infer(tf(r), noise_for(m, i))
        assert torch.equal(a, b), i
        assert (ra.decision, ra.plan, ra.cost, ra.mixed, ra.call_index) == (rb.decision, rb.plan, rb.cost, rb.mixed,
                                                                             rb.call_index), i


# ---- synchronized never mixes snapshots ------------------------------------------------------


@FAST
@given(variant=st.sampled_from(["pi0", "pi05"]), mode=st.sampled_from(MODES),
       gate=st.sampled_from(["always", "period", "threshold"]), seed=st.integers(0, 1000),
       pixels=st.lists(st.integers(0, 30), min_size=3, max_size=6))
def test_synchronized_never_mixes_snapshots(variant, mode, gate, seed, pixels):
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(seed)
    pol = Policy(m, tf, reuse=ReuseConfig(gate=gate, mode=mode, synchronized=True, threshold=0.999, period=3))
    raw = raw_obs(rng)
    for px in [0] + pixels:
        raw = nudge(raw, rng, px, state_delta=0.05 * (px % 2))
        _, rec = pol.infer(raw)
        assert not rec.mixed
        assert len(set(rec.snapshots)) == 1
        if rec.reused:
            assert rec.plan == "none"
            if variant == "pi0":
                assert rec.state_source == "snapshot"


@pytest.mark.parametrize("sync", [False, True])
def test_delta_actions_are_offsets_from_the_state_the_model_was_given(sync):
    """openpi's pi0_libero gives offsets from the state. A synchronized hit denoises with the
    snapshot's state, but the current one was added back: the chunk moved by the state's change."""
    m, _ = model_and_tf("pi0")
    cfg = m.cfg.replace(delta_action_mask=(True, True, False, False))
    tf = RobotTransform(cfg, load_tokenizer(cfg), None, robot_spec("metaworld"))
    pol = Policy(Pi0Model(cfg).eval(), tf, reuse=ReuseConfig(gate="always", synchronized=sync))
    raw = raw_obs(np.random.default_rng(0))
    moved = {**raw, "observation/state": raw["observation/state"] + 0.5}
    a1, _ = pol.infer(raw, noise_for(m, 0))
    a2, rec = pol.infer(moved, noise_for(m, 0))
    assert rec.reused and rec.state_source == ("snapshot" if sync else "fresh")
    if sync:  # the snapshot's own chunk, as it was
        np.testing.assert_array_equal(a2, a1)
    else:  # the state token is the current one, and so is the state added back
        assert not np.allclose(a2[:, :2], a1[:, :2]) and np.isfinite(a2).all()
    pi05 = small_cfg("pi05").replace(delta_action_mask=(True, True, False, False))
    tf05 = RobotTransform(pi05, load_tokenizer(pi05), None, robot_spec("metaworld"))
    with pytest.raises(ValueError, match="state is in the prompt runs without reuse only"):
        Policy(Pi0Model(pi05).eval(), tf05, reuse=ReuseConfig(gate="always"))
    Policy(Pi0Model(pi05).eval(), tf05)  # the baseline runs


def test_a_threshold_of_one_reuses_identical_inputs_only():
    """1.0 is documented as "bit-equal": a flat patch made brighter, or a scaled state, is parallel to
    the old one (cosine 1, or 1.0000006 by rounding) and was reused at 1.0."""
    from kvreuse.reuse.signals import patch_cosine, row_cosine

    flat = torch.full((1, 2, 12), 0.2)
    assert patch_cosine(flat, flat * 1.5).max() < 1 and (patch_cosine(flat, flat.clone()) == 1).all()
    state = torch.tensor([[0.3, -0.2, 0.7, 0.1]])
    assert row_cosine(state, state * 1.0001) < 1 and row_cosine(state, state.clone()) == 1
    m, tf = model_and_tf("pi0")
    raw = raw_obs(np.random.default_rng(0))
    raw["observation/image"][:16, :16] = 100  # patch 0 of the base camera: flat gray
    brighter = {**raw, "observation/image": raw["observation/image"].copy()}
    brighter["observation/image"][:16, :16] = 110
    for cfg in (ReuseConfig(gate="always", mode="partial", patch_threshold=1.0, patch_max_diff=None),
                ReuseConfig(gate="crossmodal", threshold=1.0, state_threshold=1.0)):
        pol = Policy(m, tf, reuse=cfg)
        pol.infer(raw)
        assert pol.infer(brighter)[1].plan != "none", cfg
        assert pol.infer(brighter)[1].plan == "none", cfg  # the same frame again is reused
    pol = Policy(m, tf, reuse=ReuseConfig(gate="crossmodal", threshold=1.0, state_threshold=1.0))
    pol.infer(raw)
    assert not pol.infer({**raw, "observation/state": raw["observation/state"] * 1.0001})[1].reused


def test_unsynchronized_modes_do_mix_and_say_so():
    m, tf = model_and_tf("pi05")
    rng = np.random.default_rng(1)
    for mode in ("vision_only", "state_only", "layer_wise", "partial"):
        pol = Policy(m, tf, reuse=ReuseConfig(gate="always", mode=mode))
        raw = raw_obs(rng, state=np.array([0.1, 0.2, 0.3, 0.4]))  # stays 3 digits per bin below
        pol.infer(raw)
        _, rec = pol.infer(nudge(raw, rng, 5, state_delta=0.3))
        assert rec.reused and rec.mixed, mode


# ---- identical frames with `always` compute the prefix once ----------------------------------


class Counter:
    """Counts vision-tower camera passes and prefix-LM token-layers through hooks on the model."""

    def __init__(self, model: Pi0Model):
        self.vision = 0
        self.token_layers = 0
        self.prefix_calls = 0
        self.model = model
        llm = model.llm
        depth = len(llm.layers)
        orig_full, orig_part = llm.prefix_kv, llm.prefix_kv_partial

        def full(x, *a, start=0, **k):
            self.token_layers += x.shape[1] * (depth - start)
            self.prefix_calls += 1
            return orig_full(x, *a, start=start, **k)

        def part(x, *a, **k):
            self.token_layers += x.shape[1] * depth
            self.prefix_calls += 1
            return orig_part(x, *a, **k)

        llm.prefix_kv, llm.prefix_kv_partial = full, part
        self._hook = model.vision.register_forward_hook(lambda mod, inp, out: self._saw(inp))

    def _saw(self, inp):
        self.vision += 1

    def close(self):
        del self.model.llm.prefix_kv, self.model.llm.prefix_kv_partial  # back to the class methods
        self._hook.remove()


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("mode", MODES)
def test_identical_frames_with_always_compute_the_prefix_once(variant, mode):
    m, tf = model_and_tf(variant)
    raw = raw_obs(np.random.default_rng(3))
    pol = Policy(m, tf, reuse=ReuseConfig(gate="always", mode=mode))
    c = Counter(m)
    try:
        recs = [pol.infer(raw)[1] for _ in range(5)]
    finally:
        c.close()
    assert c.prefix_calls == 1
    assert c.vision == len(m.cfg.cameras)
    assert [r.decision for r in recs] == ["refresh"] + ["reuse"] * 4
    assert all(r.plan == "none" for r in recs[1:])


# ---- partial with every patch changed == a full refresh --------------------------------------


@FAST
@given(variant=st.sampled_from(["pi0", "pi05"]), seed=st.integers(0, 2**16))
def test_partial_with_every_patch_changed_equals_full_refresh(variant, seed):
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(seed)
    pol = Policy(m, tf, reuse=ReuseConfig(gate="always", mode="partial", patch_threshold=0.99))
    pol.infer(raw_obs(rng))
    raw2 = raw_obs(rng)  # fresh noise images: every patch changes
    n = noise_for(m, seed)
    a, rec = pol.infer(raw2, n.clone())
    assert rec.cost["vision_cameras"] == 2 and rec.cost["lm_tokens"] == m.cfg.prefix_len
    assert np.array_equal(a, tf.actions(m.sample_actions(tf(raw2), n.clone()))[0])
    assert not rec.mixed and len(set(rec.snapshots)) == 1
    # Nothing was reused: a refresh in the record and the rate (it was counted as a partial reuse)
    assert (rec.decision, rec.mode) == ("refresh", "none") and pol.stats.reuses == 0


def test_period_clock_restarts_at_a_partial_plan_over_every_token():
    m, tf = model_and_tf("pi05")
    rng = np.random.default_rng(0)
    pol = Policy(m, tf, reuse=ReuseConfig(gate="period", period=3, mode="partial"))
    # Every frame new: each call the gate allows recomputes everything, so every call is a refresh
    # and the period's clock restarts at each (it ran from the last gate-made refresh only).
    recs = [pol.infer(raw_obs(rng))[1] for _ in range(6)]
    assert [r.decision for r in recs] == ["refresh"] * 6
    assert [r.signals["since_refresh"] for r in recs[1:]] == [1] * 5


# ---- each mode's recompute count is what it claims -------------------------------------------


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gate", ["always", "period", "siglip", "crossmodal", "phase"])
def test_each_mode_recomputes_what_it_claims(variant, mode, gate):
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(7)
    kw = dict(gate=gate, period=2, mode=mode, patch_threshold=0.99, threshold=0.999, state_threshold=0.99)
    if gate == "siglip":  # the signal itself runs the vision tower; a mode must not run it twice
        kw.update(gate="threshold", image_metric="siglip", threshold=0.99)
    pol = Policy(m, tf, reuse=ReuseConfig(**kw))
    c = Counter(m)
    try:
        raw = raw_obs(rng)
        claimed_v = claimed_t = 0
        for i in range(5):
            raw = nudge(raw, rng, pixels=3 * i, state_delta=0.2 * (i % 2))
            _, rec = pol.infer(raw)
            claimed_v += rec.cost["vision_cameras"]
            claimed_t += rec.cost["lm_token_layers"]
            assert c.vision == claimed_v and c.token_layers == claimed_t, (i, rec)
    finally:
        c.close()
    if gate in ("always", "period"):  # these gates do reuse here: the savings are real
        assert claimed_t < 5 * m.cfg.prefix_len * m.cfg.llm.depth


def test_mode_costs_relative_to_a_full_refresh():
    """What each mode costs on a reuse call where one camera and the state changed."""
    m, tf = model_and_tf("pi05")
    cfg = m.cfg
    p, depth, T = cfg.vision.num_patches, cfg.llm.depth, cfg.prefix_len
    rng = np.random.default_rng(11)
    raw = raw_obs(rng, state=np.array([0.1, 0.2, 0.3, 0.4]))  # every bin keeps 3 digits below
    nxt = nudge(raw, rng, pixels=2, state_delta=0.4)
    costs = {}
    for mode in MODES:
        # a patch with one flipped pixel keeps a pixel cosine ~0.99: count any change
        pol = Policy(m, tf, reuse=ReuseConfig(gate="always", mode=mode, layer_split=1, patch_threshold=1.0))
        pol.infer(raw)
        costs[mode] = pol.infer(nxt)[1].cost
    prompt_valid = int(tf(nxt).token_mask.sum())
    assert costs["full"] == {"vision_cameras": 0, "lm_tokens": 0, "lm_token_layers": 0}
    assert costs["text_fixed"]["lm_tokens"] == 0
    assert costs["vision_only"] == {"vision_cameras": 0, "lm_tokens": prompt_valid, "lm_token_layers": prompt_valid * depth}
    assert costs["state_only"] == {"vision_cameras": 1, "lm_tokens": p, "lm_token_layers": p * depth}
    assert costs["layer_wise"] == {"vision_cameras": 1, "lm_tokens": T, "lm_token_layers": T * (depth - 1)}
    assert 0 < costs["partial"]["lm_tokens"] - prompt_valid <= 2
    assert costs["partial"]["vision_cameras"] == 1


# ---- any combination runs and keeps its records consistent ------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    variant=st.sampled_from(["pi0", "pi05"]),
    gate=st.sampled_from(["never", "always", "period", "threshold", "crossmodal", "phase"]),
    mode=st.sampled_from(MODES),
    metric=st.sampled_from(["raw", "patch", "siglip"]),
    sync=st.booleans(),
    max_age=st.one_of(st.none(), st.integers(1, 3)),
    events=st.lists(st.sampled_from(["same", "pixels", "state", "both", "prompt", "reset", "new"]), min_size=2, max_size=7),
)
def test_any_setting_runs_with_consistent_records(variant, gate, mode, metric, sync, max_age, events):
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(len(events))
    cfg = ReuseConfig(gate=gate, mode=mode, image_metric=metric, synchronized=sync, max_age_calls=max_age,
                      threshold=0.9 if metric == "patch" else 0.995, period=2, layer_split=1)
    pol = Policy(m, tf, reuse=cfg)
    raw = raw_obs(rng, state=np.array([0.1, -0.2, 0.3, 0.0]))
    pol.infer(raw)
    for ev in events:
        if ev in ("pixels", "both"):
            raw = nudge(raw, rng, pixels=20)
        if ev in ("state", "both"):
            raw = nudge(raw, rng, pixels=0, state_delta=float(rng.uniform(-0.3, 0.3)))
        if ev == "prompt":
            raw = {**raw, "prompt": "a different task"}
        if ev == "reset":
            pol.reset()
        if ev == "new":
            raw = raw_obs(rng)
        a, rec = pol.infer(raw)
        assert a.shape == (m.cfg.chunk_size, 4) and np.isfinite(a).all()
        assert rec.decision in ("refresh", "reuse") and len(rec.snapshots) == len(pol.runner.cache.spans)
        assert (rec.plan == "all") == (rec.mode == "none")
        if rec.plan == "none":
            assert rec.cost["lm_token_layers"] == 0
        if gate == "never":
            assert rec.plan == "all" and not rec.reused
        if sync:
            assert not rec.mixed
        if max_age is not None and rec.reused:
            assert rec.signals["age_calls"] <= max_age
    assert pol.stats.summary()["calls"] == len(events) + 1


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_patch_max_diff_catches_a_small_move_the_cosine_misses(variant):
    """One pixel of the base camera moves by 24 levels: the patch's cosine stays >= 0.99, so plain
    partial keeps its K/V; with patch_max_diff the patch counts as changed and is recomputed."""
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(3)
    raw = raw_obs(rng)
    raw["observation/image"] = np.full_like(raw["observation/image"], 200)
    moved = dict(raw, **{"observation/image": raw["observation/image"].copy()})
    moved["observation/image"][5, 5] += 24
    costs = {}
    for diff in (None, 0.1):
        pol = Policy(m, tf, reuse=ReuseConfig(gate="always", mode="partial", patch_max_diff=diff))
        pol.infer(raw)
        _, rec = pol.infer(dict(moved, **{"observation/wrist_image": raw["observation/wrist_image"]}))
        costs[diff] = rec.cost["vision_cameras"]
    assert costs == {None: 0, 0.1: 1}
    assert "d<=0.1" in ReuseConfig(gate="always", mode="partial", patch_max_diff=0.1).label()
    with pytest.raises(ValueError, match="patch_max_diff"):
        ReuseConfig(patch_max_diff=-1.0)


# ---- what the served cache holds, row by row ---------------------------------------------------


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("mode", MODES)
def test_synchronized_reuse_acts_as_the_plain_model_on_its_snapshot(variant, mode):
    """Content, not bookkeeping: every synchronized call's actions are the plain model's for the
    observation of the last refresh (K/V, and Pi0's suffix state, all from that one moment)."""
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(1)
    raw = raw_obs(rng, state=np.array([0.1, 0.2, 0.3, 0.4]))
    pol = ReusePolicy(m, ReuseConfig(gate="period", period=3, mode=mode, synchronized=True, patch_threshold=1.0))
    snapshot, reused = None, 0
    for i in range(8):
        if i % 3 != 2:  # pixels and state, the state alone, then the same frame again
            raw = nudge(raw, rng, pixels=2 * (i % 3 == 0), state_delta=0.05)
        obs, n = tf(raw), noise_for(m, i)
        a, rec = pol.infer(obs, n.clone())
        snapshot = obs if rec.plan == "all" else snapshot
        reused += rec.reused
        assert torch.equal(a, m.sample_actions(snapshot, n.clone())), (i, rec.plan)
    assert reused >= 2


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_serves_old_rows_where_it_reuses_and_fresh_ones_where_it_recomputes(variant, mode):
    """Row by row against the old cache and a fresh encode of the new observation: a kept row is
    the old one at every layer; a recomputed row's layer-0 K/V (which depend on the row's own
    input and position only) are the fresh encode's. One step moves a few base-camera pixels and
    the state (Pi0.5: its digits, same token count)."""
    m, tf = model_and_tf(variant)
    cfg, rng = m.cfg, np.random.default_rng(4)
    raw = raw_obs(rng, state=np.array([0.1, 0.2, 0.3, 0.4]))
    nxt = nudge(raw, rng, pixels=3, state_delta=0.3)
    pol = ReusePolicy(m, ReuseConfig(gate="always", mode=mode, patch_threshold=1.0))
    pol.infer(tf(raw), noise_for(m, 0))
    old = pol.cache
    rec = pol.infer(tf(nxt), noise_for(m, 1))[1]
    new, fresh = pol.cache, m.encode_prefix(tf(nxt))
    p, t0, T = cfg.vision.num_patches, len(cfg.cameras) * cfg.vision.num_patches, cfg.prefix_len
    moved = (patchify(tf(nxt).images["base"], 16) != patchify(tf(raw).images["base"], 16)).any(-1)[0]
    assert 0 < int(moved.sum()) < p
    prompt = torch.zeros(T, dtype=torch.bool)
    prompt[t0:] = True
    recomputed = {  # the rows each mode claims to recompute here
        "full": torch.zeros(T, dtype=torch.bool), "text_fixed": torch.zeros(T, dtype=torch.bool),
        "vision_only": prompt if cfg.state_in_prompt else torch.zeros(T, dtype=torch.bool),
        "state_only": torch.cat([torch.ones(p, dtype=torch.bool), torch.zeros(T - p, dtype=torch.bool)]),
        "partial": torch.cat([moved, torch.zeros(p, dtype=torch.bool), prompt[2 * p :]]),
    }
    valid = new.mask[0]
    if mode == "layer_wise":  # layers < split are the old ones for every row, the rest are recomputed
        s = pol.split
        assert torch.equal(new.k[:s], old.k[:s]) and torch.equal(new.v[:s], old.v[:s])
        assert not torch.equal(new.k[s:, 0, valid], old.k[s:, 0, valid])
        return
    rows = recomputed[mode] & valid
    kept = ~recomputed[mode] & valid
    assert rec.cost["lm_tokens"] == int(rows.sum())
    assert torch.equal(new.k[:, 0, kept], old.k[:, 0, kept]) and torch.equal(new.v[:, 0, kept], old.v[:, 0, kept])
    torch.testing.assert_close(new.k[0, 0, rows], fresh.k[0, 0, rows], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(new.v[0, 0, rows], fresh.v[0, 0, rows], atol=1e-6, rtol=1e-6)
    changed = rows & ~(old.k[0, 0] == fresh.k[0, 0]).all(-1).all(-1)  # rows whose input did change
    assert bool(changed.any()) == bool(rows.any())


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_layer_wise_cameras_back_at_the_base_get_its_upper_layers_back(variant):
    """Cameras are compared with the base, the upper layers hold the last update's embeddings: a
    camera back at the base's pixels must not keep the moved frame's upper layers ("nothing
    changed" since the base is not nothing changed since the last update)."""
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(2)
    raw = raw_obs(rng, state=np.array([0.1, 0.2, 0.3, 0.4]))
    pol = ReusePolicy(m, ReuseConfig(gate="always", mode="layer_wise"))
    recs = [pol.infer(tf(r), noise_for(m, i))[1] for i, r in enumerate([raw, nudge(raw, rng, 30), raw])]
    plans = [r.plan for r in recs]
    base = m.encode_prefix(tf(raw))
    assert plans[:2] == ["all", "layers"] and plans[2] != "none"
    assert [r.mixed for r in recs] == [False, True, False]  # back at the base: one observation's K/V again
    torch.testing.assert_close(pol.cache.k, base.k, atol=1e-5, rtol=1e-5)  # h - e + e: the base's, up to rounding
    torch.testing.assert_close(pol.cache.v, base.v, atol=1e-5, rtol=1e-5)
    assert pol.infer(tf(raw), noise_for(m, 3))[1].plan == "none"  # now nothing to recompute


def test_layer_wise_with_new_state_digits_is_mixed():
    """Pi0.5's state digits changed alone: the upper layers are recomputed with the new prompt over
    the base's lower layers, which is a mix of two observations, also once the cameras are back
    at the base's pixels with the new state kept (the record said one observation's)."""
    m, tf = model_and_tf("pi05")
    rng = np.random.default_rng(2)
    raw = raw_obs(rng, state=np.array([0.1, 0.2, 0.3, 0.4]))
    new_state = {**raw, "observation/state": raw["observation/state"] + 0.05}
    pol = ReusePolicy(m, ReuseConfig(gate="always", mode="layer_wise"))
    frames = [raw, new_state, nudge(new_state, rng, 30), new_state, raw]
    recs = [pol.infer(tf(r), noise_for(m, i))[1] for i, r in enumerate(frames)]
    assert [r.plan for r in recs] == ["all", "layers", "layers", "layers", "layers"]
    assert [r.mixed for r in recs] == [False, True, True, True, False]


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_layer_wise_repeated_moved_frame_reuses_the_upper_layers_it_holds(variant):
    """A moved frame seen again (the robot holding still after it moved) finds its own upper layers
    in the cache: nothing to recompute, and the cache is what recomputing would give. Another
    moved frame, or a second camera moving too, is recomputed."""
    m, tf = model_and_tf(variant)
    rng = np.random.default_rng(3)
    raw = raw_obs(rng, state=np.array([0.1, 0.2, 0.3, 0.4]))
    moved, other = nudge(raw, rng, 30), nudge(raw, rng, 30)
    pol = ReusePolicy(m, ReuseConfig(gate="always", mode="layer_wise"))
    ref = ReusePolicy(m, ReuseConfig(gate="always", mode="layer_wise"))
    for i, r in enumerate([raw, moved]):
        pol.infer(tf(r), noise_for(m, i))
        ref.infer(tf(r), noise_for(m, i))
    held = pol.cache
    rec = pol.infer(tf(moved), noise_for(m, 2))[1]
    assert (rec.plan, rec.decision, rec.mixed, rec.cost["lm_tokens"]) == ("none", "reuse", True, 0)
    assert pol.cache is held
    assert ref.infer(tf(other), noise_for(m, 2))[1].plan == "layers"  # other pixels: recomputed
    both = {**moved, "observation/wrist_image": 255 - raw["observation/wrist_image"]}
    assert pol.infer(tf(both), noise_for(m, 3))[1].plan == "layers"  # the wrist camera moved too
    assert pol.infer(tf(moved), noise_for(m, 4))[1].plan == "layers"  # wrist back: upper layers redone
    torch.testing.assert_close(pol.cache.k, held.k, atol=1e-5, rtol=1e-5)
    assert pol.infer(tf(moved), noise_for(m, 5))[1].plan == "none"


# ---- host bookkeeping: the plans compare CPU copies, equal to the cache's ---------------------


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fast", [False, True])
def test_host_prefix_is_the_caches_and_plans_from_it_match_the_device_plans(variant, mode, fast, monkeypatch):
    """The policy's HostPrefix (the cache's tokens, validity and positions, made from the
    observations' host copies, which its plans compare instead of device tensors) equals the
    cache's after every call, and the calls are those of a policy without it (device plans)."""
    from kvreuse.model.fast import FastPi0
    from kvreuse.reuse import policy as policy_mod

    m, tf = model_and_tf(variant)
    model = FastPi0(m) if fast else m
    rng = np.random.default_rng(5)
    raw = raw_obs(rng)
    stream = [raw, nudge(raw, rng, 3), nudge(raw, rng, 3, state_delta=0.4), nudge(raw, rng, 0, state_delta=0.9),
              raw, dict(raw, prompt="open the drawer"), nudge(raw, rng, 2)]
    host = ReusePolicy(model, ReuseConfig(gate="always", mode=mode))
    dev = ReusePolicy(model, ReuseConfig(gate="always", mode=mode))
    plans = set()
    for i, r in enumerate(stream):
        obs, noise = tf(r), noise_for(m, i)
        a, ra = host.infer(obs, noise.clone())
        with monkeypatch.context() as mp:
            mp.setattr(policy_mod, "host_prefix", lambda *a, **kw: None)
            b, rb = dev.infer(obs, noise.clone())
        assert torch.equal(a, b), i
        assert (ra.plan, ra.cost, ra.reason, ra.mixed) == (rb.plan, rb.cost, rb.reason, rb.mixed), i
        h, c = host._host, host.cache
        assert torch.equal(h.tokens, c.tokens) and torch.equal(h.mask, c.mask), i
        assert torch.equal(h.positions, c.positions), i
        assert dev._host is None
        plans.add(ra.plan)
    # Pi0's prompt never changes here (its state is not in it): vision_only has nothing to recompute.
    recomputes = mode not in ("full", "text_fixed") and (variant, mode) != ("pi0", "vision_only")
    assert "all" in plans and bool(plans & {"tokens", "layers"}) == recomputes


@pytest.mark.parametrize("mode", ["partial", "state_only", "layer_wise"])
@pytest.mark.parametrize("synchronized", [False, True])
def test_moved_cameras_vision_is_queued_before_the_plan(mode, synchronized, monkeypatch):
    """Partial and state-only reuse queue the moved cameras' vision pass as soon as the signals
    name them, before the plan is made on the host; once per call, the plan's own vision call
    reusing it. Not where the plan may become a refresh (layer-wise, synchronized)."""
    from kvreuse.reuse import policy as policy_mod

    m, tf = model_and_tf("pi05")
    events = []
    real_plan, real_embed = policy_mod.plan_reuse, m.embed_images
    monkeypatch.setattr(policy_mod, "plan_reuse", lambda *a, **kw: events.append("plan") or real_plan(*a, **kw))
    monkeypatch.setattr(m, "embed_images",
                        lambda images: events.append(("vision", tuple(images))) or real_embed(images))
    rng = np.random.default_rng(11)
    raw = raw_obs(rng)
    pol = ReusePolicy(m, ReuseConfig(gate="always", mode=mode, synchronized=synchronized))
    pol.infer(tf(raw), noise_for(m, 0))
    events.clear()
    _, rec = pol.infer(tf(nudge(raw, rng, pixels=3)), noise_for(m, 1))
    early = mode != "layer_wise" and not synchronized
    assert events[:2] == ([("vision", m.cfg.cameras[:1]), "plan"] if early else ["plan", events[1]])
    assert sum(isinstance(e, tuple) for e in events) == 1  # one pass: the moved camera, or all on a refresh
    assert rec.cost["vision_cameras"] == (2 if rec.plan == "all" else 1)
