"""The decoder skeleton every family fills in: embeddings, layers (attention + dense or sparse MLP), norm, head."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from tiermoe.errors import ConfigError
from tiermoe.models.layers import ForwardBatch, RMSNorm, Rotary
from tiermoe.models.moe import SparseMoE


def args_from_dict(cls: type, config: dict[str, Any], aliases: dict[str, str] | None = None):
    """Build a family's args dataclass from config.json, ignoring keys it does not use.

    `aliases` maps a field to another key that some config versions use for it.
    """
    names = {f.name for f in fields(cls)}
    config = dict(config)
    for name, alias in (aliases or {}).items():
        if name not in config and alias in config:
            config[name] = config[alias]
    try:
        return cls(**{k: v for k, v in config.items() if k in names})
    except TypeError as e:
        raise ConfigError(f"config.json for {config.get('model_type')!r} is missing a required field: {e}") from e


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """rope settings from either transformers-5 `rope_parameters` or the older top-level keys."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def make_rotary(config: dict[str, Any], dim: int) -> Rotary:
    """Default RoPE computed here; scaled variants (yarn, linear, ...) from transformers' own tables."""
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        return Rotary.default(dim, params["rope_theta"])
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if params["rope_type"] not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(f"unsupported rope_type {params['rope_type']!r}")
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, "cpu")
    return Rotary(inv_freq, scaling)


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

    def __init__(self, shape: LMShape, layers: list[DecoderLayer], rotary: Rotary, eps: float):
        super().__init__()
        self.shape = shape
        self.rotary = rotary
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(shape.hidden_size, eps)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def moe_blocks(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids [T] -> final-normed hidden states [T, H]."""
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> fp32 logits [n, V]."""
        return self.lm_head(hidden).float()


def build_decoder(config: dict[str, Any], shape: LMShape, make_attn, make_mlp, rotary_dim: int,
                  eps: float) -> CausalLM:
    """Assemble a CausalLM from per-layer factories `make_attn(layer)` and `make_mlp(layer)`."""
    layers = [DecoderLayer(make_attn(i), make_mlp(i), shape.hidden_size, eps) for i in range(shape.num_layers)]
    return CausalLM(shape, layers, make_rotary(config, rotary_dim), eps)


def check_activation(config: dict[str, Any], key: str = "hidden_act") -> None:
    act = config.get(key, "silu")
    if act != "silu":
        raise ConfigError(f"{key}={act!r} is not supported (only 'silu')")
