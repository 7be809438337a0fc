"""Mixtral: GQA attention (optionally a sliding window), softmax top-k router with renormalised weights, no shared
expert."""

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
    """The config.json fields honoured as transformers' MixtralConfig defines them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # every layer attends to the last `sliding_window` positions


FIELDS = FieldRules(
    ignored={"router_jitter_noise": "multiplicative noise on the router input, applied in training only"},
    fixed={"hidden_act": ("silu",)},
    extra=ROPE_CONFIG_KEYS,
)


def sanitize(name: str) -> str:
    """Mixtral checkpoints name the MoE block `block_sparse_moe` and its projections w1 (gate), w3 (up), w2 (down)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    for old, new in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
        name = name.replace(old, new)
    return name


def build(config: dict[str, Any]):
    a = args_from_dict(ModelArgs, config, FIELDS)
    head_dim = a.head_dim or a.hidden_size // a.num_attention_heads
    shape = LMShape(a.vocab_size, a.hidden_size, a.num_hidden_layers, a.num_local_experts, a.num_experts_per_tok,
                    a.max_position_embeddings, a.tie_word_embeddings)
    attn = AttentionArgs(a.hidden_size, a.num_attention_heads, a.num_key_value_heads or a.num_attention_heads,
                         head_dim, eps=a.rms_norm_eps)
    router = RouterArgs(a.num_local_experts, a.num_experts_per_tok, norm_topk_prob=True)
    return build_decoder(shape, lambda i: Attention(i, attn, a.sliding_window),
                         lambda i: SparseMoE(i, a.hidden_size, router),
                         make_rope(config, head_dim, a.max_position_embeddings), a.rms_norm_eps)
