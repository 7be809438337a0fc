"""Load a Hugging Face folder: build the family's modules, read every non-expert weight, check every expert."""

from __future__ import annotations

from pathlib import Path

import torch

from tiermoe.checkpoint import CheckpointIndex
from tiermoe.errors import CheckpointError
from tiermoe.models.registry import family, read_config
from tiermoe.models.transformer import CausalLM


def load_model(folder: str | Path, dtype: torch.dtype) -> tuple[CausalLM, CheckpointIndex, dict]:
    """Returns the model with non-expert weights loaded, the checkpoint index for the experts, and config.json.

    Tensors the model does not use (e.g. DeepSeek-V3's multi-token-prediction layer) are ignored, as transformers
    does; a tensor it needs that is absent raises CheckpointError naming it.
    """
    config = read_config(folder)
    fam = family(config["model_type"])
    with torch.device("meta"):
        model = fam.build(config)
    index = CheckpointIndex(folder, fam.sanitize)
    index.check_experts([b.layer for b in model.moe_blocks], model.shape.num_experts)
    state = {}
    for name, meta in model.state_dict().items():
        if not index.has(name):
            if name == "lm_head.weight" and model.shape.tie_word_embeddings:
                continue
            raise CheckpointError(f"{folder}: missing tensor {name}")
        tensor = index.load(name)
        if tuple(tensor.shape) != tuple(meta.shape):
            raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(meta.shape)}")
        state[name] = tensor.to(dtype)
    if model.shape.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if model.shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.fuse_weights()
    return model.eval(), index, config
