"""Which config.json fields a family honours, which cannot change inference output, and refusal of the rest.

Each family module declares, in one place, its args dataclass (the honoured fields) and a `FieldRules`: fields that
cannot change what inference computes (each with the reason) and fields honoured only at the one value the reference
implements. `args_from_dict` builds the dataclass and refuses, by name, every other field present in config.json:
a checkpoint that needs something we do not implement must not silently run as something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from tiermoe.errors import ConfigError

# Fields of every Hugging Face config that cannot change the tokens inference produces.
COMMON_IGNORED: dict[str, str] = {
    "architectures": "names the transformers class; model_type selects the family",
    "model_type": "selects the family in the registry",
    "transformers_version": "records which library version wrote the file",
    "torch_dtype": "storage dtype; the engine's dtype option sets the compute dtype",
    "dtype": "storage dtype; the engine's dtype option sets the compute dtype",
    "_name_or_path": "where the file was saved from",
    "auto_map": "remote-code class names; no remote code is run",
    "use_cache": "whether transformers keeps a KV cache; outputs are the same either way",
    "initializer_range": "random initialisation of untrained weights only",
    "attention_dropout": "dropout is off at inference",
    "output_router_logits": "returns router logits for the training loss",
    "router_aux_loss_coef": "load-balancing loss weight, training only",
    "bos_token_id": "tokenizer fact; prompts are tokenized by the tokenizer",
    "eos_token_id": "read by the engine as a stop token (generation_config.json first)",
    "pad_token_id": "padding for batched tensors; the engine never pads",
    "output_hidden_states": "what transformers returns besides logits",
    "return_dict": "what transformers returns besides logits",
    "output_attentions": "what transformers returns besides logits",
    "chunk_size_feed_forward": "memory chunking; transformers' MoE models do not read it",
    "is_encoder_decoder": "false for every supported family",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
}


@dataclass(frozen=True)
class FieldRules:
    """A family's classification of config.json fields beyond its args dataclass."""

    ignored: dict[str, str] = field(default_factory=dict)  # field -> why it cannot change inference output
    fixed: dict[str, tuple] = field(default_factory=dict)  # field -> the only values the reference implements
    aliases: dict[str, str] = field(default_factory=dict)  # args field -> another key some configs use for it
    extra: tuple[str, ...] = ()  # honoured fields read outside the args dataclass (rope settings, ...)


def check_fields(config: dict[str, Any], honoured: set[str], rules: FieldRules) -> None:
    """Raise ConfigError naming every field of config.json that is neither honoured nor known to be harmless."""
    kind = config.get("model_type")
    for key, allowed in rules.fixed.items():
        if key in config and config[key] not in allowed:
            raise ConfigError(f"{kind} with {key}={config[key]!r} is not supported "
                              f"(only {' or '.join(repr(v) for v in allowed)})")
    known = honoured | set(rules.extra) | set(rules.aliases.values()) | set(rules.ignored) | set(rules.fixed)
    unknown = sorted(set(config) - known - set(COMMON_IGNORED))
    if unknown:
        raise ConfigError(f"config.json field(s) {', '.join(unknown)} not supported for model_type {kind!r}: "
                          "tiermoe refuses fields it does not implement rather than ignore them")


def args_from_dict(cls: type, config: dict[str, Any], rules: FieldRules = FieldRules()):
    """Check config.json against the family's rules, then build its args dataclass from the honoured fields."""
    names = {f.name for f in fields(cls)}
    check_fields(config, names, rules)
    config = dict(config)
    for name, alias in rules.aliases.items():
        if name not in config and alias in config:
            config[name] = config[alias]
    try:
        return cls(**{k: v for k, v in config.items() if k in names})
    except TypeError as e:
        raise ConfigError(f"config.json for {config.get('model_type')!r} is missing a required field: {e}") from e
