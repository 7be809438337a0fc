"""DALI's residual-based prefetch: predict the next MoE layer's experts from this layer's router input.

The next layer's router input is this layer's plus what the layers in between add; DALI approximates that addition
by its mean over calibration text (a per-layer residual vector), adds it to the current router input, and applies
the next layer's router. The `plain` variant applies the next router to the current input unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiermoe.errors import ConfigError
from tiermoe.models.transformer import CausalLM
from tiermoe.offload.placement.costs import cache_dir

CALIBRATION_FILE = "tiermoe_residuals.safetensors"
PREFETCHERS = ("residual", "plain")


class ResidualPrefetcher:
    """Per MoE layer: which experts the next MoE layer will most likely want (top-p per token)."""

    def __init__(self, model: CausalLM, residuals: dict[int, torch.Tensor] | None, top_p: int = 1):
        blocks = model.moe_blocks
        self.next = {a.layer: b for a, b in zip(blocks, blocks[1:], strict=False)}
        self.residuals = residuals or {}
        self.top_p = top_p

    def predict(self, layer: int, x: torch.Tensor) -> tuple[int, list[int]] | None:
        """x [T, H] is `layer`'s router input; returns (next MoE layer, predicted experts) or None at the last."""
        nxt = self.next.get(layer)
        if nxt is None:
            return None
        delta = self.residuals.get(layer)
        _, ids = nxt.gate(x if delta is None else x + delta.to(x.dtype))  # [T, A], best first
        return nxt.layer, torch.unique(ids[:, : self.top_p]).tolist()


def make_prefetcher(kind: str, model: CausalLM, folder: Path, top_p: int) -> ResidualPrefetcher:
    if kind not in PREFETCHERS:
        raise ConfigError(f"unknown prefetcher {kind!r}; choose one of {', '.join(PREFETCHERS)}")
    if kind == "plain":
        return ResidualPrefetcher(model, None, top_p)
    path = residuals_path(folder)
    if not path.exists():
        raise ConfigError(f"{path} not found: run `tiermoe calibrate --model {folder}` first")
    return ResidualPrefetcher(model, load_residuals(path), top_p)


def residuals_path(folder: Path, writing: bool = False) -> Path:
    """Where the calibrated residuals of the model in `folder` are (or go): beside the model when its folder can be
    written and is not part of the installed package, else ~/.cache/tiermoe/<model>-<hash>/. Reading prefers the
    file beside the model."""
    beside = Path(folder) / CALIBRATION_FILE
    if beside.exists() and not writing or writing and writable_model_folder(folder):
        return beside
    return model_cache_dir(folder) / CALIBRATION_FILE


def writable_model_folder(folder: Path) -> bool:
    package = Path(__file__).resolve().parents[1]
    folder = Path(folder).resolve()
    return os.access(folder, os.W_OK) and not folder.is_relative_to(package)


def model_cache_dir(folder: Path) -> Path:
    """The user's cache folder of one checkpoint: its name and a hash of its path and weight files' sizes and times
    (a changed checkpoint gets a new folder)."""
    folder = Path(folder).resolve()
    state = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir())
             if p.suffix in (".safetensors", ".bin")]
    digest = hashlib.sha256(json.dumps([os.fspath(folder), state]).encode()).hexdigest()[:16]
    return cache_dir() / f"{folder.name}-{digest}"


def save_residuals(path: Path, residuals: dict[int, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"layer.{k}": v.float().contiguous() for k, v in residuals.items()}, path)


def load_residuals(path: Path) -> dict[int, torch.Tensor]:
    return {int(k.split(".")[1]): v for k, v in load_file(path).items()}
