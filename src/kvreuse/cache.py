"""PrefixCache: the per-layer K/V of the prefix, with enough bookkeeping to reuse parts of it.

Token order in the prefix is [camera 0 | camera 1 | ... | prompt]. Each span knows which
observation ("snapshot") produced its K/V, so a reuse layer can keep, replace or recompute
spans and tell whether the result mixes moments in time (design invariant 2).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

SpanKind = Literal["camera", "text", "state"]

_snapshot_ids = itertools.count(1)


def new_snapshot_id() -> int:
    """Process-wide unique id for one observation's worth of computed K/V."""
    return next(_snapshot_ids)


@dataclass(frozen=True)
class Span:
    name: str  # camera name, "text" or "state"
    kind: SpanKind
    start: int
    end: int
    snapshot: int


@dataclass
class PrefixCache:
    """K/V of every prefix layer.

    k, v: (layers, B, T, kv_heads, head_dim), rotary already applied to k.
    mask: (B, T) bool, valid tokens (padding and missing cameras are False).
    positions: (B, T) long rotary positions of the prefix tokens.
    embeds: (B, T, width) the LM input embeddings (kept for layer-wise / partial reuse).
    hidden: residual stream at the input of selected layers (layer -> (B, T, width)).
    spans: token ranges by modality. For Pi0.5 the "text" span covers the whole prompt region
        and `state_tokens` marks which of its tokens spell the state.
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    embeds: torch.Tensor
    spans: tuple[Span, ...]
    tokens: torch.Tensor
    state_tokens: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    call_index: int = 0
    created: float = field(default_factory=time.monotonic)

    @property
    def num_valid(self) -> torch.Tensor:
        """(B,) number of valid prefix tokens; suffix positions continue from here."""
        return self.mask.sum(-1)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def span(self, name: str) -> Span:
        for s in self.spans:
            if s.name == name:
                return s
        raise KeyError(f"no span named {name!r}; spans: {[s.name for s in self.spans]}")

    @property
    def snapshots(self) -> set[int]:
        return {s.snapshot for s in self.spans}

    def with_spans(self, **updates: int) -> tuple[Span, ...]:
        """Spans with new snapshot ids for the named spans."""
        return tuple(replace(s, snapshot=updates.get(s.name, s.snapshot)) for s in self.spans)
