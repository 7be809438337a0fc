"""Prefetchers: predict the next MoE layer's experts while this layer runs, so their reads start early.

- `residual` (DALI): the next layer's router input is this layer's plus what the layers in between add; DALI
  approximates that addition by its mean over calibration text (a per-layer residual vector), adds it to the current
  router input, and applies the next layer's router. `plain` applies the next router to the current input unchanged.
- `affinity` (Yao et al. 2024, "Exploiting Inter-Layer Expert Affinity for Accelerating MoE Inference"): which
  experts layer l+1 picks is predictable from which experts layer l picked. A table per pair of consecutive MoE
  layers, P(expert j at l+1 | expert i at l), fitted on routing traces (`tiermoe prefetch train`), scores the next
  layer's experts from this layer's choice; the last MoE layer predicts the next token's first, so the reads of the
  next token start during the lm_head.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiermoe.errors import ConfigError
from tiermoe.models.transformer import CausalLM
from tiermoe.offload.placement.costs import cache_dir

CALIBRATION_FILE = "tiermoe_residuals.safetensors"
AFFINITY_FILE = "tiermoe_affinity.safetensors"
PREFETCHERS = ("residual", "plain", "affinity")


class ResidualPrefetcher:
    """Per MoE layer: which experts the next MoE layer will most likely want (top-p per token)."""

    def __init__(self, model: CausalLM, residuals: dict[int, torch.Tensor] | None, top_p: int = 1):
        blocks = model.moe_blocks
        self.next = {a.layer: b for a, b in zip(blocks, blocks[1:], strict=False)}
        self.residuals = residuals or {}
        self.top_p = top_p

    def predict(self, layer: int, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[int, list[int]] | None:
        """x [T, H] is `layer`'s router input (ids [T, A] its choice, unused); returns (next MoE layer, predicted
        experts) or None at the last."""
        nxt = self.next.get(layer)
        if nxt is None:
            return None
        delta = self.residuals.get(layer)
        _, pred = nxt.gate(x if delta is None else x + delta.to(x.dtype))  # [T, A], best first
        return nxt.layer, torch.unique(pred[:, : self.top_p]).tolist()


@dataclass(frozen=True)
class AffinityTable:
    """Per pair of consecutive MoE layers (and the last layer -> the next token's first), P(j | i): the chance that
    the next layer picks expert j when this layer picked expert i, smoothed towards j's overall frequency."""

    probs: torch.Tensor  # [L, E, E]: row i of pair l = P(expert j at the layer after l | expert i at l)
    top_p: int  # experts predicted per token at most, chosen on validation routing
    combine: str  # how the rows of a token's experts are combined: "mean" or "max"
    # ...and only those scoring at least this: a read ahead that the next layer does not use costs disk time
    min_prob: float = 0.0
    info: dict = field(default_factory=dict)  # how it was fitted (traces, split, settings, held-out quality)

    def scores(self, pair: int, ids: torch.Tensor) -> torch.Tensor:
        """ids [T, A] chosen at the pair's first layer (-1: not computed) -> [T, E] scores of the next layer's."""
        rows = self.probs[pair][ids.clamp(min=0)] * (ids >= 0)[..., None]  # [T, A, E]
        return rows.amax(1) if self.combine == "max" else rows.mean(1)

    def ranked(self, pair: int, ids: torch.Tensor, top_p: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-p next-layer experts per token, best first, and their scores: [T, p] each."""
        values, experts = self.scores(pair, ids).topk(top_p or self.top_p, dim=-1)
        return experts, values

    def predict(self, pair: int, ids: torch.Tensor, top_p: int | None = None) -> list[int]:
        """The distinct next-layer experts among each token's top-p that score at least `min_prob`."""
        experts, values = self.ranked(pair, ids, top_p)
        return torch.unique(experts[values >= self.min_prob]).tolist()

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"top_p": str(self.top_p), "combine": self.combine, "min_prob": repr(self.min_prob),
                "info": json.dumps(self.info)}
        # a name no checkpoint uses: the model's loader indexes every .safetensors file of its folder
        save_file({"affinity_probs": self.probs.float().contiguous()}, path, metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path) -> AffinityTable:
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                meta, probs = f.metadata() or {}, f.get_tensor("affinity_probs")
            table = cls(probs, int(meta["top_p"]), meta["combine"], float(meta["min_prob"]),
                        json.loads(meta.get("info", "{}")))
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"{path} is not an affinity table written by `tiermoe prefetch train` ({e})") from None
        if probs.dim() != 3 or probs.shape[1] != probs.shape[2] or table.combine not in COMBINE:
            raise ConfigError(f"{path}: an affinity table holds probs [pairs, experts, experts] and combine in "
                              f"{COMBINE}; got {tuple(probs.shape)} and {table.combine!r}")
        return table


