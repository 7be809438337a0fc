"""One registry: config.json's `model_type` -> the module that builds that family (imported lazily).

Every family module has the same small contract: `build(config: dict) -> CausalLM` and `sanitize(key) -> key | None`
(renames checkpoint keys to the canonical names the modules use; None drops a tensor).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from tiermoe.errors import ConfigError

FAMILIES: dict[str, str] = {
    "mixtral": "tiermoe.models.mixtral",
    "qwen2_moe": "tiermoe.models.qwen_moe",
    "qwen3_moe": "tiermoe.models.qwen_moe",
    "olmoe": "tiermoe.models.olmoe",
    "deepseek_v2": "tiermoe.models.deepseek",
    "deepseek_v3": "tiermoe.models.deepseek",
    "llada2_moe": "tiermoe.models.llada2_moe",
    "llada": "tiermoe.models.llada",
}

# The built-in models that ship inside the package (trained on Shakespeare by scripts/train_model.py): an
# autoregressive qwen3_moe, and a llada2_moe block-diffusion model (`tiermoe generate --diffusion`).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "shakespeare-moe"
DEFAULT_DIFFUSION_MODEL = DEFAULT_MODEL.parent / "shakespeare-dllm"


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{path}: no model_type")
    return config


def family(model_type: str) -> ModuleType:
    """The module implementing `model_type`; an unsupported type names the supported ones."""
    if model_type not in FAMILIES:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[model_type])
