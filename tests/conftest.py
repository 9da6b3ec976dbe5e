"""Triton reads TRITON_INTERPRET once, when it is first imported (by anything: torch's inductor
may import it too). Without a GPU the interpreter is the only way the kernel tests can run, so
it is switched on before any test module is collected."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
