"""LLaDA (dense, e.g. LLaDA-8B): a masked-diffusion transformer in OLMo's layout with the "llama" block: RMSNorm,
separate q/k/v projections, SwiGLU MLP, full rotary, no experts (the expert store simply has no MoE layers).
Attention is bidirectional over the whole sequence (see tiermoe.decode.diffusion).

Checkpoint names (GSAI-ML/LLaDA-8B-Instruct modeling_llada.py, LLaDALlamaBlock) -> canonical names:
  model.transformer.wte           -> model.embed_tokens        model.transformer.ln_f   -> model.norm
  model.transformer.ff_out        -> lm_head
  model.transformer.blocks.N.X    -> model.layers.N.Y with X -> Y from BLOCK_RENAMES
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tiermoe.errors import ConfigError
from tiermoe.models.attention import Attention, AttentionArgs
from tiermoe.models.config_fields import FieldRules, args_from_dict
from tiermoe.models.diffusion import DiffusionSpec
from tiermoe.models.layers import SwiGLU
from tiermoe.models.rope import make_rope
from tiermoe.models.transformer import LMShape, build_decoder

# The public generate.py hard-codes mask id 126336 (<|mdm_mask|>); EOS 126081 is <|endoftext|>.
DIFFUSION = DiffusionSpec("full", mask_token_id=126336, eos_token_id=126081)


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """config.json keys of LLaDAConfig (OLMo's ModelConfig); defaults are that class's."""

    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    n_kv_heads: int | None = None
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = None
    embedding_size: int | None = None
    activation_type: str = "swiglu"
    block_type: str = "sequential"
    layer_norm_type: str = "default"
    rms_norm_eps: float = 1e-5
    rope: bool = False
    alibi: bool = False
    attention_layer_norm: bool = False
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    bias_for_layer_norm: bool | None = None
    input_emb_norm: bool = False
    scale_logits: bool = False
    weight_tying: bool = True
    max_sequence_length: int = 1024
    rope_theta: float = 10000.0
    mask_token_id: int | None = None  # read by tiermoe.models.diffusion (the public generate.py hard-codes it)


FIELDS = FieldRules(
    ignored={
        "embedding_dropout": "dropout is off at inference",
        "residual_dropout": "dropout is off at inference",
        "init_device": "where untrained weights are initialised",
        "init_fn": "random initialisation of untrained weights only",
        "init_std": "random initialisation of untrained weights only",
        "init_cutoff_factor": "random initialisation of untrained weights only",
        "precision": "training mixed-precision setting; the engine's dtype option sets compute",
        "flash_attention": "kernel choice, same attention",
        "rope_full_precision": "rotary tables are always computed in fp32 here",
        "block_group_size": "groups blocks for FSDP wrapping in training",
        "alibi_bias_max": "read only with alibi, which must be false",
        "multi_query_attention": "superseded by n_kv_heads in LLaDA's config class",
        "layer_norm_with_affine": "RMSNorm weights are loaded from the checkpoint",
        "attention_layer_norm_with_affine": "q/k norm weights are loaded from the checkpoint when present",
    },
)


# Inside a block: checkpoint module -> canonical module.
BLOCK_RENAMES = {
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "ff_proj": "mlp.gate_proj",  # silu(ff_proj(x)) * up_proj(x): ff_proj is the gate
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
TOP_RENAMES = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
BLOCK_KEY = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$")


def sanitize(name: str) -> str:
    if name in TOP_RENAMES:
        return TOP_RENAMES[name]
    m = BLOCK_KEY.match(name)
    if m and m[2] in BLOCK_RENAMES:
        return f"model.layers.{m[1]}.{BLOCK_RENAMES[m[2]]}.{m[3]}"
    return name


def check(a: ModelArgs) -> None:
    """Refuse the OLMo variants this module does not implement (also when absent fields default to them)."""
    unsupported = {
        "block_type": (a.block_type, "llama"),
        "activation_type": (a.activation_type, "silu"),
        "layer_norm_type": (a.layer_norm_type, "rms"),
        "rope": (a.rope, True),
        "alibi": (a.alibi, False),
        "input_emb_norm": (a.input_emb_norm, False),
        "scale_logits": (a.scale_logits, False),
        "bias_for_layer_norm": (bool(a.include_bias if a.bias_for_layer_norm is None else a.bias_for_layer_norm),
                                False),
    }
    for key, (value, needed) in unsupported.items():
        if value != needed:
            raise ConfigError(f"llada with {key}={value!r} is not supported (only {needed!r})")


def build(config: dict[str, Any]):
    a = args_from_dict(ModelArgs, config, FIELDS)
    check(a)
    head_dim = a.d_model // a.n_heads
    vocab = a.embedding_size or a.vocab_size  # the embedding and the head have embedding_size rows
    shape = LMShape(vocab, a.d_model, a.n_layers, 0, 0, a.max_sequence_length, a.weight_tying)
    attn = AttentionArgs(a.d_model, a.n_heads, a.n_kv_heads or a.n_heads, head_dim,
                         qkv_bias=bool(a.include_bias or a.include_qkv_bias), o_bias=a.include_bias,
                         qk_norm="full" if a.attention_layer_norm else None, eps=a.rms_norm_eps)
    hidden = a.mlp_hidden_size or a.mlp_ratio * a.d_model
    return build_decoder(shape, lambda i: Attention(i, attn), lambda i: SwiGLU(a.d_model, hidden, bias=a.include_bias),
                         make_rope({"rope_theta": a.rope_theta}, head_dim, a.max_sequence_length), a.rms_norm_eps)
