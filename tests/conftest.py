"""Triton reads TRITON_INTERPRET once, when it is first imported (by anything); without a GPU the
interpreter is the only way the kernel tests can run, so it is switched on before any test
module is imported. (Loading Triton after MuJoCo's OSMesa crashes: kvreuse.envs.prepare_gl
handles that for every env import, tests included.)"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_SP_TEXT = """pick up the red block and place it in the bowl
open the top drawer of the cabinet
push the button on the left side of the table
put the cream cheese in the bowl and close the drawer
turn on the stove and put the moka pot on it
Task: open the drawer, State: 0 1 2 3 4 5 6 7 8 9 10 128 255;
Action: move
""" * 20


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A 120-piece SentencePiece model trained here (stands in for PaliGemma's tokenizer.model)."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(_SP_TEXT)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=120, model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, minloglevel=2,
    )
    return d / "tok.model"


@pytest.fixture
def fail_on_call():
    """fail_on_call(fn, n, exc): `fn` whose n-th call raises `exc` (a fault mid-run, for the tests of
    what a failing or interrupted command keeps); the other calls go through."""

    def make(fn, n: int, exc: BaseException):
        calls = []

        def wrapped(*a, **kw):
            calls.append(1)
            if len(calls) == n:
                raise exc
            return fn(*a, **kw)

        return wrapped

    return make
