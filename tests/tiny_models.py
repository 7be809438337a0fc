"""Tiny random checkpoints of every supported family, built with transformers itself (nothing downloaded).

`per_expert` is what `save_pretrained` writes; `fused` stores the 3-D expert tensors
(`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`) as transformers holds them in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None)

FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=48,
                                         mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                         num_experts_per_tok=3, head_dim=24, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, clip_qkv=8.0)),
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                             kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                             qk_nope_head_dim=16, v_head_dim=16, topk_method="group_limited_greedy",
                                             n_group=4, topk_group=2, routed_scaling_factor=1.5,
                                             num_key_value_heads=4)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                             num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                                             kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                             qk_nope_head_dim=16, v_head_dim=16, n_group=4, topk_group=2,
                                             norm_topk_prob=True, routed_scaling_factor=2.5, num_key_value_heads=4)),
}


def make_reference(family: str, seed: int = 0):
    """A transformers model of `family` with random weights (router biases randomised too, so they matter)."""
    import transformers

    config_cls, extra = FAMILIES[family]
    return random_model(getattr(transformers, config_cls)(**{**COMMON, **extra}), seed)


def reference_from_dict(config: dict, seed: int = 0):
    """A transformers model built from a config.json dict as written on the hub (rope_scaling, auto_map, ...)."""
    import transformers

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    return random_model(transformers.AutoConfig.for_model(config["model_type"], **fields), seed)


def build_from_dict(config: dict, folder: Path, seed: int = 0):
    """Save a random transformers model of `config` with config.json exactly as given; returns (model, folder)."""
    model = reference_from_dict(config, seed)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return model, folder


def random_model(config, seed: int):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            # default init is tiny (std 0.02): widen it so routing and logits are far from ties
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return model.eval()


def build_tiny(family: str, folder: Path, layout: str = "per_expert", seed: int = 0) -> Path:
    model = make_reference(family, seed)
    model.save_pretrained(folder)
    if layout == "fused":
        _rewrite_fused(model, folder)
    return folder


def _rewrite_fused(model, folder: Path) -> None:
    """Replace the per-expert files by one file of the in-memory (fused 3-D) state dict."""
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert any("gate_up_proj" in k for k in state), "expected fused expert tensors in memory"
    json.loads((folder / "config.json").read_text())
