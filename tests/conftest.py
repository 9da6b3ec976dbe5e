"""Triton reads TRITON_INTERPRET once, when it is first imported (by anything); without a GPU the
interpreter is the only way the kernel tests can run, so it is switched on before any test
module is imported. (Loading Triton after MuJoCo's OSMesa crashes: kvreuse.envs.prepare_gl
handles that for every env import, tests included.)"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
