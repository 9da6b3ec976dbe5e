"""Gemma decoder stacks: the prefix LM (writes the K/V cache) and the action expert (reads it)."""

from __future__ import annotations

import torch
from torch import nn

from .config import GemmaConfig
from .layers import RMSNorm, attend, attend_two, gated_residual, gelu_tanh, rope


class GemmaLayer(nn.Module):
    def __init__(self, c: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.c = c
        w, h, hkv, d = c.width, c.num_heads, c.num_kv_heads, c.head_dim
        self.in_norm = RMSNorm(w, c.eps, cond_dim)
        self.q = nn.Linear(w, h * d, bias=False)
        self.k = nn.Linear(w, hkv * d, bias=False)
        self.v = nn.Linear(w, hkv * d, bias=False)
        self.o = nn.Linear(h * d, w, bias=False)
        self.post_norm = RMSNorm(w, c.eps, cond_dim)
        self.gate = nn.Linear(w, c.mlp_dim, bias=False)
        self.up = nn.Linear(w, c.mlp_dim, bias=False)
        self.down = nn.Linear(c.mlp_dim, w, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, base: float, cond: torch.Tensor | None = None):
        """Normed input -> rotated q, k and v (B, S, heads, D), plus Pi0.5's residual gate."""
        b, s, _ = x.shape
        c = self.c
        h, gate = self.in_norm(x, cond)
        q = rope(self.q(h).view(b, s, c.num_heads, c.head_dim), positions, base)
        k = rope(self.k(h).view(b, s, c.num_kv_heads, c.head_dim), positions, base)
        v = self.v(h).view(b, s, c.num_kv_heads, c.head_dim)
        return q, k, v, gate

    def finish(self, x: torch.Tensor, attn: torch.Tensor, gate, cond: torch.Tensor | None = None):
        """Output projection, residual, MLP, residual."""
        x = gated_residual(x, self.o(attn), gate)
        h, gate2 = self.post_norm(x, cond)
        return gated_residual(x, self.down(gelu_tanh(self.gate(h)) * self.up(h)), gate2)


class GemmaStack(nn.Module):
    def __init__(self, c: GemmaConfig, vocab_size: int | None = None, cond_dim: int | None = None):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(vocab_size, c.width) if vocab_size else None
        self.layers = nn.ModuleList(GemmaLayer(c, cond_dim) for _ in range(c.depth))
        self.norm = RMSNorm(c.width, c.eps, cond_dim)

    # ---- prefix LM: compute K/V -------------------------------------------------------------
    def prefix_kv(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        bias: torch.Tensor,
        base: float,
        start: int = 0,
        keep_hidden: tuple[int, ...] = (),
    ):
        """Run layers [start, depth) over all tokens; returns K, V (depth-start, B, T, Hkv, D).

        The last layer only needs its K/V, so its attention output and MLP are skipped: the
        prefix's final hidden states are never used by Pi0.
        """
        ks, vs, hidden = [], [], {}
        n = len(self.layers)
        for i in range(start, n):
            if i in keep_hidden:
                hidden[i] = x
            layer = self.layers[i]
            q, k, v, g = layer.qkv(x, positions, base)
            ks.append(k)
            vs.append(v)
            if i < n - 1:
                x = layer.finish(x, attend(q, k, v, bias), g)
        return torch.stack(ks), torch.stack(vs), hidden

    def prefix_kv_partial(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        bias: torch.Tensor,
        base: float,
    ):
        """Recompute only the tokens at `idx` (same for every batch row), attending over the
        cached K/V of the other tokens. x: (B, R, W) inputs of those tokens; positions (B, R);
        bias (B, R, T). Returns new full K, V with the recomputed rows written in.
        Cost is proportional to R, not T (plus R x T attention scores).
        """
        k_new, v_new = k_cache.clone(), v_cache.clone()
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            q, k, v, g = layer.qkv(x, positions, base)
            k_new[i].index_copy_(1, idx, k)
            v_new[i].index_copy_(1, idx, v)
            if i < n - 1:
                x = layer.finish(x, attend(q, k_new[i], v_new[i], bias), g)
        return k_new, v_new

    # ---- action expert: read the cache ------------------------------------------------------
    def suffix(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        k_prefix: torch.Tensor,
        v_prefix: torch.Tensor,
        bias_prefix: torch.Tensor,
        bias_self: torch.Tensor,
        base: float,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Suffix tokens through every layer, attending to [prefix K/V ; own K/V]."""
        for i, layer in enumerate(self.layers):
            q, k, v, g = layer.qkv(x, positions, base, cond)
            a = attend_two(q, k_prefix[i], v_prefix[i], bias_prefix, k, v, bias_self)
            x = layer.finish(x, a, g, cond)
        return self.norm(x, cond)[0]
