"""DeepSeek-V2 and -V3: multi-head latent attention (MLA), dense first layers, shared experts, and routers with
group-limited top-k (V2: softmax, groups scored by max; V3: sigmoid plus a selection-only correction bias, groups
scored by the sum of their top-2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tiermoe.models.config_fields import FieldRules, args_from_dict
from tiermoe.models.layers import (
    ForwardBatch,
    Linear,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    apply_rotary_interleaved,
    attend,
)
from tiermoe.models.moe import RouterArgs, SparseMoE
from tiermoe.models.rope import ROPE_CONFIG_KEYS, make_rope, softmax_scale_factor
from tiermoe.models.transformer import LMShape, build_decoder


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """The config.json fields honoured as transformers' DeepseekV2Config / DeepseekV3Config define them."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    num_experts_per_tok: int = 8
    n_shared_experts: int | None = None
    first_k_dense_replace: int = 0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    attention_bias: bool = False
    rope_interleave: bool = True  # V3 only: V2 always rotates interleaved pairs
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    @property
    def v3(self) -> bool:
        return self.model_type == "deepseek_v3"

    def router(self) -> RouterArgs:
        grouped = self.v3 or self.topk_method == "group_limited_greedy"
        return RouterArgs(
            self.n_routed_experts, self.num_experts_per_tok,
            scoring="sigmoid" if self.v3 else "softmax",
            norm_topk_prob=self.norm_topk_prob,
            scaling_factor=self.routed_scaling_factor,
            n_group=(self.n_group or 1) if grouped else 1,
            topk_group=(self.topk_group or 1) if grouped else 1,
            group_score="top2_sum" if self.v3 else "max",
            correction_bias=self.v3,
        )


class MLAttention(nn.Module):
    """Latent attention; the cache keeps the compressed latent [S, rank] and the shared rotary key [S, 1, r]."""

    def __init__(self, layer: int, a: ModelArgs, scale: float):
        super().__init__()
        self.layer, self.a, self.scale = layer, a, scale
        h, qk = a.num_attention_heads, a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank is None:
            self.q_proj = Linear(a.hidden_size, h * qk, bias=False)
        else:
            self.q_a_proj = Linear(a.hidden_size, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank)
            self.q_b_proj = Linear(a.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(a.hidden_size, a.kv_lora_rank + a.qk_rope_head_dim, bias=a.attention_bias)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank)
        self.kv_b_proj = Linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = Linear(h * a.v_head_dim, a.hidden_size, bias=a.attention_bias, fp32_out=True)
        self.rotate = apply_rotary_interleaved if (a.rope_interleave or not a.v3) else apply_rotary

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        a, T, h = self.a, x.shape[0], self.a.num_attention_heads
        q = self.q_proj(x) if a.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(T, h, -1).split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, rank]
        q_rot = self.rotate(q_rot, cos, sin)
        k_rot = self.rotate(k_rot.view(T, 1, -1), cos, sin)  # [T, 1, r]
        q = torch.cat((q_nope, q_rot), dim=-1)  # [T, h, qk]
        out = q.new_empty(T, h, a.v_head_dim)
        for s in batch.seqs:
            rows = slice(s.start, s.start + s.length)
            lat, kr = s.cache.update(self.layer, s.past, latent[rows], k_rot[rows])  # [S, rank], [S, 1, r]
            kv = self.kv_b_proj(lat).view(lat.shape[0], h, -1)  # [S, h, nope + v]
            k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
            k = torch.cat((k_nope, kr.expand(-1, h, -1)), dim=-1)  # [S, h, qk]
            out[rows] = attend(q[rows], k, v, s.past, self.scale)
        return self.o_proj(out.reshape(T, -1))


def sanitize(name: str) -> str:
    return name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")


_IGNORED = {
    "aux_loss_alpha": "load-balancing loss weight, training only",
    "seq_aux": "sequence-level balancing loss, training only",
    "ep_size": "expert-parallel degree of the original code, a deployment setting",
    "pretraining_tp": "tensor-parallel degree used in pretraining; transformers does not read it",
    "head_dim": "transformers recomputes it as qk_rope_head_dim",
    "qk_head_dim": "transformers recomputes it as qk_nope_head_dim + qk_rope_head_dim",
    "num_key_value_heads": "MLA expands keys and values for every query head (equal to num_attention_heads in "
                           "the published configs)",
}
# What transformers implements: MoE on every layer from first_k_dense_replace (moe_layer_freq 1), no MLP biases.
_FIXED = {"hidden_act": ("silu",), "moe_layer_freq": (1,), "mlp_bias": (False,)}
FIELDS = {
    # V2: softmax router, never renormalised; greedy or group-limited (max per group) top-k; interleaved rotary
    "deepseek_v2": FieldRules(ignored=_IGNORED, extra=ROPE_CONFIG_KEYS, fixed={
        **_FIXED, "scoring_func": ("softmax",), "topk_method": ("greedy", "group_limited_greedy"),
        "norm_topk_prob": (False,), "rope_interleave": (True,)}),
    # V3: sigmoid router with a selection-only bias, groups scored by their top-2 sum ("noaux_tc")
    "deepseek_v3": FieldRules(extra=ROPE_CONFIG_KEYS, fixed={
        **_FIXED, "scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",)}, ignored={
        **_IGNORED, "num_nextn_predict_layers": "the multi-token-prediction layer is not used by plain decoding "
                                                "(transformers skips it too)"}),
}


def build(config: dict[str, Any]):
    a = args_from_dict(ModelArgs, config, FIELDS[config["model_type"]])
    shape = LMShape(a.vocab_size, a.hidden_size, a.num_hidden_layers, a.n_routed_experts, a.num_experts_per_tok,
                    a.max_position_embeddings, a.tie_word_embeddings)
    # DeepSeek scales the softmax by yarn's mscale(factor, mscale_all_dim) squared when the rope is scaled
    scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5 * softmax_scale_factor(config)

    def make_mlp(i: int):
        if i < a.first_k_dense_replace:
            return SwiGLU(a.hidden_size, a.intermediate_size)
        shared = SwiGLU(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts) if a.n_shared_experts else None
        return SparseMoE(i, a.hidden_size, a.router(), shared=shared)

    return build_decoder(shape, lambda i: MLAttention(i, a, scale), make_mlp,
                         make_rope(config, a.qk_rope_head_dim, a.max_position_embeddings), a.rms_norm_eps)
