"""tiermoe: run Mixture-of-Experts language models whose experts do not fit in memory, token-identically."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use, so that `tiermoe --help` and `--version` do not pay for torch (about a second).
_EXPORTS = {"LLM": "tiermoe.llm", "SamplingParams": "tiermoe.sampling_params", "RequestOutput": "tiermoe.outputs",
            "CompletionOutput": "tiermoe.outputs", "Logprob": "tiermoe.outputs"}

if TYPE_CHECKING:
    from tiermoe.llm import LLM
    from tiermoe.outputs import CompletionOutput, Logprob, RequestOutput
    from tiermoe.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tiermoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
