"""Tiny random checkpoints of the diffusion families, written by hand: transformers has no LLaDA family.

Each folder holds a config.json with the real configuration keys (LLaDA2MoeConfig, LLaDAConfig) and a
model.safetensors with the real checkpoint tensor names (modeling_llada2_moe.py, modeling_llada.py), so loading
them exercises each family's `sanitize`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 160
MASK_ID = VOCAB - 1

LLADA2_CONFIG = dict(
    model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"], vocab_size=VOCAB, hidden_size=64,
    intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    hidden_act="silu", use_qkv_bias=False, use_qk_norm=True, use_bias=False, norm_head=False, rms_norm_eps=1e-6,
    tie_word_embeddings=False, max_position_embeddings=1024, rope_theta=600000, rope_scaling=None,
    partial_rotary_factor=0.5, num_experts=16, num_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, moe_intermediate_size=32, first_k_dense_replace=1, score_function="sigmoid",
    router_dtype="fp32", moe_router_enable_expert_bias=True, norm_topk_prob=True, output_router_logits=False,
    pad_token_id=MASK_ID - 1,
    # Not in LLaDA2.0's config.json (its generate() hard-codes 156895), but accepted there and needed at this vocab.
    mask_token_id=MASK_ID,
)

LLADA_CONFIG = dict(
    model_type="llada", architectures=["LLaDAModelLM"], d_model=64, n_heads=4, n_kv_heads=4, n_layers=2,
    mlp_hidden_size=96, mlp_ratio=4, vocab_size=VOCAB, embedding_size=VOCAB, activation_type="silu",
    block_type="llama", block_group_size=1, layer_norm_type="rms", layer_norm_with_affine=True, rms_norm_eps=1e-5,
    rope=True, rope_theta=500000.0, rope_full_precision=True, alibi=False, alibi_bias_max=8.0, flash_attention=False,
    attention_layer_norm=False, attention_layer_norm_with_affine=True, include_bias=False, include_qkv_bias=False,
    bias_for_layer_norm=False, input_emb_norm=False, scale_logits=False, weight_tying=False,
    max_sequence_length=1024, multi_query_attention=None, attention_dropout=0.0, embedding_dropout=0.0,
    residual_dropout=0.0, init_device="meta", init_fn="mitchell", init_std=0.02, precision="amp_bf16",
    use_cache=False, eos_token_id=None, pad_token_id=MASK_ID - 1, mask_token_id=MASK_ID,
)


def llada2_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, as modeling_llada2_moe.py names them."""
    h, d, heads, kv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    moe, experts = c["moe_intermediate_size"], c["num_experts"]
    shapes = {"model.word_embeddings.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        shapes |= {f"{pre}.input_layernorm.weight": (h,), f"{pre}.post_attention_layernorm.weight": (h,),
                   f"{pre}.attention.query_key_value.weight": ((heads + 2 * kv) * d, h),
                   f"{pre}.attention.query_layernorm.weight": (d,), f"{pre}.attention.key_layernorm.weight": (d,),
                   f"{pre}.attention.dense.weight": (h, heads * d)}
        if i < c["first_k_dense_replace"]:
            shapes |= _mlp(f"{pre}.mlp", h, c["intermediate_size"])
            continue
        shapes |= {f"{pre}.mlp.gate.weight": (experts, h), f"{pre}.mlp.gate.expert_bias": (experts,)}
        shapes |= _mlp(f"{pre}.mlp.shared_experts", h, moe * c["num_shared_experts"])
        for e in range(experts):
            shapes |= _mlp(f"{pre}.mlp.experts.{e}", h, moe)
    return shapes


def llada_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, as modeling_llada.py's LLaDALlamaBlock names them."""
    h, ff, vocab = c["d_model"], c["mlp_hidden_size"], c["embedding_size"]
    shapes = {"model.transformer.wte.weight": (vocab, h), "model.transformer.ln_f.weight": (h,),
              "model.transformer.ff_out.weight": (vocab, h)}
    for i in range(c["n_layers"]):
        pre = f"model.transformer.blocks.{i}"
        shapes |= {f"{pre}.attn_norm.weight": (h,), f"{pre}.ff_norm.weight": (h,), f"{pre}.q_proj.weight": (h, h),
                   f"{pre}.k_proj.weight": (h, h), f"{pre}.v_proj.weight": (h, h), f"{pre}.attn_out.weight": (h, h),
                   f"{pre}.ff_proj.weight": (ff, h), f"{pre}.up_proj.weight": (ff, h), f"{pre}.ff_out.weight": (h, ff)}
    return shapes


def _mlp(prefix: str, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.gate_proj.weight": (intermediate, hidden), f"{prefix}.up_proj.weight": (intermediate, hidden),
            f"{prefix}.down_proj.weight": (hidden, intermediate)}


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("expert_bias"):
        return torch.rand(shape, generator=g) * 0.4 - 0.2  # large enough to change which experts are chosen
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)  # norm weights
    if name in ("lm_head.weight", "model.transformer.ff_out.weight"):
        return 0.6 * torch.randn(shape, generator=g)  # peaked predictions, so confidence thresholds are crossed
    return 0.15 * torch.randn(shape, generator=g)  # wide enough that routing and logits are far from ties


FAMILIES = {"llada2_moe": (LLADA2_CONFIG, llada2_tensors), "llada": (LLADA_CONFIG, llada_tensors)}


def build_tiny_diffusion(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Write config.json and model.safetensors of a tiny random `family` model into `folder`."""
    return build_diffusion_from_dict({**FAMILIES[family][0], **overrides}, folder, seed)


def build_diffusion_from_dict(config: dict, folder: Path, seed: int = 0) -> Path:
    """Write `config` as config.json (exactly as given) and random tensors of the shapes it implies."""
    tensors = FAMILIES[config["model_type"]][1]
    g = torch.Generator().manual_seed(seed)
    state = {name: random_tensor(name, shape, g) for name, shape in tensors(config).items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
