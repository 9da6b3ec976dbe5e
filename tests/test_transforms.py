"""Transforms: image preprocessing, normalization, the robot transform and each bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvreuse.model import preset
from kvreuse.model.tokenizer import ByteTokenizer
from kvreuse.transforms.images import preprocess_image, resize_with_pad
from kvreuse.transforms.normalize import (
    NormStats,
    Stats,
    normalize,
    pad_to,
    unnormalize,
)
from kvreuse.transforms.robot import RobotSpec, RobotTransform, robot_spec

RNG = np.random.default_rng(0)


def stats(dim=4) -> NormStats:
    return NormStats(Stats.of(RNG.normal(1.0, 2.0, size=(200, dim))), Stats.of(RNG.normal(-1.0, 0.5, size=(200, dim))))


@pytest.fixture(params=["tiny-pi0", "tiny-pi05"])
def tf(request):
    return RobotTransform(preset(request.param), ByteTokenizer(), stats(), robot_spec("metaworld"))


def raw(b=None, h=96, w=128):
    shape = (h, w, 3) if b is None else (b, h, w, 3)
    return {
        "observation/image": RNG.integers(0, 256, shape, dtype=np.uint8),
        "observation/wrist_image": RNG.integers(0, 256, shape, dtype=np.uint8),
        "observation/state": RNG.normal(size=4 if b is None else (b, 4)),
        "prompt": "reach the goal",
    }


# ---- images -------------------------------------------------------------------------------------


def test_uint8_and_float_images_agree():
    img = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = preprocess_image(img, 64)  # the image's own size: no resize
    b = preprocess_image(img.astype(np.float32) / 255.0, 64)
    assert a.shape == (1, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Channels-first input gives the same tensor.
    torch.testing.assert_close(preprocess_image(np.ascontiguousarray(img.transpose(2, 0, 1)), 64), a)


def test_resize_with_pad_keeps_aspect_and_pads_black():
    x = torch.ones(1, 3, 50, 100) * 0.5
    y = resize_with_pad(x, 224)
    assert y.shape == (1, 3, 224, 224)
    assert (y[:, :, :56] == -1).all() and (y[:, :, -56:] == -1).all()  # 112 rows of image, centred
    torch.testing.assert_close(y[:, :, 56:168], torch.full((1, 3, 112, 224), 0.5))
    assert resize_with_pad(torch.zeros(2, 3, 224, 224), 224).shape == (2, 3, 224, 224)
    # openpi / lerobot truncate the resized size (255 x 333 -> 171.5 rows: 171; rounding gave 172
    # rows, the image stretched by one and its padding shifted)
    y = resize_with_pad(torch.ones(1, 3, 255, 333) * 0.5, 224)
    rows = (y[0, 0, :, 112] > -1).nonzero().squeeze(-1)
    assert (len(rows), int(rows[0])) == (171, 26)


def test_flip180():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[0, 0] = 255
    out = preprocess_image(img, 32, flip180=True)
    assert out[0, :, -1, -1].tolist() == [1.0, 1.0, 1.0] and out[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]


@pytest.mark.parametrize(
    "img,match",
    [
        (np.zeros((32, 32), dtype=np.uint8), "expected \\(H, W, 3\\)"),
        (np.zeros((1, 2, 32, 32, 3), dtype=np.uint8), "expected \\(H, W, 3\\)"),
        (np.zeros((32, 32, 4), dtype=np.uint8), r"expected 3 color channels, got shape \(32, 32, 4\)$"),
        (np.zeros((32, 32, 3), dtype=np.int32), "expected uint8 or float pixels"),
        (np.zeros((32, 32, 3), dtype=bool), "expected uint8 or float pixels"),
        (np.full((32, 32, 3), np.nan, dtype=np.float32), "NaN or inf"),
    ],
)
def test_bad_images(img, match):
    with pytest.raises(ValueError, match=match):
        preprocess_image(img, 32, name="observation/image")



@pytest.mark.parametrize("size", [64, 96])  # the model's own size (no resize, no clamp there) and another
def test_float_images_must_be_in_unit_range(size):
    img = RNG.uniform(0, 255, (size, size, 3)).astype(np.float32)  # 0-255 data sent as float
    with pytest.raises(ValueError, match=r"observation/image: float pixels must be in \[0, 1\], got .*uint8"):
        preprocess_image(img, 64, name="observation/image")
    with pytest.raises(ValueError, match=r"float pixels must be in \[0, 1\]"):
        preprocess_image(-img / 255.0, 64)
    # Rounding just past the range is accepted and clamped, at every size.
    out = preprocess_image(np.full((size, size, 3), 1.0005, np.float32), 64)
    assert out.max() <= 1.0 and out.min() >= -1.0


@pytest.mark.parametrize(
    "img,match",
    [
        ("abc", r"expected uint8 or float pixels, got str"),
        (np.full((8, 8, 3), "a"), r"expected uint8 or float pixels, got dtype <U1"),
        (np.full((8, 8, 3), b"a"), r"expected uint8 or float pixels, got dtype \|S1"),
        (np.zeros((8, 8, 3), "M8[s]"), "expected uint8 or float pixels, got dtype datetime64"),
        (np.zeros((8, 8, 3), "m8[s]"), "expected uint8 or float pixels, got dtype timedelta64"),
        (np.zeros((8, 8, 3), ">u2"), "expected uint8 or float pixels, got dtype >u2"),
        ([[1, 2], [3]], "expected an array of pixels, got a ragged list"),
        (np.zeros((0, 0, 3), np.uint8), r"expected a non-empty image, got shape \(0, 0, 3\)"),
        (np.zeros((64, 0, 3), np.float32), "expected a non-empty image"),
    ],
    ids=["str", "U", "S", "M", "m", "big-endian u2", "ragged", "0x0", "64x0"],
)
def test_non_pixel_images_raise_value_error(img, match):
    with pytest.raises(ValueError, match="observation/image: " + match):
        preprocess_image(img, 64, name="observation/image")


@pytest.mark.parametrize("dt", ["f2", "f4", "f8"])
@pytest.mark.parametrize("shape", [(64, 64, 3), (48, 80, 3)])  # at the model's size and resized
def test_big_endian_images_equal_native_ones(dt, shape):
    img = RNG.uniform(0, 1, shape)
    assert torch.equal(preprocess_image(img.astype(">" + dt), 64), preprocess_image(img.astype("<" + dt), 64))


# ---- normalization ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["meanstd", "quantile"])
def test_normalize_round_trip(mode):
    s = stats().state
    x = RNG.normal(1.0, 2.0, size=(10, 4))
    n = normalize(x, s, mode)
    np.testing.assert_allclose(unnormalize(n, s, mode), x, atol=1e-9)
    if mode == "quantile":
        inside = normalize(np.stack([s.q01, s.q99]), s, mode)
        np.testing.assert_allclose(inside, [[-1] * 4, [1] * 4], atol=1e-5)


@pytest.mark.parametrize("variant", ["tiny-pi0", "tiny-pi05"])
@pytest.mark.parametrize("state_mode,action_mode", [("meanstd", "quantile"), ("quantile", "meanstd")])
def test_state_and_actions_each_take_their_own_mode(variant, state_mode, action_mode):
    """lerobot's normalization_mapping sets STATE and ACTION apart (a Pi0.5 trained with MEAN_STD,
    or one side only): the state is normalized, the actions unnormalized, each with its own mode,
    the modes coming with the stats (the one way to set one side); lerobot's formulas by hand."""
    st = stats()
    s, a = st.state, st.actions
    by_hand = {  # lerobot 0.6.1 NormalizerProcessorStep / UnnormalizerProcessorStep, eps 1e-8
        "meanstd": (lambda x, q: (x - q.mean) / (q.std + 1e-8), lambda y, q: y * q.std + q.mean),
        "quantile": (lambda x, q: 2 * (x - q.q01) / (q.q99 - q.q01) - 1,
                     lambda y, q: (y + 1) * (q.q99 - q.q01) / 2 + q.q01),
    }
    # kvreuse keeps openpi's eps (1e-6, in the inverse too): within |y| * 1e-6 of lerobot's actions
    cfg = preset(variant)
    carried = NormStats(s, a, state_mode=state_mode, actions_mode=action_mode)
    tf, r = RobotTransform(cfg, ByteTokenizer(), carried, robot_spec("metaworld")), raw()
    np.testing.assert_allclose(tf(r).state[0, :4].numpy(), by_hand[state_mode][0](r["observation/state"], s),
                               rtol=1e-5, atol=1e-6)
    out = torch.randn(1, cfg.chunk_size, cfg.max_action_dim)
    np.testing.assert_allclose(tf.actions(out), by_hand[action_mode][1](out[..., :4].numpy(), a),
                               rtol=1e-5, atol=1e-6 * float(out.abs().max()))
    np.testing.assert_allclose(tf.normalize_actions(tf.actions(out))[..., :4], out[..., :4], atol=1e-5)
    # norm_mode still sets both sides, over what the stats carry
    both = RobotTransform(cfg, ByteTokenizer(), carried, robot_spec("metaworld"), norm_mode=action_mode)
    assert (both.state_mode, both.action_mode) == (action_mode, action_mode)
    with pytest.raises(ValueError, match=r"^stats state_mode 'MEAN_STD': expected one of \(.meanstd., .quantile.\)$"):
        RobotTransform(cfg, ByteTokenizer(), NormStats(s, a, state_mode="MEAN_STD"), robot_spec("metaworld"))
    with pytest.raises(TypeError, match="state_mode"):  # no second way to set a side's mode
        RobotTransform(cfg, ByteTokenizer(), st, robot_spec("metaworld"), state_mode=state_mode)


