"""Building blocks shared by the model families.

Shape legend: T = tokens in the forward pass (all sequences of the batch, flattened), H = hidden size,
S = tokens in one sequence's KV cache, h = query heads, g = KV heads, d = head dim, E = experts, A = activated (top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tiermoe import kernels

# NOTE: the residual stream (the embeddings, every sublayer's output and their sums) is fp32 whatever the weights'
# dtype, as llama.cpp keeps it: in bf16 only the weights and the inputs of products are bf16, and a product's fp32
# sums reach the stream unrounded. Rounding the stream to bf16 at every layer is where a bf16 run drifted from fp32.
RESIDUAL_DTYPE = torch.float32


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32 and rounded once to the weight's dtype (the products' input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rmsnorm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear whose products with a few rows (decode) run the bandwidth-bound kernels of tiermoe.kernels.

    `fp32_out`: the result is returned in fp32 (a projection into the residual stream, the logits).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fp32_out: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.out_dtype = RESIDUAL_DTYPE if fp32_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, self.out_dtype)


def fuse_linears(parts: list[nn.Linear]) -> Linear:
    """One Linear whose output rows are the parts' rows in order; the parts' weights are copied, not kept."""
    first = parts[0]
    fused = Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                   device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class SwiGLU(nn.Module):
    """Dense gated MLP: down(silu(gate(x)) * up(x)), returned in fp32 (it writes into the residual stream or into
    the MoE block's sum). After `fuse_weights` gate and up are one [2I, H] product."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias, fp32_out=True)

    def fuse_weights(self) -> None:
        """Replace gate_proj and up_proj by gate_up_proj (called once, after the checkpoint is loaded)."""
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_proj.bias is None:
            return kernels.swiglu(x, self.gate_up_proj.weight, self.down_proj.weight, out_dtype=RESIDUAL_DTYPE)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(kernels.silu(gate) * up)


class Rotary:
    """Rotary position embedding tables; `dim` is the rotated width (partial rotary rotates a prefix)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0):
        self.inv_freq = inv_freq.float().to("cpu")  # [dim / 2]
        self.scaling = scaling

    @classmethod
    def default(cls, dim: int, theta: float) -> Rotary:
        # explicit device: models are built under torch.device("meta") and these tables are not weights
        return cls(1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)  # [T, dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, dim]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] with cos/sin [T, d_rot]; rotates the first d_rot dims (all of them unless partial)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    d_rot = cos.shape[-1]
    if d_rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, keep = x[..., :d_rot], x[..., d_rot:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's layout: rotated pairs are (x0, x1), (x2, x3), ...; output is de-interleaved (evens then odds)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass(slots=True)
class SeqSlice:
    """One sequence's rows in a flattened forward pass."""

    cache: object  # KVCache of the sequence
    start: int  # first row in the [T, ...] tensors
    length: int  # rows of this sequence in this pass
    past: int  # tokens already in the cache before this pass
    sparse: object | None = None  # SparseKV (tiermoe.models.sparse_attention): this sequence's kept prefix K/V


@dataclass(slots=True)
class ForwardBatch:
    """What a forward pass needs besides token ids: positions and where each sequence's rows are."""

    positions: torch.Tensor  # [T] long
    seqs: list[SeqSlice]
    # Which keys a query sees: those whose block (position // attn_block) is not after the query's own block.
    # 1 = causal (autoregressive), B = block-causal (LLaDA2's block diffusion), None = bidirectional (LLaDA).
    attn_block: int | None = 1
    # Every sequence's rows attended in one call per layer (tiermoe.engine.kv_cache_manager.PagedBatch), or None.
    paged: object | None = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float | None,
           block: int | None = 1, window: int | None = None) -> torch.Tensor:
    """Causal attention of one sequence's new rows over its whole cache (block-causal or bidirectional when
    `block` is not 1, see ForwardBatch.attn_block). With `window`, a query at position p sees keys p - window < j <= p
    (transformers' sliding_window_overlay); the cache keeps every key, the mask hides the old ones.

    q [t, h, d], k [S, g, d], v [S, g, dv] with S = past + t; returns [t, h, dv].
    """
    if block != 1:
        return attend_blocks(q, k, v, past, scale, block)
    t, S = q.shape[0], k.shape[0]
    if t > 1 and kernels.batch_invariant():  # each row as a decode step sees it, whatever the chunk it is in
        return torch.cat([attend(q[i:i + 1], k[:past + i + 1], v[:past + i + 1], past + i, scale, 1, window)
                          for i in range(t)])
    windowed = window is not None and S > window
    if t == 1:  # decode: the one query sees the last `window` keys (all without a window)
        seen = slice(S - window if windowed else 0, S)
        out = kernels.decode_attention(q[0], k[seen], v[seen], scale)  # [h, dv]
        if out is not None:
            return out[None]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    if t == 1 and not windowed:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    elif past == 0 and not windowed:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        rows = torch.arange(t, device=q.device)[:, None] + past  # [t, 1] query positions
        keys = torch.arange(S, device=q.device)[None, :]  # [1, S]
        mask = keys <= rows  # [t, S]
        if windowed:
            mask &= keys > rows - window
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float | None,
                  block: int | None) -> torch.Tensor:
    """Block-causal (`block` positions per block) or, with block None, bidirectional attention; shapes as attend.

    Positions are cache indices, so blocks are aligned to position 0 as in LLaDA2's block diffusion mask.
    """
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    mask = None
    if block is not None:
        query_block = (torch.arange(q.shape[1], device=q.device) + past) // block  # [t]
        key_block = torch.arange(k.shape[1], device=q.device) // block  # [S]
        mask = key_block[None, :] <= query_block[:, None]  # [t, S]
        if bool(mask.all()):  # rows of one block over earlier blocks: nothing to hide
            mask = None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
