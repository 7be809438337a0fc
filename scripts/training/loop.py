"""The optimisation: seeding, learning-rate schedule, optimizer, checkpoints and the resumable training loop."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import REPO, RunConfig, TrainConfig
from .data import eval_windows, sample_batch
from .recipes import Recipe


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
            if recipe.log_sample is not None:
                log("sample: " + repr(recipe.log_sample(model, tokenizer, "ROMEO:", 40)))
        if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.steps:
            save_checkpoint(ckpt_path, model, optimizer, state)
        t0, c0 = time.time(), time.process_time()  # eval and checkpoint time are not training time
    if bench:
        log(f"bench: {tokens / state['wall_s']:.0f} tokens/s wall over {bench} steps (includes warm-up)")
    return state


def log(msg: str) -> None:
    """Timestamped progress line on stdout."""
    print(time.strftime("%H:%M:%S"), msg, flush=True)
