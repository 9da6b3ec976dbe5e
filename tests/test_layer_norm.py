"""The fused residual add + LayerNorm kernel (model/layer_norm.py) against torch, through Triton's
CPU interpreter (set up as in test_kernels.py), and the vision tower that uses it."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # tests/conftest.py does the same when there is no GPU

import pytest
import torch

triton = pytest.importorskip("triton")
if type(triton.language.zeros).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

from kvreuse.model.layer_norm import add_layer_norm, add_layer_norm_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_y", [True, False])
def test_matches_add_then_layer_norm(dtype, with_y):
    g = torch.Generator().manual_seed(0)
    n = 72  # not a power of two: the row block is masked, as at SigLIP's 1152
    x = (torch.randn(2, 5, n, generator=g) * 3 + 1).to(dtype)
    y = torch.randn(2, 5, n, generator=g).to(dtype) if with_y else None
    w, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    s, h = add_layer_norm(x, y, w, b, 1e-6)
    s_ref, h_ref = add_layer_norm_reference(x, y, w, b, 1e-6)
    assert s.dtype == h.dtype == dtype and s.shape == h.shape == x.shape
    # The sum is rounded once, like the eager add (the interpreter truncates to bf16 where the GPU
    # rounds to nearest: within 1 ulp).
    torch.testing.assert_close(s.float(), s_ref.float(), atol=0, rtol=0 if dtype == torch.float32 else 2**-7)
    if not with_y:
        assert s is x  # nothing to add: no copy
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(h.float(), h_ref.float(), atol=tol, rtol=tol)


def test_bad_inputs():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="y must match"):
        add_layer_norm(x, torch.zeros(3, 7), torch.ones(8), torch.zeros(8), 1e-6)
    with pytest.raises(ValueError, match="weight and bias"):
        add_layer_norm(x, None, torch.ones(7), torch.zeros(8), 1e-6)


@torch.no_grad()
def test_vision_tower_with_the_fused_kernel_matches_eager():
    from kvreuse.bench import build_random, rel_err, synthetic_obs
    from kvreuse.model import preset
    from kvreuse.model.fast import FastPi0

    cfg = preset("tiny-pi0")
    model = build_random(cfg, "cpu", dtype=torch.float32, seed=0)
    obs = synthetic_obs(cfg, 2, "cpu", torch.Generator().manual_seed(1))
    images = obs.images[cfg.cameras[0]]
    ref = model.embed_image(images)
    fused = FastPi0(model, fused_layer_norm=True)
    assert fused.fused_ln and not FastPi0(model).fused_ln  # off by default off the GPU
    assert rel_err(fused.embed_image(images), ref) < 1e-5
