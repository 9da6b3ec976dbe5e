"""Model behaviour on the tiny presets (CPU): shapes, determinism, the prefix/suffix split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvreuse.model import Pi0Model, preset
from kvreuse.model.fast import FastPi0
from kvreuse.model.tokenizer import ByteTokenizer, tokenize_prompts
from kvreuse.observation import Observation

torch.set_num_threads(1)
B = 2


def config_named(name: str):
    """A preset by name; "/no-state": a Pi0.5 without its state (openpi's discrete_state_input=False)."""
    base, _, flag = name.partition("/")
    return preset(base, **({"discrete_state_input": False} if flag == "no-state" else {}))


@pytest.fixture(scope="module", params=["tiny-pi0", "tiny-pi05", "tiny-pi05/no-state"])
def model(request):
    torch.manual_seed(0)
    m = Pi0Model(config_named(request.param)).eval()
    # Zero-initialised norms would hide bugs (a (1 + 0) scale, an adaRMS layer that outputs 0).
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 or "dense" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return m


def make_obs(cfg, seed=0, state=None, prompt="pick up the red block") -> Observation:
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    images = {c: torch.rand(B, 3, size, size, generator=g) * 2 - 1 for c in cfg.cameras}
    masks = {c: torch.ones(B, dtype=torch.bool) for c in cfg.cameras}
    masks[cfg.cameras[-1]][1] = False  # one camera missing in row 1
    st = torch.rand(B, cfg.state_dim, generator=g) * 2 - 1 if state is None else state
    toks = tokenize_prompts(cfg, ByteTokenizer(), [prompt, prompt + " now"], st.numpy() if cfg.state_in_prompt else None)
    padded = torch.zeros(B, cfg.max_state_dim)
    padded[:, : cfg.state_dim] = st
    return Observation(images, masks, padded, toks.tokens, toks.mask, toks.state_mask, (prompt, prompt + " now"))


def noise_for(cfg, seed=1):
    return torch.randn(B, cfg.chunk_size, cfg.max_action_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_output_shapes(model):
    cfg = model.cfg
    obs = make_obs(cfg)
    prefix = model.encode_prefix(obs)
    assert prefix.k.shape == (cfg.llm.depth, B, cfg.prefix_len, cfg.llm.num_kv_heads, cfg.llm.head_dim)
    assert prefix.v.shape == prefix.k.shape
    assert prefix.mask.shape == (B, cfg.prefix_len)
    # Row 1 lacks a camera: its patches are invalid, and so is the prompt padding.
    p = cfg.vision.num_patches
    assert int(prefix.num_valid[1]) == (len(cfg.cameras) - 1) * p + int(obs.token_mask[1].sum())
    spans = {s.name: s for s in prefix.spans}
    assert [spans[c].start for c in cfg.cameras] == [i * p for i in range(len(cfg.cameras))]
    if cfg.state_in_prompt:
        assert spans["state"].end == cfg.prefix_len
    actions = model.sample_actions(obs, noise_for(cfg))
    assert actions.shape == (B, cfg.chunk_size, cfg.max_action_dim)
    assert actions.dtype == torch.float32 and torch.isfinite(actions).all()


@torch.no_grad()
def test_same_noise_same_actions(model):
    obs = make_obs(model.cfg)
    a1 = model.sample_actions(obs, noise_for(model.cfg, 1))
    a2 = model.sample_actions(obs, noise_for(model.cfg, 1))
    a3 = model.sample_actions(obs, noise_for(model.cfg, 2))
    assert torch.equal(a1, a2)
    assert not torch.allclose(a1, a3)


@torch.no_grad()
def test_encode_prefix_plus_denoise_is_sample_actions(model):
    obs, noise = make_obs(model.cfg), noise_for(model.cfg)
    prefix = model.encode_prefix(obs)
    k0, v0 = prefix.k.clone(), prefix.v.clone()
    split = model.denoise(prefix, obs, noise)
    assert torch.equal(split, model.sample_actions(obs, noise))
    # denoise reads the cache and never writes it: one cache serves every step and later calls.
    assert torch.equal(prefix.k, k0) and torch.equal(prefix.v, v0)
    assert torch.equal(model.denoise(prefix, obs, noise), split)


@torch.no_grad()
def test_padded_prompt_tokens_do_not_change_actions(model):
    obs, noise = make_obs(model.cfg), noise_for(model.cfg)
    base = model.sample_actions(obs, noise)
    pad = ~obs.token_mask
    assert pad.any()
    junk = torch.randint(5, 250, obs.tokens.shape, generator=torch.Generator().manual_seed(3))
    changed = dataclasses.replace(obs, tokens=torch.where(pad, junk, obs.tokens))
    torch.testing.assert_close(model.sample_actions(changed, noise), base, atol=1e-6, rtol=0)
    # ...while a change under the mask does change them (the test can fail).
    first_valid = obs.tokens.clone()
    first_valid[:, 1] = (first_valid[:, 1] + 7) % 256 + 4
    moved = model.sample_actions(dataclasses.replace(obs, tokens=first_valid), noise)
    assert (moved - base).abs().max() > 1e-4


@torch.no_grad()
def test_missing_camera_pixels_do_not_change_actions(model):
    obs, noise = make_obs(model.cfg), noise_for(model.cfg)
    base = model.sample_actions(obs, noise)
    cam = model.cfg.cameras[-1]  # masked out in row 1
    imgs = dict(obs.images)
    imgs[cam] = imgs[cam].clone()
    imgs[cam][1] = -1.0
    out = model.sample_actions(dataclasses.replace(obs, images=imgs), noise)
    torch.testing.assert_close(out[1], base[1], atol=1e-6, rtol=0)
    # ...while the same change where the camera is present does change them (the test can fail).
    imgs[cam][0] = -1.0
    out = model.sample_actions(dataclasses.replace(obs, images=imgs), noise)
    assert (out[0] - base[0]).abs().max() > 1e-4


@torch.no_grad()
def test_prefix_does_not_depend_on_the_suffix(model):
    cfg = model.cfg
    obs = make_obs(cfg)
    p1 = model.encode_prefix(obs)
    # Same images and prompt tokens, different state vector, actions and noise.
    other = dataclasses.replace(obs, state=torch.randn_like(obs.state))
    p2 = model.encode_prefix(other)
    assert torch.equal(p1.k, p2.k) and torch.equal(p1.v, p2.v)
    n1, n2 = noise_for(cfg, 1), noise_for(cfg, 5)
    model.denoise(p1, obs, n1)
    model.denoise(p2, other, n2)
    assert torch.equal(p1.k, p2.k) and torch.equal(p1.v, p2.v)
    a1 = model.denoise(p1, obs, n1)
    if not cfg.state_token:  # Pi0.5: obs.state is not read at all, only its tokens (if any)
        assert torch.equal(a1, model.denoise(p1, other, n1))
    else:  # Pi0: the state token is in the suffix, so the actions move, the prefix does not
        assert not torch.allclose(a1, model.denoise(p1, other, n1))


@torch.no_grad()
def test_pi05_state_reaches_the_prefix_through_the_prompt():
    torch.manual_seed(0)
    m = Pi0Model(preset("tiny-pi05")).eval()
    cfg = m.cfg
    s1 = torch.full((B, cfg.state_dim), -0.5)
    s2 = torch.full((B, cfg.state_dim), 0.5)
    p1, p2 = m.encode_prefix(make_obs(cfg, state=s1)), m.encode_prefix(make_obs(cfg, state=s2))
    assert not torch.equal(p1.k, p2.k)


def test_loss_is_finite_and_trains(model):
    cfg = model.cfg
    obs = make_obs(cfg)
    actions = torch.randn(B, cfg.chunk_size, cfg.max_action_dim)
    t = torch.full((B,), 0.5)
    loss = model.loss(obs, actions, noise=noise_for(cfg), t=t)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}  # not the LM's unused top
    assert all(torch.isfinite(g).all() for g in grads.values())
    # the loss reaches the expert's output and, through the prefix K/V, the vision tower's first layer
    for name in ("action_out_proj.weight", "vision.patch_embed.weight"):
        assert name in grads and grads[name].abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def test_bad_observation_is_a_value_error(model):
    cfg = model.cfg
    obs = make_obs(cfg)
    with pytest.raises(ValueError, match="missing camera"):
        model.encode_prefix(dataclasses.replace(obs, images={cfg.cameras[0]: obs.images[cfg.cameras[0]]}))
    with pytest.raises(ValueError, match="tokens: expected length"):
        model.encode_prefix(dataclasses.replace(obs, tokens=obs.tokens[:, :-1]))
    small = {c: torch.zeros(B, 3, 8, 8) for c in cfg.cameras}
    with pytest.raises(ValueError, match=r"images\["):
        model.encode_prefix(dataclasses.replace(obs, images=small))
    cam = cfg.cameras[-1]  # parts of another batch than the state: Pi0.5 used to broadcast, Pi0 to fail deep inside
    for bad in (dict(state=obs.state[:1]), dict(images={**obs.images, cam: obs.images[cam][:1]}),
                dict(token_mask=obs.token_mask[:1])):
        with pytest.raises(ValueError, match=r"observation: state has batch \d+, but "):
            model.encode_prefix(dataclasses.replace(obs, **bad))
        with pytest.raises(ValueError, match=r"observation: state has batch"):
            FastPi0(model).encode_prefix(dataclasses.replace(obs, **bad))
    # uint8 0..255 images ran as floats of 0..255; float masks and a camera without a mask failed deep inside
    u8 = {c: ((x + 1) * 127.5).to(torch.uint8) for c, x in obs.images.items()}
    with pytest.raises(ValueError, match=r"images\[.*floating-point.*uint8"):
        model.encode_prefix(dataclasses.replace(obs, images=u8))
    with pytest.raises(ValueError, match="token_mask: expected a bool tensor"):
        model.encode_prefix(dataclasses.replace(obs, token_mask=obs.token_mask.float()))
    with pytest.raises(ValueError, match=f"no image_masks entry for camera.*{cam}"):
        masks = {c: m for c, m in obs.image_masks.items() if c != cam}
        model.encode_prefix(dataclasses.replace(obs, image_masks=masks))


@torch.no_grad()
@pytest.mark.parametrize("fast", [False, True])
def test_steps_must_be_a_positive_count(model, fast):
    """steps=0 ran the default 10 and a negative count returned the noise as actions."""
    m = FastPi0(model) if fast else model
    obs, noise = make_obs(model.cfg), noise_for(model.cfg)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="steps: expected a whole number >= 1"):
            m.sample_actions(obs, noise, steps=bad)
    default = m.sample_actions(obs, noise, steps=None)
    assert torch.equal(default, m.sample_actions(obs, noise, steps=model.cfg.num_steps))
    assert torch.equal(default, m.sample_actions(obs, noise, steps=np.int64(model.cfg.num_steps)))


@torch.no_grad()
def test_pi05_without_state_input_never_sees_the_state():
    """openpi's pi05_libero: no state tokens, no state span, a prefix and actions the state does not move."""
    torch.manual_seed(0)
    m = Pi0Model(config_named("tiny-pi05/no-state")).eval()
    cfg = m.cfg
    assert not cfg.state_in_prompt and not cfg.state_token and cfg.suffix_len == cfg.chunk_size
    o1, o2 = (make_obs(cfg, state=torch.full((B, cfg.state_dim), v)) for v in (-0.5, 0.5))
    assert not o1.state_token_mask.any() and torch.equal(o1.tokens, o2.tokens)
    p1, p2 = m.encode_prefix(o1), m.encode_prefix(o2)
    assert "state" not in {s.name for s in p1.spans}
    assert torch.equal(p1.k, p2.k)
    assert torch.equal(m.denoise(p1, o1, noise_for(cfg)), m.denoise(p2, o2, noise_for(cfg)))
