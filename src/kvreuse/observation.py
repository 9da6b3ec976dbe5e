"""The canonical, batched model input that every transform produces."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Observation:
    """Model-ready tensors for one batch.

    images: camera name -> (B, 3, H, W) float in [-1, 1], already resized to the model's size.
    image_masks: camera name -> (B,) bool; False = camera missing (its tokens are excluded).
    state: (B, max_state_dim) normalized, zero padded.
    tokens / token_mask: (B, max_token_len) prompt tokens (Pi0.5: with the discretized state).
    state_token_mask: (B, max_token_len) bool, True on the tokens that spell the state
        (Pi0.5 only; all False for Pi0). Lets reuse modes treat the state span apart.
    prompt: the task text per batch row (identity for cache invalidation; state excluded).
    """

    images: dict[str, torch.Tensor]
    image_masks: dict[str, torch.Tensor]
    state: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    state_token_mask: torch.Tensor
    prompt: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    @property
    def device(self) -> torch.device:
        return self.state.device

    def to(self, device=None, dtype=None) -> "Observation":
        """Move tensors; only float tensors change dtype."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(
            self,
            images={k: mv(v) for k, v in self.images.items()},
            image_masks={k: mv(v) for k, v in self.image_masks.items()},
            state=mv(self.state),
            tokens=mv(self.tokens),
            token_mask=mv(self.token_mask),
            state_token_mask=mv(self.state_token_mask),
        )
