"""What `LLM.generate` returns: one RequestOutput per prompt, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class Logprob:
    """One token's log probability under the model's own distribution (before penalties and temperature)."""

    logprob: float  # natural logarithm
    rank: int  # 1 = the most likely token of that distribution
    decoded_token: str | None = None  # the token's text alone (None without a tokenizer)


SampleLogprobs = list[dict[int, Logprob]]  # per generated token: the sampled token first, then the top-N
PromptLogprobs = list[dict[int, Logprob] | None]  # per prompt token: None for the first (nothing predicts it)


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n completions (SamplingParams.n)
    text: str  # generated text, stop string excluded
    token_ids: list[int]  # generated token ids, a final EOS/stop token included
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, when logprobs were asked for
    logprobs: SampleLogprobs | None = None  # when SamplingParams.logprobs is set


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float  # time.perf_counter() when the request entered the engine
    first_token_time: float | None = None  # when its first generated token was sampled
    finish_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def total_time(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    stats: dict | None = field(default=None)  # expert-store statistics of the run, when asked for
    prompt_logprobs: PromptLogprobs | None = None  # when SamplingParams.prompt_logprobs is set
    error: Exception | None = None  # why the request failed (tiermoe.errors.RequestFailed); then finished is set

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    def to_dict(self) -> dict:
        """JSON-ready form used by `tiermoe generate --json`."""
        m = self.metrics
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "text": self.outputs[0].text,
            "token_ids": self.outputs[0].token_ids,
            "finish_reason": self.outputs[0].finish_reason,
            "logprobs": _jsonable(self.outputs[0].logprobs),
            "prompt_logprobs": _jsonable(self.prompt_logprobs),
            "usage": {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_completion_tokens},
            "timing": {"time_to_first_token_s": m.time_to_first_token, "total_s": m.total_time},
            "stats": self.stats,
            "outputs": [{**asdict(o), "logprobs": _jsonable(o.logprobs)} for o in self.outputs],
        }


def _jsonable(logprobs: SampleLogprobs | PromptLogprobs | None) -> list | None:
    """Per position, a list of {"token_id", "logprob", "rank", "decoded_token"} in the dict's order."""
    if logprobs is None:
        return None
    return [None if pos is None else [{"token_id": t, **asdict(lp)} for t, lp in pos.items()] for pos in logprobs]
