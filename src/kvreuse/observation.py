"""The canonical, batched model input that every transform produces."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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

    The model reads the two token masks on the host (where the prompt ends, where the state
    starts), and the reuse policy the camera masks (which cameras are present) and the tokens
    (what its plans compare with the cache's): `host_mask` serves them from the CPU tensors
    `to()` copied them from, so that an observation moved to a GPU that way costs no device read
    for them. Names: "token_mask", "state_token_mask", "image_masks/<camera>", "tokens".
    """

    images: dict[str, torch.Tensor]
    image_masks: dict[str, torch.Tensor]
    state: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    state_token_mask: torch.Tensor
    prompt: tuple[str, ...]
    # mask name -> (device tensor, its version, CPU source, its version), set by to()
    _host: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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

        out = replace(
            self,
            images={k: mv(v) for k, v in self.images.items()},
            image_masks={k: mv(v) for k, v in self.image_masks.items()},
            state=mv(self.state),
            tokens=mv(self.tokens),
            token_mask=mv(self.token_mask),
            state_token_mask=mv(self.state_token_mask),
        )
        for name in ("token_mask", "state_token_mask", "tokens", *(f"image_masks/{c}" for c in self.image_masks)):
            src, dst = self.mask(name), out.mask(name)
            if src.device.type == "cpu" and dst is not src:
                out._host[name] = (dst, version(dst), src, version(src))
        return out

    def with_images(self, images: dict[str, torch.Tensor]) -> "Observation":
        """A copy with these cameras' images replaced; masks, tokens and their host copies kept."""
        out = replace(self, images={**self.images, **images})
        out._host.update(self._host)
        return out

    def mask(self, name: str) -> torch.Tensor:
        """The mask called `name` ("token_mask", "state_token_mask", "image_masks/<camera>"; also
        "tokens")."""
        group, _, cam = name.partition("/")
        return self.image_masks[cam] if group == "image_masks" else getattr(self, name)

    def host_mask(self, name: str) -> torch.Tensor:
        """The mask `name` on the CPU: the tensor to() copied it from while neither has changed
        since, else read from the device (a sync on a GPU)."""
        return self._host[name][2] if self._host_copy_valid(name) else self.mask(name).cpu()

    def on_host(self, name: str) -> bool:
        """Whether host_mask(name) reads no device: the mask is on the CPU or has a valid host copy."""
        return self.mask(name).device.type == "cpu" or self._host_copy_valid(name)

    def _host_copy_valid(self, name: str) -> bool:
        h = self._host.get(name)
        return (h is not None and h[0] is self.mask(name) and None not in (h[1], h[3])
                and (h[1], h[3]) == (version(h[0]), version(h[2])))


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device`. To a GPU through pinned memory, so the copy is queued
    without a stream sync: a copy from pageable memory first waits for all the stream's queued
    work (docs/PERFORMANCE.md round 15)."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def version(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter; None where torch keeps none (inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None
