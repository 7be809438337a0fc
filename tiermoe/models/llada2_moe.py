"""LLaDA2.0 (mini, flash): a block-diffusion MoE. Fused query_key_value projection, per-head RMSNorm on q and k,
partial rotary (the first half of each head), dense MLP in the first `first_k_dense_replace` layers, then routed
experts behind a DeepSeek-V3-style router (fp32 sigmoid scores, `expert_bias` for selection only, n_group groups of
which topk_group are kept by the sum of each group's top-2, selected weights normalised then scaled) plus shared
experts. Attention is block-causal at generation time (see tiermoe.decode.diffusion).

Checkpoint names (inclusionAI/LLaDA2.0-mini modeling_llada2_moe.py) -> canonical names:
  model.word_embeddings                         -> model.embed_tokens
  model.layers.N.attention.query_key_value      -> model.layers.N.self_attn.query_key_value
  model.layers.N.attention.{query,key}_layernorm -> model.layers.N.self_attn.{q,k}_norm
  model.layers.N.attention.dense                -> model.layers.N.self_attn.o_proj
  model.layers.N.mlp.gate.expert_bias           -> model.layers.N.mlp.gate.e_score_correction_bias
  model.layers.N.mlp.shared_experts             -> model.layers.N.mlp.shared_expert
Routed experts are already `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tiermoe import kernels
from tiermoe.errors import ConfigError
from tiermoe.models.attention import AttentionArgs, attend_batch
from tiermoe.models.config_fields import FieldRules, args_from_dict
from tiermoe.models.diffusion import DiffusionSpec
from tiermoe.models.layers import ForwardBatch, Linear, RMSNorm, SwiGLU, apply_rotary
from tiermoe.models.moe import RouterArgs, SparseMoE
from tiermoe.models.rope import make_rope
from tiermoe.models.transformer import LMShape, build_decoder

# The public generate() hard-codes these (LLaDA2.0's tokenizer: <|mask|>, <|endoftext|>).
DIFFUSION = DiffusionSpec("blocks", mask_token_id=156895, eos_token_id=156892)


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """config.json keys of LLaDA2MoeConfig; defaults are that class's."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int = 2
    num_shared_experts: int | None = 0
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 0
    head_dim: int | None = None
    partial_rotary_factor: float = 0.5
    rotary_dim: int | None = None  # not read by the public modeling file; accepted only when it agrees (`check`)
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = True
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 16384
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    mask_token_id: int | None = None  # read by tiermoe.models.diffusion (the public generate() hard-codes it)

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotated(self) -> int:
        """Rotary features per head: the public modeling file rotates head_dim x partial_rotary_factor."""
        return int(self.dim * self.partial_rotary_factor)

    def router(self) -> RouterArgs:
        # The reference always renormalises the selected weights (top_k > 1), whatever norm_topk_prob says.
        return RouterArgs(self.num_experts, self.num_experts_per_tok, scoring="sigmoid", norm_topk_prob=True,
                          scaling_factor=self.routed_scaling_factor, n_group=self.n_group,
                          topk_group=self.topk_group, group_score="top2_sum", correction_bias=True)


class FusedQKVAttention(nn.Module):
    """Grouped-query attention with one fused projection: rows are h query heads, then g key heads, then g value."""

    def __init__(self, layer: int, a: AttentionArgs):
        super().__init__()
        self.layer, self.a = layer, a
        self.query_key_value = Linear(a.hidden, (a.heads + 2 * a.kv_heads) * a.head_dim, bias=a.qkv_bias)
        self.o_proj = Linear(a.heads * a.head_dim, a.hidden, bias=a.o_bias, fp32_out=True)
        if a.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(a.head_dim, a.eps), RMSNorm(a.head_dim, a.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        a, T = self.a, x.shape[0]
        qkv = self.query_key_value(x).view(T, a.heads + 2 * a.kv_heads, a.head_dim)  # [T, h + 2g, d]
        q, k, v = qkv.split([a.heads, a.kv_heads, a.kv_heads], dim=1)  # [T, h, d], [T, g, d], [T, g, d]
        if a.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if not kernels.rotary_(q, k, cos, sin):  # partial: cos/sin cover the rotated prefix
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attend_batch(self.layer, q, k, v, batch).reshape(T, -1))


RENAMES = (
    ("model.word_embeddings.", "model.embed_tokens."),
    (".attention.query_layernorm.", ".self_attn.q_norm."),
    (".attention.key_layernorm.", ".self_attn.k_norm."),
    (".attention.dense.", ".self_attn.o_proj."),
    (".attention.", ".self_attn."),
    (".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"),
    (".mlp.shared_experts.", ".mlp.shared_expert."),
)


def sanitize(name: str) -> str:
    for old, new in RENAMES:
        if old in name:
            return name.replace(old, new)
    return name


FIELDS = FieldRules(
    ignored={
        "embedding_dropout": "dropout is off at inference",
        "output_dropout": "dropout is off at inference",
        "norm_topk_prob": "the public modeling file renormalises the selected weights whatever it says",
        "sliding_window": "passed to the attention function, which ignores it for the sdpa/eager/flex kernels the "
                          "public modeling file supports; windows need use_sliding_window, which must be false",
        "max_window_layers": "read only with use_sliding_window, which must be false",
    },
    # LLaDA2.0's config.json also carries training-framework switches the public modeling file never reads
    # (use_rmsnorm, using_split_qkv_in_self_attention, norm_softmax). The file always uses RMSNorm, one fused
    # query_key_value projection and no softmax switch, which is what the published values say; others are refused.
    fixed={"hidden_act": ("silu",), "score_function": ("sigmoid",), "norm_head": (False,), "router_dtype": ("fp32",),
           "moe_router_enable_expert_bias": (True,), "use_sliding_window": (False,), "rope_scaling": (None,),
           "use_rmsnorm": (True,), "using_split_qkv_in_self_attention": (False,), "norm_softmax": (False,)},
)


def check(a: ModelArgs) -> None:
    if a.num_experts % a.n_group:
        raise ConfigError(f"num_experts={a.num_experts} is not a multiple of n_group={a.n_group}")
    if a.rotary_dim is not None and a.rotary_dim != a.rotated:
        raise ConfigError(f"rotary_dim={a.rotary_dim} disagrees with head_dim x partial_rotary_factor = {a.rotated}, "
                          "which the public modeling file rotates; not supported")


def build(config: dict[str, Any]):
    a = args_from_dict(ModelArgs, config, FIELDS)
    check(a)
    shape = LMShape(a.vocab_size, a.hidden_size, a.num_hidden_layers, a.num_experts, a.num_experts_per_tok,
                    a.max_position_embeddings, a.tie_word_embeddings)
    attn = AttentionArgs(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.dim, qkv_bias=a.use_qkv_bias,
                         o_bias=a.use_bias, qk_norm="head" if a.use_qk_norm else None, eps=a.rms_norm_eps)
    router = a.router()

    def make_mlp(i: int):
        if i < a.first_k_dense_replace:
            return SwiGLU(a.hidden_size, a.intermediate_size)
        shared = SwiGLU(a.hidden_size, a.moe_intermediate_size * a.num_shared_experts) if a.num_shared_experts else None
        return SparseMoE(i, a.hidden_size, router, shared=shared)

    rope = make_rope({"rope_theta": a.rope_theta}, a.rotated, a.max_position_embeddings)
    return build_decoder(shape, lambda i: FusedQKVAttention(i, attn), make_mlp, rope, a.rms_norm_eps)
