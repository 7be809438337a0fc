"""Engine configuration, checked when constructed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tiermoe.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(slots=True)
class EngineConfig:
    model: str | Path
    dtype: str = "float32"  # compute and resident-weight dtype: float32 or bfloat16
    max_model_len: int | None = None  # context limit; default: the model's max_position_embeddings
    threads: int | None = None  # torch intra-op threads; None = torch's default
    # Offloading. expert_cache=None keeps every expert resident once read; otherwise a RAM budget for routed
    # experts ("2GiB", "25%" of all expert bytes, or bytes) with the rest read from disk on demand.
    expert_cache: str | int | None = None
    cache_policy: str = "lru"  # eviction policy, see tiermoe.offload.policies.POLICIES
    io_threads: int = 4  # threads reading experts
    direct_io: bool = True  # O_DIRECT reads (the page cache would be RAM outside the budget)

    def __post_init__(self):
        self.model = Path(self.model)
        if not self.model.is_dir():
            raise ConfigError(f"model folder {self.model} does not exist")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads must be >= 1, got {self.io_threads}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