COMBINE = ("mean", "max")


class AffinityPrefetcher:
    """Predicts the next MoE layer's experts from this layer's choice with an `AffinityTable`."""

    def __init__(self, model: CausalLM, table: AffinityTable, top_p: int | None = None):
        layers = [b.layer for b in model.moe_blocks]
        pairs, experts = len(layers), model.shape.num_experts
        if tuple(table.probs.shape) != (pairs, experts, experts):
            raise ConfigError(f"the affinity table is for {table.probs.shape[0]} MoE layers x "
                              f"{table.probs.shape[1]} experts; the model has {pairs} x {experts}: fit one on this "
                              f"model's routing with `tiermoe prefetch train`")
        self.table, self.top_p = table, top_p or table.top_p
        # pair l predicts layer l+1's experts; the last layer predicts the next token's first
        self.next = {a: (i, b) for i, (a, b) in enumerate(zip(layers, layers[1:] + layers[:1], strict=True))}

    def predict(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> tuple[int, list[int]] | None:
        """ids [T, A]: the experts `layer` chose; returns (the MoE layer after it, predicted experts)."""
        pair, nxt = self.next[layer]
        return nxt, self.table.predict(pair, ids, self.top_p)


def make_prefetcher(kind: str, model: CausalLM, folder: Path, top_p: int | None = None):
    """The prefetcher named `kind` (PREFETCHERS) for `model`, its calibration read from beside the checkpoint in
    `folder` (or the user's cache); `top_p` experts predicted per token (None: 1 for residual and plain, as DALI
    found best, the validated count stored in the table for affinity)."""
    if kind not in PREFETCHERS:
        raise ConfigError(f"unknown prefetcher {kind!r}; choose one of {', '.join(PREFETCHERS)}")
    if kind == "plain":
        return ResidualPrefetcher(model, None, top_p or 1)
    if kind == "affinity":
        path = calibration_path(folder, AFFINITY_FILE)
        if not path.exists():
            raise ConfigError(f"{path} not found: run `tiermoe prefetch train --model {folder} --trace ROUTING.npz` "
                              "first")
        return AffinityPrefetcher(model, AffinityTable.load(path), top_p)
    path = residuals_path(folder)
    if not path.exists():
        raise ConfigError(f"{path} not found: run `tiermoe calibrate --model {folder}` first")
    return ResidualPrefetcher(model, load_residuals(path), top_p or 1)


def residuals_path(folder: Path, writing: bool = False) -> Path:
    """Where the calibrated residuals of the model in `folder` are (or go): see `calibration_path`."""
    return calibration_path(folder, CALIBRATION_FILE, writing)


def calibration_path(folder: Path, name: str, writing: bool = False) -> Path:
    """Where a calibration file of the model in `folder` is (or goes): beside the model when its folder can be
    written and is not part of the installed package, else ~/.cache/tiermoe/<model>-<hash>/. Reading prefers the
    file beside the model."""
    beside = Path(folder) / name
    if beside.exists() and not writing or writing and writable_model_folder(folder):
        return beside
    return model_cache_dir(folder) / name


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
