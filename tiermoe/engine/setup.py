"""What the engine checks and reads besides the model and its store: offloading options a model cannot use, EOS ids."""

from __future__ import annotations

import json
from pathlib import Path

from tiermoe.config import EngineConfig
from tiermoe.errors import ConfigError


def refuse_offloading(config: EngineConfig, model_type: str) -> None:
    """A model without routed experts (LLaDA) has nothing to offload: an option that would do nothing is refused."""
    given = [o for o in ("expert_cache", "gpu_expert_cache", "prefetch", "tau", "memory_limit") if config.given(o)]
    if given:
        raise ConfigError(f"{', '.join(given)}: expert offloading applies to models with routed experts, and "
                          f"{model_type} has none (all its weights stay resident)")


def eos_token_ids(folder: Path, config: dict, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
