"""`kvreuse demo`: a tiny random model on a synthetic observation (smoke check of the runtime)."""

from __future__ import annotations

import time


def run_demo(preset: str = "tiny-pi0", seed: int = 0, calls: int = 3) -> None:
    """Build a randomly initialised model and run full inference on a synthetic observation.

    Args:
        preset: tiny-pi0 or tiny-pi05 (the presets with the built-in byte tokenizer).
        seed: seeds the weights and the synthetic observation.
        calls: inference calls to time (the first includes warm-up)."""
    import numpy as np
    import torch

    from .model import Pi0Model, param_count
    from .model import preset as get_preset
    from .model.tokenizer import load_tokenizer
    from .transforms.robot import RobotTransform, robot_spec

    if calls < 1:
        raise ValueError(f"calls: expected an integer >= 1, got {calls}")
    cfg = get_preset(preset)
    if cfg.tokenizer != "bytes":
        raise ValueError(f"demo runs the tiny presets only (built-in tokenizer); got {preset!r}")
    torch.manual_seed(seed)
    model = Pi0Model(cfg).eval()
    tf = RobotTransform(cfg, load_tokenizer(cfg), None, robot_spec("metaworld"))
    rng = np.random.default_rng(seed)
    raw = {
        "observation/image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(4),
        "prompt": "pick up the puck and place it at the goal",
    }
    print(f"{preset}: {param_count(model) / 1e6:.2f}M parameters, prefix {cfg.prefix_len} tokens")
    for i in range(calls):
        t0 = time.perf_counter()
        actions = tf.actions(model.sample_actions(tf(raw)), raw)
        print(f"call {i}: actions {actions.shape} in {(time.perf_counter() - t0) * 1e3:.1f} ms")
