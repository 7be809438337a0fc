"""The `sparse_attention` option ("top_k=N") and where it applies; torch-free, so the CLI checks it before loading
(the attention itself: tiermoe.models.sparse_attention)."""

from __future__ import annotations

from dataclasses import dataclass

from tiermoe.errors import ConfigError

SPEC_FORMAT = "top_k=N with N a positive integer (e.g. top_k=128)"


@dataclass(frozen=True, slots=True)
class SparseAttention:
    """`top_k`: prefix positions each KV head keeps for the light denoising steps."""

    top_k: int

    def __post_init__(self):
        if self.top_k < 1:
            raise ConfigError(f"sparse_attention top_k must be >= 1, got {self.top_k}")

    @classmethod
    def parse(cls, spec: str | SparseAttention) -> SparseAttention:
        """'top_k=N' -> SparseAttention(N); anything else is a ConfigError naming the expected form."""
        if isinstance(spec, SparseAttention):
            return spec
        key, sep, value = str(spec).partition("=")
        if key.strip() != "top_k" or not sep or not value.strip().isdigit():
            raise ConfigError(f"sparse_attention {spec!r} is malformed: expected {SPEC_FORMAT}")
        return cls(int(value))


def check_model(model_type: str, schedule: str | None) -> None:
    """Refuse sparse attention where no light step reuses a cached prefix (schedule None: autoregressive)."""
    if schedule is None:
        raise ConfigError(f"sparse_attention applies to block-diffusion models (llada2_moe); {model_type} is "
                          "autoregressive")
    if schedule != "blocks":
        raise ConfigError(f"sparse_attention applies to block-diffusion models (llada2_moe); {model_type} recomputes "
                          "bidirectional attention over every position at every step, so no prefix K/V is reused")
