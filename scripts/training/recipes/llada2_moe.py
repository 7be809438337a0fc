"""Training side of the diffusion default model: a LLaDA2.0-MoE-shaped model and its block-diffusion loss.

Used by scripts/train_model.py (``--model-type llada2_moe``). The model is a batched re-statement of tiermoe's
`llada2_moe` family built from the engine's own layers (RMSNorm, SwiGLU, partial rotary, the group-limited sigmoid
Router), saved under LLaDA2.0's checkpoint names, so the engine reads the result as it reads the published models;
`engine_agreement` checks that it computes the same logits.

Loss (block diffusion, as BD3-LM and LLaDA2.0 train): each window of T tokens is split into blocks of
`block_length`; every block gets its own mask ratio t ~ U(eps, 1) and each token is replaced by the mask token with
probability t. The model sees [noisy copy ; clean copy] (2T rows, the same positions twice) under a mask where a
noisy block attends to itself (bidirectionally) and to the clean blocks before it, and a clean block attends to the
clean blocks up to itself. That is exactly what the engine's block-causal decoder shows a block being denoised (the
finished blocks' K/V, computed block-causally, plus the partially committed block), so one forward trains every
block. Cross-entropy is averaged over masked positions (the ELBO's 1/t weight is dropped: lower-variance gradients).

Experts are balanced as in DeepSeek-V3 (whose router LLaDA2.0 uses): after each step every MoE layer's `expert_bias`
(used for selection only) moves by `bias_update_rate` toward under-loaded experts, plus a small Switch-style balance
loss on the normalised sigmoid scores (`router_aux_loss_coef`). The bias alone is too slow for a 2,400-step run: every
layer collapsed onto one expert within 30 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tiermoe.models.layers import RMSNorm, Rotary, SwiGLU, apply_rotary
from tiermoe.models.llada2_moe import RENAMES
from tiermoe.models.moe import Router, RouterArgs

from ..config import ModelConfig
from ..tokenizer import BOS, EOS, MASK, PAD
from .recipe import Recipe

EPS = 1e-3  # smallest mask ratio of a block


def hf_config(cfg, special: dict) -> dict:
    """config.json of the model (LLaDA2MoeConfig keys, with the mask token named since the vocabulary is ours)."""
    return dict(
        model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"], vocab_size=special["vocab_size"],
        hidden_size=cfg.hidden_size, intermediate_size=cfg.dense_intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", use_qkv_bias=False, use_qk_norm=True, use_bias=False,
        norm_head=False, rms_norm_eps=1e-6, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        partial_rotary_factor=0.5, num_experts=cfg.num_experts, num_shared_experts=cfg.num_shared_experts,
        num_experts_per_tok=cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group,
        routed_scaling_factor=cfg.routed_scaling_factor, moe_intermediate_size=cfg.moe_intermediate_size,
        first_k_dense_replace=cfg.first_k_dense_replace, score_function="sigmoid", router_dtype="fp32",
        moe_router_enable_expert_bias=True, norm_topk_prob=True, output_router_logits=False,
        bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["pad"],
        mask_token_id=special["mask"],
    )


class Attention(nn.Module):
    """Fused-QKV grouped-query attention with per-head q/k RMSNorm and partial rotary, over a given mask."""

    def __init__(self, c: dict):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(c["hidden_size"], width, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim, c["rms_norm_eps"]), RMSNorm(self.head_dim, c["rms_norm_eps"])
        self.o_proj = nn.Linear(self.heads * self.head_dim, c["hidden_size"], bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, S, H], cos/sin [S, d_rot], mask [S, S] (True: may attend) -> [B, S, H]."""
        B, S, _ = x.shape
        qkv = self.query_key_value(x).view(B, S, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)  # [B, S, h|g, d]
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True)  # [B, h, S, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MoE(nn.Module):
    """Routed experts (engine Router: sigmoid scores, group-limited top-k with expert_bias) plus a shared expert."""

    def __init__(self, c: dict):
        super().__init__()
        h, inter = c["hidden_size"], c["moe_intermediate_size"]
        self.gate = Router(h, RouterArgs(c["num_experts"], c["num_experts_per_tok"], scoring="sigmoid",
                                         norm_topk_prob=True, scaling_factor=c["routed_scaling_factor"],
                                         n_group=c["n_group"], topk_group=c["topk_group"], group_score="top2_sum",
                                         correction_bias=True, fp32_logits=True))
        self.experts = nn.ModuleList(SwiGLU(h, inter) for _ in range(c["num_experts"]))
        self.shared_expert = SwiGLU(h, inter * c["num_shared_experts"])
        self.load = torch.zeros(c["num_experts"])  # routed token-slots since the last bias update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, H]."""
        weights, ids = self.gate(x)  # [N, k], [N, k]
        if self.training:  # balancing statistics: only training traffic moves the bias
            slots = torch.bincount(ids.flatten(), minlength=len(self.experts))  # [E]
            self.load += slots
            scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()  # [N, E], as the Router scores them
            probs = scores / scores.sum(-1, keepdim=True)
            self.balance = len(self.experts) * (slots / ids.numel() * probs.mean(0)).sum()  # 1 = balanced
        out = self.shared_expert(x)
        for e in ids.unique().tolist():
            rows, slot = (ids == e).nonzero(as_tuple=True)
            # in place: autograd's index_add_ needs no copy of `out` (the out-of-place form copied [N, H] per expert)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None].to(x.dtype))
        return out

    def update_bias(self, rate: float) -> None:
        """Move selection bias toward under-loaded experts (aux-loss-free balancing), then reset the counts."""
        bias = self.gate.e_score_correction_bias
        bias += rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


