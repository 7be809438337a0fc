"""What a masked-diffusion family (LLaDA, LLaDA2) tells the engine besides its modules.

A family module that decodes by unmasking rather than by appending exposes `DIFFUSION = DiffusionSpec(...)`; the
LLM then generates with `tiermoe.decode.diffusion` instead of the autoregressive loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tiermoe.errors import ConfigError
from tiermoe.models.registry import family


@dataclass(frozen=True, slots=True)
class DiffusionSpec:
    """How a family decodes, and the special tokens its public generation code hard-codes."""

    # "blocks": LLaDA2 -- attention is block-causal, so finished blocks' K/V are cached exactly and each step runs
    # the current block only. "full": LLaDA -- bidirectional attention over prompt and every block, recomputed per step.
    schedule: str
    mask_token_id: int  # used when neither config.json nor the tokenizer names a mask token
    eos_token_id: int | None = None  # used when generation_config.json, config.json and the tokenizer name none

    def __post_init__(self):
        if self.schedule not in ("blocks", "full"):
            raise ValueError(f"schedule must be 'blocks' or 'full', got {self.schedule!r}")


@dataclass(frozen=True, slots=True)
class DiffusionModel:
    """A loaded diffusion model's decoding facts, resolved against its folder."""

    schedule: str
    mask_id: int
    eos_ids: frozenset[int]  # the family's published EOS, for folders that name none


def diffusion_of(config: dict[str, Any], tokenizer, vocab_size: int) -> DiffusionModel | None:
    """The decoding facts of a diffusion family's checkpoint; None for an autoregressive family."""
    spec = getattr(family(config["model_type"]), "DIFFUSION", None)
    return None if spec is None else resolve(spec, config, tokenizer, vocab_size)


def resolve(spec: DiffusionSpec, config: dict[str, Any], tokenizer, vocab_size: int) -> DiffusionModel:
    """The mask token: config.json's `mask_token_id`, else the tokenizer's mask token, else the published id."""
    mask_id = config.get("mask_token_id")
    if mask_id is None and tokenizer is not None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        mask_id = spec.mask_token_id
    if not 0 <= mask_id < vocab_size:
        raise ConfigError(f"mask token id {mask_id} is outside the vocabulary [0, {vocab_size})")
    eos = frozenset() if spec.eos_token_id is None else frozenset([spec.eos_token_id])
    return DiffusionModel(spec.schedule, int(mask_id), eos)
