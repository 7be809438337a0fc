"""The decoder skeleton every family fills in: embeddings, layers (attention + dense or sparse MLP), norm, head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tiermoe.models.layers import RESIDUAL_DTYPE, ForwardBatch, Linear, RMSNorm
from tiermoe.models.moe import SparseMoE
from tiermoe.models.rope import Rope


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x, cos, sin, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass(frozen=True, slots=True)
class LMShape:
    """What the engine needs to know about a model, independent of its family."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int
    max_position_embeddings: int
    tie_word_embeddings: bool


class CausalLM(nn.Module):
    """Token ids in, hidden states out; `logits` applies the head only to the rows that need it."""

    def __init__(self, shape: LMShape, layers: list[DecoderLayer], rotary: Rope, eps: float):
        super().__init__()
        self.shape = shape
        self.rotary = rotary
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(shape.hidden_size, eps)
        self.lm_head = Linear(shape.hidden_size, shape.vocab_size, bias=False, fp32_out=True)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the final norm's weight's, to which every product's input is rounded (product weights
        may be kept narrower, kernels.weight_dtype)."""
        return self.model.norm.weight.dtype

    @property
    def moe_blocks(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]

    def fuse_weights(self) -> None:
        """Fuse projections that read the same input into one weight (attention q/k/v, MLP gate/up), once, after
        the checkpoint is loaded: decode then streams each in one product. The unfused weights are released."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "fuse_weights"):
                module.fuse_weights()

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids [T] -> final-normed hidden states [T, H] in the weights' dtype."""
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary.cos_sin(batch, x.dtype)
        x = x.to(RESIDUAL_DTYPE)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> fp32 logits [n, V] (unrounded fp32 sums for the few rows the kernels serve)."""
        return self.lm_head(hidden)


def build_decoder(shape: LMShape, make_attn, make_mlp, rope: Rope, eps: float) -> CausalLM:
    """Assemble a CausalLM from per-layer factories `make_attn(layer)` and `make_mlp(layer)`."""
    layers = [DecoderLayer(make_attn(i), make_mlp(i), shape.hidden_size, eps) for i in range(shape.num_layers)]
    return CausalLM(shape, layers, rope, eps)
