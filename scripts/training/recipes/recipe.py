"""A recipe: everything the loop and the report need to know about one model family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig
from ..tokenizer import BOS, EOS, PAD


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
    # (model, tokenizer, prompt, n) -> a greedy continuation for the training log at every evaluation; None: none
    log_sample: Callable[[torch.nn.Module, object, str, int], str] | None = None
    train_defaults: dict = field(default_factory=dict)  # TrainConfig fields this family trains with by default
    # (shipped model, folder, validation windows [W, T+1], model config) -> extra checks for the report
    checks: Callable[[torch.nn.Module, Path, torch.Tensor, ModelConfig], dict] | None = None
