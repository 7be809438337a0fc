"""OLMoE: q/k RMSNorm over the whole projection, optional qkv clipping, softmax top-k router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tiermoe.models.attention import Attention, AttentionArgs
from tiermoe.models.config_fields import FieldRules, args_from_dict
from tiermoe.models.moe import RouterArgs, SparseMoE
from tiermoe.models.rope import ROPE_CONFIG_KEYS, make_rope
from tiermoe.models.transformer import LMShape, build_decoder


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """The config.json fields honoured as transformers' OlmoeConfig defines them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of each expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False


FIELDS = FieldRules(fixed={"hidden_act": ("silu",)}, aliases={"num_experts": "num_local_experts"},
                    extra=ROPE_CONFIG_KEYS)


def sanitize(name: str) -> str:
    return name


def build(config: dict[str, Any]):
    a = args_from_dict(ModelArgs, config, FIELDS)
    head_dim = a.hidden_size // a.num_attention_heads
    shape = LMShape(a.vocab_size, a.hidden_size, a.num_hidden_layers, a.num_experts, a.num_experts_per_tok,
                    a.max_position_embeddings, a.tie_word_embeddings)
    attn = AttentionArgs(a.hidden_size, a.num_attention_heads, a.num_key_value_heads or a.num_attention_heads,
                         head_dim, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="full",
                         eps=a.rms_norm_eps, clip_qkv=a.clip_qkv)
    router = RouterArgs(a.num_experts, a.num_experts_per_tok, norm_topk_prob=a.norm_topk_prob)
    return build_decoder(shape, lambda i: Attention(i, attn), lambda i: SparseMoE(i, a.hidden_size, router),
                         make_rope(config, head_dim, a.max_position_embeddings), a.rms_norm_eps)
