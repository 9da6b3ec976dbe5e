"""Prompt tokenizers: PaliGemma SentencePiece from a user-given file, and a built-in byte
tokenizer for tiny presets (needs no file). Prompt layouts follow openpi:

    Pi0:   <bos> task "\\n"
    Pi0.5: <bos> "Task: {task}, State: {s0 s1 ...};\\nAction: "   (state in 256 bins of [-1, 1])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .config import ModelConfig


class Tokenizer(Protocol):
    bos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 4 (0 pad, 1 bos, 2 eos, 3 unused): vocabulary 260."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")


def check_tokenizer_file(path: str | Path) -> Path:
    """The --tokenizer path, checked as a file that can be the PaliGemma tokenizer.model (before it is read)."""
    path = Path(path)
    if path.is_dir():
        hint = f"; did you mean {path / 'tokenizer.model'}?" if (path / "tokenizer.model").is_file() else ""
        raise ValueError(f"tokenizer {path}: a directory, expected the PaliGemma tokenizer.model file{hint}")
    if not path.is_file():
        raise ValueError(f"tokenizer: no SentencePiece model at {path} (pass the PaliGemma tokenizer.model)")
    if path.stat().st_size > 256 << 20:  # PaliGemma's is 4 MB; sentencepiece would read all of a weights file
        raise ValueError(f"tokenizer {path}: {path.stat().st_size / 1e9:.1f} GB, not a SentencePiece model; "
                         "pass the PaliGemma tokenizer.model")
    return path


class SentencePieceTokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece

        path = check_tokenizer_file(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError for any unparsable file
            raise ValueError(f"tokenizer {path}: not a SentencePiece model ({e}); pass the PaliGemma "
                             "tokenizer.model (a Hugging Face tokenizer.json is not read)") from None
        self.bos_id = self.sp.bos_id()
        if self.bos_id < 0:  # every prompt starts with it: -1 reached the embedding as an IndexError
            raise ValueError(f"tokenizer {path}: a SentencePiece model without a <bos> piece (T5's spiece.model?), "
                             "not PaliGemma's; pass the PaliGemma tokenizer.model")
        self.pad_id = max(self.sp.pad_id(), 0)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def load_tokenizer(cfg: ModelConfig, path: str | Path | None = None) -> Tokenizer:
    if cfg.tokenizer == "bytes":
        if path is not None:  # silently ignoring it would also file results under a tokenizer never used
            raise ValueError(f"tokenizer: this {cfg.variant} model uses the built-in byte tokenizer; "
                             f"--tokenizer (PaliGemma's tokenizer.model) is for full-size checkpoints, got {path}")
        return ByteTokenizer()
    if path is None:
        raise ValueError(
            f"this {cfg.variant} model needs the PaliGemma SentencePiece tokenizer: pass --tokenizer PATH/tokenizer.model"
        )
    tok = SentencePieceTokenizer(path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {cfg.vocab_size}")
    return tok


@dataclass
class PromptTokens:
    tokens: torch.Tensor  # (B, L) long
    mask: torch.Tensor  # (B, L) bool
    state_mask: torch.Tensor  # (B, L) bool, tokens that spell the state (Pi0.5)


def clean_task(task: str) -> str:
    return task.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray, bins: int, below: str = "clip") -> np.ndarray:
    """Normalized state in [-1, 1] -> integer bins 0..bins-1; above 1 is bin bins-1. Below -1 is bin
    0 with below="clip", or -1 with below="digitize" (openpi's and lerobot's prompt)."""
    edges = np.linspace(-1.0, 1.0, bins + 1)[:-1]
    b = np.digitize(state, edges) - 1
    return np.clip(b, 0, bins - 1) if below == "clip" else b


def tokenize_prompts(
    cfg: ModelConfig,
    tok: Tokenizer,
    tasks: list[str],
    state: np.ndarray | None = None,
    truncate: bool = False,
) -> PromptTokens:
    """Tokenize a batch of prompts to cfg.max_token_len. For Pi0.5, `state` (B, state_dim),
    already normalized, is written into the prompt."""
    n = cfg.max_token_len
    b = len(tasks)
    ids = np.full((b, n), tok.pad_id, dtype=np.int64)
    mask = np.zeros((b, n), dtype=bool)
    smask = np.zeros((b, n), dtype=bool)
    for i, task in enumerate(tasks):
        text = clean_task(task) if cfg.prompt_style != "lerobot" or cfg.state_in_prompt else task
        if cfg.state_in_prompt:
            if state is None:
                raise ValueError("state: Pi0.5 writes the state into the prompt, but no state was given")
            digits = " ".join(str(int(d)) for d in discretize_state(np.asarray(state[i]), cfg.state_bins,
                                                                  cfg.state_below_bins))
            # The whole prompt is tokenized at once (as openpi does); the state span starts
            # where the tokens of the text before it end.
            full = [tok.bos_id] + tok.encode(f"Task: {text}, State: {digits};\nAction: ")
            head = [tok.bos_id] + tok.encode(f"Task: {text},")
            while full[: len(head)] != head:  # a piece crossed the cut: move it left
                head = head[:-1]
            head, tail = full[: len(head)], full[len(head) :]
        elif cfg.prompt_style == "openpi":  # the newline encoded on its own (openpi's PaligemmaTokenizer)
            head, tail = [tok.bos_id] + tok.encode(text) + tok.encode("\n"), []
        else:
            head = [tok.bos_id] + tok.encode(text if text.endswith("\n") else text + "\n")
            tail = []
        seq = head + tail
        if len(seq) > n:
            if not truncate:
                raise ValueError(
                    f"prompt: {len(seq)} tokens exceed max_token_len={n} for {task!r}; "
                    "shorten it or ask for truncation explicitly"
                )
            seq = seq[:n]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = True
        smask[i, len(head) : len(seq)] = bool(tail)
    return PromptTokens(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(smask))
