"""Sampling parameters, in the shape and with the semantics of vLLM's SamplingParams.

Every field means what vLLM's documentation says and is checked over the same ranges; the order in which the
sampler applies them is vLLM's too (see tiermoe.decode.sampler).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

from tiermoe.errors import RequestError

MIN_TEMPERATURE = 0.01  # vLLM raises a smaller positive temperature to this (numerical safety)

# Options that act on an autoregressive model's next-token distribution; a diffusion model has none, and refuses
# them when set (value, neutral value).
AUTOREGRESSIVE_ONLY = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                       "min_tokens": 0, "logprobs": None, "prompt_logprobs": None}


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. Checked on construction; bad values raise RequestError.

    Defaults are vLLM's (temperature 1.0, max_tokens 16); the `tiermoe` CLI has its own (greedy, 64 tokens).
    """

    n: int = 1  # completions per prompt; completion i samples with seed + i when a seed is given (as vLLM)
    presence_penalty: float = 0.0  # [-2, 2]: subtracted once from every token already generated (OpenAI)
    frequency_penalty: float = 0.0  # [-2, 2]: subtracted once per time a token was generated (OpenAI)
    repetition_penalty: float = 1.0  # > 0: tokens of the prompt or the output: positive logits / it, negative * it
    temperature: float = 1.0  # [0, 2]; 0 = greedy (penalties still apply)
    top_p: float = 1.0  # (0, 1]: smallest set of most likely tokens whose probability reaches top_p
    top_k: int = 0  # 0 or -1 = all tokens
    min_p: float = 0.0  # [0, 1]: drop tokens less likely than min_p times the most likely one
    seed: int | None = None  # per-request generator; None (or -1) = nondeterministic
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids are masked, and stop strings not honoured, before this many
    stop: list[str] = field(default_factory=list)  # stop strings; the returned text excludes them
    stop_token_ids: list[int] = field(default_factory=list)  # stop on these besides EOS
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: this many most likely tokens plus the sampled one; -1 = all
    prompt_logprobs: int | None = None  # per prompt token (from the 2nd): this many plus the prompt's own; -1 = all
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
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if self.seed == -1:
            self.seed = None
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        self._check_ranges()
        self._check_lengths()
        self._check_diffusion()
        if 0 < self.temperature < MIN_TEMPERATURE:
            warnings.warn(f"temperature {self.temperature} is raised to {MIN_TEMPERATURE} (as vLLM does)",
                          stacklevel=3)
            self.temperature = MIN_TEMPERATURE

    def _check_ranges(self) -> None:
        _integer("n", self.n)
        if self.n < 1:
            raise RequestError(f"n must be at least 1, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise RequestError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not 0 <= self.temperature <= 2:  # also refuses nan and inf
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        _integer("top_k", self.top_k)
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.n > 1 and self.greedy:
            raise RequestError(f"n must be 1 when sampling greedily (temperature 0): the {self.n} completions "
                               "would be identical")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < -1):
                raise RequestError(f"{name} must be None, -1 (the whole vocabulary) or >= 0, got {value!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")

    def _check_lengths(self) -> None:
        if self.max_tokens is None or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        _integer("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")

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

    def for_completion(self, index: int) -> SamplingParams:
        """The parameters of completion `index` of n: one completion, seed + index when seeded (as vLLM's child
        requests), and the prompt's logprobs computed by the first only."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed, prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    def check_for_model(self, vocab_size: int, model_type: str, diffusion: bool) -> None:
        """Refuse what this model cannot honour: token ids outside its vocabulary, more logprobs than it has
        tokens, and on a diffusion model (which unmasks positions in any order, with no next-token distribution)
        the autoregressive-only options, by name."""
        if diffusion:
            given = [name for name, off in AUTOREGRESSIVE_ONLY.items() if getattr(self, name) != off]
            if given:
                raise RequestError(f"{', '.join(given)}: not supported by diffusion models ({model_type} unmasks "
                                   "positions in any order and has no next-token distribution to penalise, mask "
                                   "or report)")
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise RequestError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) > vocab_size:
                raise RequestError(f"{name}={getattr(self, name)} exceeds the vocabulary ({vocab_size} tokens); "
                                   "-1 asks for all of them")


def _integer(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{name} must be an integer, got {value!r}")