class Layer(nn.Module):
    """Pre-norm decoder layer: attention, then a dense MLP (the first `first_k_dense_replace` layers) or the MoE."""

    def __init__(self, c: dict, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        dense = index < c["first_k_dense_replace"]
        self.mlp = SwiGLU(c["hidden_size"], c["intermediate_size"]) if dense else MoE(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        return x + self.mlp(h.flatten(0, 1)).view_as(h)


class Llada2Model(nn.Module):
    """The whole model, with the engine's canonical parameter names (see `checkpoint_name` for the file's)."""

    def __init__(self, c: dict):
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(Layer(c, i) for i in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if c["tie_word_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary.default(int(c["head_dim"] * c["partial_rotary_factor"]), c["rope_theta"])
        self.apply(_init_weights)

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [B, S] at positions [S] under mask [S, S] -> final-normed hidden states [B, S, H]."""
        x = self.model.embed_tokens(ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm(x)


def _init_weights(module: nn.Module) -> None:
    """Normal(0, 0.02) for matrices and the router (the engine's Router starts at zeros: it is always loaded)."""
    if isinstance(module, (nn.Linear, nn.Embedding, Router)):
        nn.init.normal_(module.weight, std=0.02)


def block_causal_mask(length: int, block: int) -> torch.Tensor:
    """[S, S] bool: a row sees the columns whose block is not after its own (the engine's generation-time mask)."""
    blocks = torch.arange(length) // block
    return blocks[None, :] <= blocks[:, None]


def noisy_clean_mask(length: int, block: int) -> torch.Tensor:
    """[2T, 2T] bool for [noisy ; clean]: noisy block b sees noisy block b and clean blocks < b; clean is
    block-causal; clean never sees noisy."""
    blocks = torch.arange(length) // block
    same = blocks[:, None] == blocks[None, :]
    before = blocks[None, :] < blocks[:, None]
    top = torch.cat([same, before], dim=1)  # noisy queries
    bottom = torch.cat([torch.zeros_like(same), block_causal_mask(length, block)], dim=1)  # clean queries
    return torch.cat([top, bottom], dim=0)


def masked_ce(model: Llada2Model, batch: torch.Tensor, cfg, mask_id: int,
              gen: torch.Generator | None = None) -> torch.Tensor:
    """Mean cross-entropy of the masked positions of a noised batch. batch [B, T + 1] (the last column is unused)."""
    x0 = batch[:, :-1]  # [B, T]
    B, T = x0.shape
    if T % cfg.block_length:
        raise ValueError(f"seq_len {T} is not a multiple of block_length {cfg.block_length}")
    ratio = torch.rand(B, T // cfg.block_length, generator=gen).clamp_min(EPS)  # [B, blocks]
    masked = torch.rand(B, T, generator=gen) < ratio.repeat_interleave(cfg.block_length, dim=1)  # [B, T]
    xt = x0.masked_fill(masked, mask_id)
    positions = torch.arange(T).repeat(2)
    hidden = model.hidden(torch.cat([xt, x0], dim=1), positions, noisy_clean_mask(T, cfg.block_length))
    logits = model.lm_head(hidden[:, :T][masked])  # [M, V]: only the rows that are scored
    return F.cross_entropy(logits.float(), x0[masked])


def diffusion_loss(model: Llada2Model, batch: torch.Tensor, cfg) -> tuple[torch.Tensor, dict]:
    """Training loss for one batch; also applies the expert-bias update of this step."""
    ce = masked_ce(model, batch, cfg, model.config["mask_token_id"])
    balance = torch.stack([m.balance for m in model.moe_layers]).mean()
    imbalance = torch.stack([m.load.max() / m.load.mean() for m in model.moe_layers]).mean()
    for moe in model.moe_layers:
        moe.update_bias(cfg.bias_update_rate)
    # "aux" in the log: mean over layers of max / mean expert load
    return ce + cfg.router_aux_loss_coef * balance, {"ce": ce.item(), "aux": imbalance.item()}


@torch.no_grad()
def eval_masked_ce(model: Llada2Model, windows: torch.Tensor, cfg, batch_size: int = 16, seed: int = 0) -> float:
    """Masked-token cross-entropy on `windows` with a fixed noise draw (comparable across evaluations)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [masked_ce(model, chunk, cfg, model.config["mask_token_id"], gen) for chunk in windows.split(batch_size)]
    model.train()
    return torch.stack(losses).mean().item()


@torch.no_grad()
def routed_experts(model: Llada2Model, ids: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Per MoE layer, the experts chosen for each row of clean text under the block-causal mask: [B*T, k]."""
    chosen = []
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[1])) for m in model.moe_layers]
    try:
        model.hidden(ids, torch.arange(ids.shape[1]), block_causal_mask(ids.shape[1], block))
    finally:
        for hook in hooks:
            hook.remove()
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Files: LLaDA2.0's checkpoint names

# The engine's rename table, reversed pair by pair (same order: specific names before the generic ".attention.").
TO_CHECKPOINT = tuple((ours, theirs) for theirs, ours in RENAMES)


def checkpoint_name(name: str) -> str:
    """Engine name -> LLaDA2.0 checkpoint name (the inverse of tiermoe.models.llada2_moe.sanitize)."""
    for ours, theirs in TO_CHECKPOINT:
        if ours in name:
            return name.replace(ours, theirs)
    return name


def save(model: Llada2Model, out_dir: Path) -> None:
    """model.safetensors (bf16, per-expert tensors, LLaDA2.0 names) and config.json."""
    tied = model.config["tie_word_embeddings"]
    tensors = {checkpoint_name(n): t.detach().to(torch.bfloat16).contiguous()
               for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({**model.config, "dtype": "bfloat16"}, indent=2) + "\n")


def load(out_dir: Path) -> Llada2Model:
    """Read a saved folder back in fp32 (the shipped, bf16-rounded weights)."""
    config = json.loads((out_dir / "config.json").read_text())
    model = Llada2Model(config)
    names = {checkpoint_name(n): n for n in model.state_dict()}
    state = {names[n]: t.float() for n, t in load_file(out_dir / "model.safetensors").items()}
    model.load_state_dict(state, strict=not config["tie_word_embeddings"])
    return model


@torch.no_grad()
def engine_agreement(model: Llada2Model, out_dir: Path, ids: torch.Tensor, block: int) -> float:
    """Largest |logit difference| between this module and tiermoe's engine on clean text ids [T], block-causal."""
    from tiermoe.decode.kv_cache import KVCache
    from tiermoe.llm import LLM
    from tiermoe.models.layers import ForwardBatch, SeqSlice

    n = ids.shape[0]
    engine = LLM(out_dir).model
    positions = torch.arange(n)
    ours = model.lm_head(model.hidden(ids[None], positions, block_causal_mask(n, block))[0])
    theirs = engine.logits(engine(ids, ForwardBatch(positions, [SeqSlice(KVCache(n), 0, n, 0)], attn_block=block)))
    return (ours.float() - theirs).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Recipe: what the loop and the report call


def build_llada2(cfg: ModelConfig, special: dict) -> torch.nn.Module:
    return Llada2Model(hf_config(cfg, special))


def llada2_routed(model: torch.nn.Module, input_ids: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return routed_experts(model, input_ids, cfg.block_length)


def llada2_checks(model: torch.nn.Module, out_dir: Path, val: torch.Tensor, cfg: ModelConfig) -> dict:
    """The engine must compute what was trained: logits of a validation window, block-causal, both ways."""
    diff = engine_agreement(model, out_dir, val[0, :-1], cfg.block_length)
    return {"engine_max_abs_logit_diff": diff, "engine_logits_window_tokens": val.shape[1] - 1}


def engine_sample(model: torch.nn.Module, tokenizer, out_dir: Path, prompt: str, max_new_tokens: int) -> dict:
    """Greedy block diffusion by tiermoe's engine from the saved folder, with its work (NFE, tokens per forward)."""
    from tiermoe import LLM, SamplingParams

    out = LLM(out_dir).generate(prompt, SamplingParams(temperature=0, max_tokens=max_new_tokens))[0]
    work = {k: out.stats["diffusion"][k] for k in ("nfe", "tokens_per_forward", "blocks")}
    return {"prompt": prompt, "text": out.outputs[0].text, "engine": "tiermoe (block diffusion, greedy)", **work}


RECIPE = Recipe(
    build_model=build_llada2, loss_fn=diffusion_loss, eval_loss=eval_masked_ce,
    route=llada2_routed, save=save, load=load, sample=engine_sample,
    run_dir="runs/shakespeare-dllm", out_dir="tiermoe/assets/shakespeare-dllm",
    loss_name="masked-token cross-entropy (block diffusion, mask ratio ~ U(0.001, 1) per block, fixed draw)",
    aux_name="max / mean expert load, mean over MoE layers (1 = balanced)",
    special_tokens=(BOS, EOS, PAD, MASK), train_defaults={"steps": 2400, "seq_len": 128}, checks=llada2_checks,
)
