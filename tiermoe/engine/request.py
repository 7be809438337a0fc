"""A request's life: prompt ids, generated ids, its KV cache, its sampler state, its place in the scheduler, when and
why it stopped.

A request with n > 1 completions runs as n requests (its children, as in vLLM), one per completion; their outputs
are merged back into one RequestOutput (`request_outputs`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tiermoe.decode.detokenizer import INCOMPLETE, Detokenizer
from tiermoe.decode.kv_cache import KVCache
from tiermoe.decode.sampler import SamplerState
from tiermoe.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput, SampleLogprobs
from tiermoe.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # scheduled, holds KV blocks for its computed tokens
    PREEMPTED = "preempted"  # its KV blocks were taken back: waits to recompute them
    FINISHED = "finished"  # EOS, stop or length
    ABORTED = "aborted"  # by the caller
    FAILED = "failed"  # an error of this request only (its expert reads, a bad input found late)

    @property
    def done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED)


@dataclass(slots=True, eq=False)  # a request is itself, not its fields' values
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    cache: KVCache | None  # KV of the computed tokens (the engine's paged view); None while waiting
    max_len: int  # context limit: generation stops at this many tokens in all
    eos_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache (computed)
    text: str = ""  # decoded output text (stop string excluded once finished)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: Detokenizer | None = None  # made at the first token, when there is a tokenizer
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))
    index: int = 0  # which completion of its request this sequence produces
    parent_id: str | None = None  # the request's id when it has n > 1 completions (request_id is then this one's)
    priority: int = 0  # lower runs first (FCFS among equals), as vLLM's priority scheduling
    status: RequestStatus = RequestStatus.WAITING
    error: Exception | None = None  # why it FAILED
    work: dict | None = None  # diffusion: what its decoding took (NFE, tokens per forward, logit rows)
    sampler: SamplerState = field(init=False)  # generator and token history the sampler reads
    logprobs: SampleLogprobs | None = field(init=False)  # per generated token, when params.logprobs is set
    cumulative_logprob: float | None = field(init=False)
    prompt_logprobs: PromptLogprobs | None = field(init=False)  # filled by the prefill, when asked for

    def __post_init__(self):
        self.sampler = SamplerState.new(self.params, self.prompt_ids, self.output_ids, self.eos_ids)
        wants_logprobs = self.params.logprobs is not None
        self.logprobs = [] if wants_logprobs else None
        self.cumulative_logprob = 0.0 if wants_logprobs else None
        self.prompt_logprobs = [None] if self.params.prompt_logprobs is not None else None

    @property
    def generator(self) -> torch.Generator | None:
        """The request's seeded generator (None without a seed)."""
        return self.sampler.generator

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def ids(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (a decode step reads one id of a long context)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - p)]

    def new_tokens(self) -> list[int]:
        """Tokens not yet in the cache: the whole prompt at prefill, the last sampled token after."""
        return self.ids(self.cached, self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def append(self, token: int, tokenizer, logprobs: dict[int, Logprob] | None = None) -> None:
        """Add a sampled token (with its logprobs, when asked for), update the text, and decide whether the request
        is done."""
        now = time.perf_counter()
        if not self.output_ids:
            self.metrics.first_token_time = now
        self.output_ids.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token].logprob
        if tokenizer is not None:
            if self.detokenizer is None:
                self.detokenizer = Detokenizer(tokenizer, self.params.skip_special_tokens)
            self.text = self.detokenizer.update(self.output_ids)
        if self._is_stop_token(token):
            self._finish("stop", token)
        elif self._hit_stop_string():
            pass
        elif len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_len:
            self._finish("length", None)
        if self.finished:
            self.metrics.finish_time = now
            if self.detokenizer is not None and not isinstance(self.stop_reason, str):  # not cut at a stop string
                self.text = self.detokenizer.finish(self.output_ids)

    def _is_stop_token(self, token: int) -> bool:
        if len(self.output_ids) < self.params.min_tokens:  # the sampler masks them until then
            return False
        return token in self.params.stop_token_ids or (token in self.eos_ids and not self.params.ignore_eos)

    def _hit_stop_string(self) -> bool:
        # As vLLM: the text of the first min_tokens tokens is not searched (a stop string may only end after it).
        if not self.params.stop or self.detokenizer is None or len(self.output_ids) <= self.params.min_tokens:
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
        completion = CompletionOutput(self.index, self.text, list(self.output_ids), self.finish_reason,
                                      self.stop_reason, self.cumulative_logprob,
                                      None if self.logprobs is None else list(self.logprobs))
        return RequestOutput(self.parent_id or self.request_id, self.prompt, list(self.prompt_ids), [completion],
                             self.finished, self.metrics, prompt_logprobs=self.prompt_logprobs)


def request_outputs(seqs: list[Request]) -> list[RequestOutput]:
    """One RequestOutput per request, in order: the n completions of a request (consecutive sequences sharing its
    id) become its `outputs`, ordered by index."""
    merged: list[RequestOutput] = []
    for seq in seqs:
        out = seq.to_output()
        if seq.parent_id is None or not merged or merged[-1].request_id != out.request_id:
            merged.append(out)
            continue
        last = merged[-1]
        last.outputs = sorted(last.outputs + out.outputs, key=lambda o: o.index)
        last.finished = last.finished and out.finished
        last.prompt_logprobs = last.prompt_logprobs or out.prompt_logprobs
        last.metrics = _merge_metrics(last.metrics, out.metrics, last.finished)
    return merged


def _merge_metrics(a: RequestMetrics, b: RequestMetrics, finished: bool) -> RequestMetrics:
    """The request's metrics over its completions: first arrival, first token of any, finish of the last."""
    firsts = [t for t in (a.first_token_time, b.first_token_time) if t is not None]
    finishes = [t for t in (a.finish_time, b.finish_time) if t is not None]
    return RequestMetrics(min(a.arrival_time, b.arrival_time), min(firsts, default=None),
                          max(finishes) if finished else None)