def test_pad_to():
    assert pad_to(np.ones((2, 3)), 5).tolist() == [[1, 1, 1, 0, 0]] * 2
    with pytest.raises(ValueError, match="6 dims does not fit the model's 5"):
        pad_to(np.ones(6), 5)


# ---- robot transform ----------------------------------------------------------------------------


def test_good_observation(tf):
    cfg = tf.cfg
    obs = tf(raw())
    assert obs.batch_size == 1 and obs.state.shape == (1, cfg.max_state_dim)
    assert (obs.state[:, 4:] == 0).all()
    for cam in cfg.cameras:
        assert obs.images[cam].shape == (1, 3, cfg.vision.image_size, cfg.vision.image_size)
        assert bool(obs.image_masks[cam].all())
    assert obs.tokens.shape == (1, cfg.max_token_len)
    assert bool(obs.state_token_mask.any()) == cfg.state_in_prompt
    batched = tf(raw(b=3))
    assert batched.batch_size == 3 and batched.prompt == ("reach the goal",) * 3


def test_actions_sliced_and_unnormalized(tf):
    cfg = tf.cfg
    out = torch.zeros(2, cfg.chunk_size, cfg.max_action_dim)
    a = tf.actions(out)
    assert a.shape == (2, cfg.chunk_size, 4)
    back = tf.normalize_actions(a)
    assert back.shape == (2, cfg.chunk_size, cfg.max_action_dim)
    np.testing.assert_allclose(back, 0.0, atol=1e-5)


