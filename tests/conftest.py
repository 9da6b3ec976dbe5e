"""Triton set-up for the kernel tests, done before any test module is imported.

- Triton reads TRITON_INTERPRET once, when it is first imported; without a GPU the interpreter is
  the only way the kernel tests can run, so it is switched on here.
- Triton is imported here, first: loading its libtriton after OSMesa (MuJoCo's CPU renderer,
  which brings its own LLVM) crashes the process, while the other order works (renders checked
  identical). MuJoCo rendering tests load OSMesa at import time.
"""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401
