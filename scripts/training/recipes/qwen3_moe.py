"""The autoregressive default model: transformers' Qwen3-MoE, next-token loss plus a per-layer balance loss."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .recipe import Recipe


def build_qwen3_moe(cfg: ModelConfig, special: dict) -> torch.nn.Module:
    """Build a randomly initialised transformers Qwen3MoeForCausalLM from ``cfg``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hf_cfg = Qwen3MoeConfig(
        vocab_size=special["vocab_size"],
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,  # unused: every layer is sparse
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=True,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=False,  # off for inference users; the loss asks for them explicitly
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        pad_token_id=special["pad"],
    )
    return Qwen3MoeForCausalLM(hf_cfg)


def load_balance_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style balance loss for one layer: E * sum_e (slot share of e) * (mean router prob of e); 1 = balanced.

    router_logits: [N, E].
    """
    num_experts = router_logits.shape[-1]
    probs = router_logits.float().softmax(dim=-1)  # [N, E]
    chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
    slots = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(dim=0) / top_k  # [E], sums to 1
    return num_experts * (slots * probs.mean(dim=0)).sum()


def causal_lm_loss(model: torch.nn.Module, batch: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy plus the balance loss averaged over layers.

    transformers' own aux loss pools all layers before balancing, which lets each layer favour different experts;
    balancing every layer separately is what keeps each layer's traffic spread (the engine caches per layer).
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T]
    out = model(input_ids=inputs, output_router_logits=True, use_cache=False)
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    aux = torch.stack([load_balance_loss(lg, cfg.top_k) for lg in out.router_logits]).mean()
    return ce + cfg.router_aux_loss_coef * aux, {"ce": ce.item(), "aux": aux.item()}


def hf_routed(model: torch.nn.Module, input_ids: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Per-layer chosen experts [B*T, k] of a transformers MoE model with a softmax router."""
    out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
    return [lg.float().softmax(-1).topk(cfg.top_k, dim=-1).indices for lg in out.router_logits]


def hf_save(model: torch.nn.Module, out_dir: Path) -> None:
    """bf16 safetensors with per-expert tensors and config.json, by transformers."""
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model.to(torch.float32)


def hf_load(out_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)


def hf_sample(model: torch.nn.Module, tokenizer, out_dir: Path, prompt: str, max_new_tokens: int) -> dict:
    """Greedy continuation by transformers' generate (the engine is tested to produce the same tokens)."""
    return {"prompt": prompt, "text": greedy_sample(model, tokenizer, prompt, max_new_tokens)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over all predicted positions of ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def greedy_sample(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` with transformers' generate (fp32, no sampling)."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train()
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


RECIPE = Recipe(
    build_model=build_qwen3_moe, loss_fn=causal_lm_loss, eval_loss=lambda m, w, cfg: evaluate(m, w),
    route=hf_routed, save=hf_save, load=hf_load, sample=hf_sample,
    run_dir="runs/shakespeare-moe", out_dir="tiermoe/assets/shakespeare-moe",
    loss_name="next-token cross-entropy", aux_name="per-layer balance loss (1 = balanced)",
    log_sample=greedy_sample,
)