def test_model_camera_missing_from_robot_is_masked():
    cfg = preset("tiny-pi0")
    spec = RobotSpec("one-cam", (("observation/image", "base"),), state_dim=4, action_dim=4)
    obs = RobotTransform(cfg, ByteTokenizer(), None, spec)({k: v for k, v in raw().items() if k != "observation/wrist_image"})
    assert not bool(obs.image_masks["wrist"].any()) and (obs.images["wrist"] == -1).all()


def test_images_are_converted_on_the_target_device():
    """The raw pixels move to the device and are converted there (uint8 crosses the bus, not
    float32); on the CPU the values are the host path's exactly. ("meta" stands in for a GPU.)"""
    cfg = preset("tiny-pi0")
    spec = RobotSpec("one-cam", (("observation/image", "base"),), state_dim=4, action_dim=4,
                     flip180=("observation/image",))
    r = {k: v for k, v in raw().items() if k != "observation/wrist_image"}
    tf = RobotTransform(cfg, ByteTokenizer(), None, spec)
    host = tf(r)
    assert torch.equal(tf(r, device="cpu").images["base"], host.images["base"])
    moved = []
    to = torch.Tensor.to

    def spy(t, *a, **kw):
        out = to(t, *a, **kw)
        if out.device != t.device:
            moved.append(t.dtype)
        return out

    torch.Tensor.to = spy
    try:
        x = preprocess_image(r["observation/image"], cfg.vision.image_size, True, device="meta")
    finally:
        torch.Tensor.to = to
    assert moved == [torch.uint8] and x.device.type == "meta" and x.dtype == torch.float32
    assert x.shape == host.images["base"].shape
    obs = tf(r, device="meta")
    assert {v.device.type for v in obs.images.values()} == {"meta"}  # the absent wrist camera's black image too


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_state(tf, bad):
    r = raw()
    r["observation/state"][1] = float(bad)
    with pytest.raises(ValueError, match="observation/state: contains NaN or inf"):
        tf(r)


