"""Grouped-query attention over per-sequence KV caches (Mixtral, Qwen-MoE, OLMoE, LLaDA).

Shape legend as in layers.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tiermoe import kernels
from tiermoe.models.layers import ForwardBatch, Linear, RMSNorm, apply_rotary, attend, fuse_linears


@dataclass(frozen=True, slots=True)
class AttentionArgs:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None, "head" (per-head RMSNorm, Qwen3) or "full" (over the projection, OLMoE)
    eps: float = 1e-6
    clip_qkv: float | None = None


class Attention(nn.Module):
    """`window`: this layer's sliding window (None = full causal attention)."""

    def __init__(self, layer: int, a: AttentionArgs, window: int | None = None):
        super().__init__()
        self.layer, self.a, self.window = layer, a, window
        self.q_proj = Linear(a.hidden, a.heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = Linear(a.hidden, a.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = Linear(a.hidden, a.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = Linear(a.heads * a.head_dim, a.hidden, bias=a.o_bias, fp32_out=True)
        if a.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(a.head_dim, a.eps), RMSNorm(a.head_dim, a.eps)
        elif a.qk_norm == "full":
            self.q_norm = RMSNorm(a.heads * a.head_dim, a.eps)
            self.k_norm = RMSNorm(a.kv_heads * a.head_dim, a.eps)

    def fuse_weights(self) -> None:
        """Replace q_proj, k_proj and v_proj by one qkv_proj, so decode streams them in one product."""
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        a, T = self.a, x.shape[0]
        q_size, kv_size = a.heads * a.head_dim, a.kv_heads * a.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)  # [T, h * d], [T, g * d], [T, g * d]
        if a.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if a.clip_qkv is not None:
            q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        q = q.view(T, a.heads, a.head_dim)  # [T, h, d]
        k = k.view(T, a.kv_heads, a.head_dim)  # [T, g, d]
        v = v.view(T, a.kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if not kernels.rotary_(q, k, cos, sin):
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attend_batch(self.layer, q, k, v, batch, window=self.window).reshape(T, -1))


def attend_batch(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                 scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Append each sequence's new k, v to its cache and attend; q [T, h, d] -> [T, h, dv]."""
    if batch.paged is not None and batch.attn_block == 1:
        out = batch.paged.attend(layer, q, k, v, scale, window)
        if out is not None:
            return out
    if len(batch.seqs) == 1 and batch.seqs[0].sparse is None:  # one sequence (batch-1 decode): no copy into `out`
        s = batch.seqs[0]
        keys, values = s.cache.update(layer, s.past, k, v)
        return attend(q, keys, values, s.past, scale, batch.attn_block, window)
    out = q.new_empty(*q.shape[:2], v.shape[-1])
    for s in batch.seqs:
        rows = slice(s.start, s.start + s.length)
        keys, values = s.cache.update(layer, s.past, k[rows], v[rows])
        if s.sparse is not None:  # opt-in head-centric sparse attention (block diffusion)
            out[rows] = s.sparse.attend(layer, q[rows], keys, values, s.past, scale, batch.attn_block)
        else:
            out[rows] = attend(q[rows], keys, values, s.past, scale, batch.attn_block, window)
    return out
