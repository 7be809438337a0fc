"""Sampling parameters, in the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field

from tiermoe.errors import RequestError


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. Checked on construction; bad values raise RequestError."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = all tokens
    top_p: float = 1.0
    seed: int | None = None  # per-request generator; None = nondeterministic
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)  # stop strings; the returned text excludes them
    stop_token_ids: list[int] = field(default_factory=list)  # stop on these besides EOS
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Diffusion models only (LLaDA, LLaDA2); defaults are the public generate()'s. Ignored by autoregressive ones.
    block_length: int = 32  # positions unmasked together, left to right block by block
    steps: int = 32  # denoising steps: per block (LLaDA2), or in all, split evenly across blocks (LLaDA)
    threshold: float = 0.95  # LLaDA2: commit every masked position whose confidence exceeds this, else the top-k
    min_commit: int = 1  # LLaDA2: steps are capped at max_tokens // min_commit (the public generate's minimal_topk)
    remasking: str = "low_confidence"  # LLaDA: which positions to commit, "low_confidence" or "random"

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.max_tokens is None or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
        self._check_diffusion()

    def _check_diffusion(self) -> None:
        for name in ("block_length", "steps", "min_commit"):
            if getattr(self, name) < 1:
                raise RequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.threshold <= 1:
            raise RequestError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.remasking not in ("low_confidence", "random"):
            raise RequestError(f"remasking must be 'low_confidence' or 'random', got {self.remasking!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