def test_wrong_state_shape(tf):
    r = raw()
    r["observation/state"] = np.zeros(5)
    with pytest.raises(ValueError, match=r"observation/state: expected \(4,\) or \(B, 4\)"):
        tf(r)


def test_missing_camera(tf):
    r = raw()
    del r["observation/wrist_image"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['observation/wrist_image'\]"):
        tf(r)


def test_unknown_camera(tf):
    r = raw()
    r["observation/side_image"] = r["observation/image"]
    with pytest.raises(ValueError, match=r"unknown camera key\(s\) \['observation/side_image'\]"):
        tf(r)


def test_batch_size_mismatch(tf):
    r = raw(b=2)
    r["observation/state"] = r["observation/state"][:1]
    with pytest.raises(ValueError, match="batch size 2 does not match the state's 1"):
        tf(r)
    r = raw(b=2)
    r["prompt"] = ["a", "b", "c"]
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        tf(r)


def test_bad_image_through_the_transform(tf):
    r = raw()
    r["observation/image"] = r["observation/image"].astype(np.int64)
    with pytest.raises(ValueError, match="observation/image: expected uint8 or float pixels"):
        tf(r)
    r = raw()
    r["observation/wrist_image"] = r["observation/wrist_image"][..., :2]
    with pytest.raises(ValueError, match="observation/wrist_image: expected 3 color channels"):
        tf(r)



@pytest.mark.parametrize(
    "key,value,match",
    [
        ("prompt", 5, "prompt: expected a string or a list of strings, got int"),
        ("prompt", None, "prompt: expected a string or a list of strings, got NoneType"),
        ("prompt", [1], "prompt: expected a string or a list of strings, got list"),
        ("observation/state", {"x": 1}, "observation/state: expected an array of numbers, got dict"),
        ("observation/state", "abcd", "observation/state: expected an array of numbers, got str"),
        ("observation/state", [[1, 2], [3]], "observation/state: expected an array of numbers, got a ragged list"),
        ("observation/image", "abcd", "observation/image: expected uint8 or float pixels, got str"),
        ("observation/wrist_image", np.zeros((0, 0, 3), np.uint8), "observation/wrist_image: expected a non-empty"),
        ("prompt", "", "prompt: empty"),
        ("prompt", " \n", "prompt: empty"),
        ("observation/state", np.zeros((0, 4)), r"observation/state: empty batch \(shape \(0, 4\)\)"),
        ("observation/state", np.full(4, 1e300), "observation/state: out of range"),
    ],
    ids=["prompt int", "prompt None", "prompt list of int", "state dict", "state str", "state ragged", "image str",
         "image 0x0", "prompt empty", "prompt blank", "state empty batch", "state overflows"],
)
def test_client_mistakes_raise_value_error_naming_the_key(tf, key, value, match):
    r = raw()
    r[key] = value
    with pytest.raises(ValueError, match=match):
        tf(r)


def test_big_endian_state_and_images_are_accepted(tf):
    r = raw()
    r["observation/image"] = RNG.uniform(0, 1, (96, 128, 3)).astype(np.float32)
    swapped = {**r, "observation/image": r["observation/image"].astype(">f4"),
               "observation/state": r["observation/state"].astype(">f8")}
    a, b = tf(r), tf(swapped)
    assert all(torch.equal(a.images[c], b.images[c]) for c in a.images) and torch.equal(a.state, b.state)


def test_prompt_is_required_unless_a_default_is_set():
    cfg = preset("tiny-pi0")
    r = raw()
    del r["prompt"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['prompt'\]"):
        RobotTransform(cfg, ByteTokenizer(), None, robot_spec("metaworld"))(r)
    with_default = RobotTransform(cfg, ByteTokenizer(), None, robot_spec("metaworld"), default_prompt="reach")
    assert with_default(r).prompt == ("reach",)
    assert with_default({**r, "prompt": "push"}).prompt == ("push",)  # a given prompt wins


def test_robot_to_unknown_model_camera_and_unknown_robot():
    spec = RobotSpec("x", (("observation/image", "top"),), state_dim=4, action_dim=4)
    with pytest.raises(ValueError, match=r"camera\(s\) \['top'\] the model does not have"):
        RobotTransform(preset("tiny-pi0"), ByteTokenizer(), None, spec)
    with pytest.raises(ValueError, match="unknown robot 'nope'"):
        robot_spec("nope")


def test_masks_moved_by_to_are_read_back_from_their_host_copy():
    """Observation.to keeps the CPU masks it moved (token, state-token and camera masks), so the
    model and the reuse policy read them without touching the device (meta here stands in for a GPU: reading it back would fail); a mask changed since is
    read from the device instead."""
    from kvreuse.bench import synthetic_obs

    cfg = preset("tiny-pi05")
    cpu = synthetic_obs(cfg, 2, "cpu", torch.Generator().manual_seed(0))
    dev = cpu.to("meta")
    assert dev.token_mask.is_meta
    names = ("token_mask", "state_token_mask", "tokens", *(f"image_masks/{c}" for c in cpu.image_masks))
    for name in names:
        assert dev.on_host(name) and dev.host_mask(name) is cpu.mask(name)
    first = next(iter(dev.images))
    moved = dev.with_images({first: dev.images[first].clone()})  # other pixels, the same masks
    assert moved.images[first] is not dev.images[first] and all(moved.on_host(n) for n in names)
    assert cpu.on_host("token_mask") and cpu.host_mask("token_mask") is cpu.token_mask  # already on the host
    dev.token_mask[:, 0] = True  # written in place after the move: the host copy is stale
    assert not dev.on_host("token_mask")
    with pytest.raises(NotImplementedError):  # so it is read from the "device"
        dev.host_mask("token_mask")
    cpu.state_token_mask[:, 0] = True  # the source changed
    with pytest.raises(NotImplementedError):
        dev.host_mask("state_token_mask")
    cam = next(iter(cpu.image_masks))
    dev.image_masks[cam] = dev.image_masks[cam].clone()  # another tensor under the camera's name
    assert not dev.on_host(f"image_masks/{cam}")


def test_non_finite_actions_are_never_returned(tf):
    out = torch.zeros(1, tf.cfg.chunk_size, tf.cfg.max_action_dim)
    assert tf.actions(out).shape == (1, tf.cfg.chunk_size, 4)
    out[0, 3, 1] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite actions"):
        tf.actions(out)
