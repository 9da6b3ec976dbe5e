"""SigLIP vision tower (no pooling head, as PaliGemma uses it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import gelu_tanh


class SiglipLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.num_heads
        self.ln1 = nn.LayerNorm(c.width, eps=c.eps)
        self.q = nn.Linear(c.width, c.width)
        self.k = nn.Linear(c.width, c.width)
        self.v = nn.Linear(c.width, c.width)
        self.o = nn.Linear(c.width, c.width)
        self.ln2 = nn.LayerNorm(c.width, eps=c.eps)
        self.fc1 = nn.Linear(c.width, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        x = x + self.o(a)
        return x + self.fc2(gelu_tanh(self.fc1(self.ln2(x))))


class SiglipVision(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, num_patches, width)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.cfg = c
        self.patch_embed = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Embedding(c.num_patches, c.width)
        self.layers = nn.ModuleList(SiglipLayer(c) for _ in range(c.depth))
        self.post_ln = nn.LayerNorm(c.width, eps=c.eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.weight[None]
        for layer in self.layers:
            x = layer(x)
        return self.post_ln(x)
