"""Building blocks shared by the vision tower, the prefix LM and the action expert."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Additive mask value: finite so rows with no valid key give finite garbage, never NaN.
NEG_INF = -2.3819763e38


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + w), computed in float32.

    With `cond_dim` set it is Pi0.5's adaptive RMSNorm: a dense layer on the time embedding
    gives (scale, shift, gate); there is no plain weight, and the gate scales the residual.
    """

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.weight = None
            self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        dtype = x.dtype
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(dtype), None
        scale, shift, gate = self.dense(cond).unsqueeze(1).chunk(3, dim=-1)
        out = normed * (1.0 + scale.float()) + shift.float()
        return out.to(dtype), gate


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding, half-split layout. x: (B, S, H, D); positions: (B, S)."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = positions.float()[..., None] * inv  # (B, S, D/2)
    cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Multi-query attention. q: (B, S, H, D); k, v: (B, T, Hkv, D); bias: (B, S, T) additive.

    Returns (B, S, H*D). Goes through SDPA so GPUs get fused kernels.
    """
    b, s, h, d = q.shape
    hkv = k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(h // hkv, dim=1) if hkv != h else k.transpose(1, 2)
    vh = v.transpose(1, 2).repeat_interleave(h // hkv, dim=1) if hkv != h else v.transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias[:, None].to(q.dtype))
    return out.transpose(1, 2).reshape(b, s, h * d)


def attend_two(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    bias1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    bias2: torch.Tensor,
) -> torch.Tensor:
    """Attention over [k1; k2] without materializing the concatenation of K/V.

    The cached prefix (k1, v1) is read, never copied or converted: the products run in the
    cache's dtype; only the small S x T scores are softmaxed in float32, then the two value
    products are summed. Shapes as in `attend`; k1/k2 are multi-query (Hkv heads shared by all
    H query heads).
    """
    b, s, h, d = q.shape
    hkv = k1.shape[2]
    g = h // hkv
    dt = k1.dtype
    # (B, Hkv, g*S, D): each kv head serves g query heads.
    qh = q.to(dt).reshape(b, s, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * s, d)
    scale = 1.0 / math.sqrt(d)
    s1 = (qh @ k1.permute(0, 2, 3, 1)).float() * scale  # (B, Hkv, g*S, T1)
    s2 = (qh @ k2.to(dt).permute(0, 2, 3, 1)).float() * scale
    s1 = s1 + bias1.repeat(1, g, 1)[:, None]
    s2 = s2 + bias2.repeat(1, g, 1)[:, None]
    p = torch.softmax(torch.cat([s1, s2], dim=-1), dim=-1).to(dt)
    t1 = k1.shape[1]
    out = p[..., :t1] @ v1.transpose(1, 2) + p[..., t1:] @ v2.to(dt).transpose(1, 2)
    out = out.reshape(b, hkv, g, s, d).permute(0, 3, 1, 2, 4).reshape(b, s, h * d)
    return out.to(q.dtype)


def key_bias(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(B, T) bool -> (B, S, T) additive bias that hides invalid keys."""
    bias = torch.zeros(key_valid.shape, dtype=torch.float32, device=key_valid.device)
    bias = bias.masked_fill(~key_valid, NEG_INF)
    return bias[:, None, :].expand(-1, num_queries, -1)


def sincos_time(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sinusoidal embedding of the flow-matching time (B,) -> (B, dim), computed in float64."""
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    ang = (2 * math.pi / period)[None, :] * t.double()[:, None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).float()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
