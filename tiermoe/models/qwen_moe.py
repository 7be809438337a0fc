"""Qwen1.5/2-MoE (shared expert with a sigmoid gate, qkv bias, sliding window on chosen layers) and Qwen3-MoE
(per-head q/k RMSNorm, sliding window on every layer when enabled)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tiermoe.errors import ConfigError
from tiermoe.models.attention import Attention, AttentionArgs
from tiermoe.models.config_fields import FieldRules, args_from_dict
from tiermoe.models.layers import SwiGLU
from tiermoe.models.moe import RouterArgs, SparseMoE
from tiermoe.models.rope import ROPE_CONFIG_KEYS, make_rope
from tiermoe.models.transformer import LMShape, build_decoder


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """The config.json fields both Qwen MoE configs define, honoured as transformers does."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    moe_intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # not a config field, but transformers reads it when config.json sets it
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096

    def is_moe(self, layer: int) -> bool:
        return layer not in (self.mlp_only_layers or []) and (layer + 1) % self.decoder_sparse_step == 0


@dataclass(frozen=True, slots=True)
class Qwen2MoeArgs(ModelArgs):
    shared_expert_intermediate_size: int = 5632
    qkv_bias: bool = True  # q/k/v biases (o_proj never has one)
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    def windows(self) -> list[int | None]:
        """Per layer: the sliding window, or None for full attention (Qwen2MoeConfig's default layer_types)."""
        types = self.layer_types or [
            "sliding_attention" if (i + 1) % 2 and i < self.max_window_layers and self.use_sliding_window
            else "full_attention" for i in range(self.num_hidden_layers)]
        if len(types) != self.num_hidden_layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ConfigError(f"layer_types must give 'full_attention' or 'sliding_attention' for each of the "
                              f"{self.num_hidden_layers} layers, got {types!r}")
        window = self.sliding_window if self.use_sliding_window else 0
        if "sliding_attention" in types and not window:
            raise ConfigError("layer_types has sliding_attention layers but use_sliding_window/sliding_window "
                              "give no window")
        return [window if t == "sliding_attention" else None for t in types]


@dataclass(frozen=True, slots=True)
class Qwen3MoeArgs(ModelArgs):
    attention_bias: bool = False  # q/k/v and o_proj biases

    def windows(self) -> list[int | None]:
        """transformers' Qwen3-MoE slides every layer when use_sliding_window is set, none otherwise."""
        window = self.sliding_window if self.use_sliding_window else None
        return [window] * self.num_hidden_layers


_COMMON_RULES = dict(fixed={"hidden_act": ("silu",)}, extra=ROPE_CONFIG_KEYS,
                     # transformers 5 writes the expert count as num_local_experts; hub configs say num_experts
                     aliases={"num_experts": "num_local_experts"})
ARGS = {"qwen2_moe": Qwen2MoeArgs, "qwen3_moe": Qwen3MoeArgs}
FIELDS = {
    "qwen2_moe": FieldRules(**_COMMON_RULES),
    "qwen3_moe": FieldRules(ignored={"max_window_layers": "transformers' Qwen3-MoE does not read it"},
                            **_COMMON_RULES),
}


def sanitize(name: str) -> str:
    return name


def build(config: dict[str, Any]):
    kind = config["model_type"]
    a = args_from_dict(ARGS[kind], config, FIELDS[kind])
    qwen3 = kind == "qwen3_moe"
    head_dim = a.head_dim or a.hidden_size // a.num_attention_heads
    shape = LMShape(a.vocab_size, a.hidden_size, a.num_hidden_layers, a.num_experts, a.num_experts_per_tok,
                    a.max_position_embeddings, a.tie_word_embeddings)
    attn = AttentionArgs(a.hidden_size, a.num_attention_heads, a.num_key_value_heads or a.num_attention_heads,
                         head_dim, qkv_bias=a.attention_bias if qwen3 else a.qkv_bias,
                         o_bias=qwen3 and a.attention_bias,
                         qk_norm="head" if qwen3 else None, eps=a.rms_norm_eps)
    router = RouterArgs(a.num_experts, a.num_experts_per_tok, norm_topk_prob=a.norm_topk_prob)
    windows = a.windows()

    def make_mlp(i: int):
        if not a.is_moe(i):
            return SwiGLU(a.hidden_size, a.intermediate_size)
        if qwen3 or not a.shared_expert_intermediate_size:
            return SparseMoE(i, a.hidden_size, router)
        shared = SwiGLU(a.hidden_size, a.shared_expert_intermediate_size)
        return SparseMoE(i, a.hidden_size, router, shared=shared, shared_gate=True)

    return build_decoder(shape, lambda i: Attention(i, attn, windows[i]), make_mlp,
                         make_rope(config, head_dim, a.max_position_embeddings), a.rms_norm_eps)
