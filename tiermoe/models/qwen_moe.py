"""Qwen1.5/2-MoE (shared expert with a sigmoid gate, qkv bias) and Qwen3-MoE (per-head q/k RMSNorm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tiermoe.models.attention import Attention, AttentionArgs
from tiermoe.models.layers import SwiGLU
from tiermoe.models.moe import RouterArgs, SparseMoE
from tiermoe.models.transformer import LMShape, args_from_dict, build_decoder, check_activation


@dataclass(frozen=True, slots=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    moe_intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0
    qkv_bias: bool = True  # Qwen2-MoE always has q/k/v biases; older configs omit the key
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def is_moe(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


def sanitize(name: str) -> str:
    return name


def build(config: dict[str, Any]):
    check_activation(config)
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; hub configs say num_experts
    a = args_from_dict(ModelArgs, config, aliases={"num_experts": "num_local_experts"})
    qwen3 = a.model_type == "qwen3_moe"
    head_dim = a.head_dim or a.hidden_size // a.num_attention_heads
    shape = LMShape(a.vocab_size, a.hidden_size, a.num_hidden_layers, a.num_experts, a.num_experts_per_tok,
                    a.max_position_embeddings, a.tie_word_embeddings)
    attn = AttentionArgs(a.hidden_size, a.num_attention_heads, a.num_key_value_heads or a.num_attention_heads,
                         head_dim, qkv_bias=a.attention_bias if qwen3 else a.qkv_bias,
                         o_bias=qwen3 and a.attention_bias,
                         qk_norm="head" if qwen3 else None, eps=a.rms_norm_eps)
    router = RouterArgs(a.num_experts, a.num_experts_per_tok, norm_topk_prob=a.norm_topk_prob,
                        weights_in_input_dtype=True)

    def make_mlp(i: int):
        if not a.is_moe(i):
            return SwiGLU(a.hidden_size, a.intermediate_size)
        if qwen3 or not a.shared_expert_intermediate_size:
            return SparseMoE(i, a.hidden_size, router)
        shared = SwiGLU(a.hidden_size, a.shared_expert_intermediate_size)
        return SparseMoE(i, a.hidden_size, router, shared=shared, shared_gate=True)

    return build_decoder(config, shape, lambda i: Attention(i, attn), make_mlp, head_dim, a.rms_norm_eps)
