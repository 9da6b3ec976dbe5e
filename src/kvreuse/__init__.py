"""kvreuse: fast Pi0 / Pi0.5 inference with gated prefix-KV reuse."""

__version__ = "0.1.0"
