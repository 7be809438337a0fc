"""A request's life: prompt ids, generated ids, its KV cache, its sampler state, when and why it stopped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tiermoe.decode.detokenizer import INCOMPLETE, Detokenizer
from tiermoe.decode.kv_cache import KVCache
from tiermoe.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tiermoe.sampling_params import SamplingParams


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    cache: KVCache
    max_len: int  # context limit: generation stops at this many tokens in all
    eos_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache
    text: str = ""  # decoded output text (stop string excluded once finished)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    detokenizer: Detokenizer | None = None  # made at the first token, when there is a tokenizer
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def __post_init__(self):
        if self.params.seed is not None and not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def new_tokens(self) -> list[int]:
        """Tokens not yet in the cache: the whole prompt at prefill, the last sampled token after."""
        return self.all_ids[self.cached:]

    def append(self, token: int, tokenizer) -> None:
        """Add a sampled token, update the text, and decide whether the request is done."""
        now = time.perf_counter()
        if not self.output_ids:
            self.metrics.first_token_time = now
        self.output_ids.append(token)
        if tokenizer is not None:
            if self.detokenizer is None:
                self.detokenizer = Detokenizer(tokenizer, self.params.skip_special_tokens)
            self.text = self.detokenizer.update(self.output_ids)
        if token in self.params.stop_token_ids or (token in self.eos_ids and not self.params.ignore_eos):
            self._finish("stop", token)
        elif self._hit_stop_string():
            pass
        elif len(self.output_ids) >= self.params.max_tokens or len(self.all_ids) >= self.max_len:
            self._finish("length", None)
        if self.finished:
            self.metrics.finish_time = now
            if self.detokenizer is not None and not isinstance(self.stop_reason, str):  # not cut at a stop string
                self.text = self.detokenizer.finish(self.output_ids)

    def _hit_stop_string(self) -> bool:
        if not self.params.stop or self.detokenizer is None:
            return False
        # The text before `unchanged` held no stop string last time: look only where one could end now.
        start = max(0, self.detokenizer.unchanged - max(map(len, self.params.stop)) + 1)
        hits = [(pos, s) for s in self.params.stop if (pos := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        self.text = self.text[:pos]
        self._finish("stop", stop)
        return True

    def _finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def stable_text(self) -> str:
        """Text safe to stream: holds back an incomplete UTF-8 character and a possible stop-string prefix."""
        if self.finished:
            return self.text
        text = self.text.rstrip(INCOMPLETE)
        for stop in self.params.stop:
            for k in range(len(stop) - 1, 0, -1):
                if text.endswith(stop[:k]):
                    return text[:-k]
        return text

    def to_output(self) -> RequestOutput:
        completion = CompletionOutput(0, self.text, list(self.output_ids), self.finish_reason, self.stop_reason)
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_ids), [completion], self.finished,
                             self.metrics)
