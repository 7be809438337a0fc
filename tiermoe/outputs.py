"""What `LLM.generate` returns: one RequestOutput per prompt, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which completion of the request (always 0: one completion per request)
    text: str  # generated text, stop string excluded
    token_ids: list[int]  # generated token ids, a final EOS/stop token included
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


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
            "usage": {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_completion_tokens},
            "timing": {"time_to_first_token_s": m.time_to_first_token, "total_s": m.total_time},
            "stats": self.stats,
            "outputs": [asdict(o) for o in self.outputs],
        }
