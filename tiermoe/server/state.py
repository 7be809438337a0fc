"""What the HTTP handlers share: the engine once loaded, the served model's name and limits, admission, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from jinja2 import TemplateError

from tiermoe.errors import RequestError
from tiermoe.server.errors import APIError
from tiermoe.server.metrics import Metrics


@dataclass
class Slot:
    """A request's places among those admitted (one per sequence it decodes); released once when it ends."""

    state: ServerState
    sequences: int
    generation: object | None = None  # its Generation, once started
    held: bool = True

    def hold(self, generation) -> None:
        self.generation = generation
        self.state.live.add(generation)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.in_flight -= self.sequences
            self.state.live.discard(self.generation)


@dataclass
class ServerState:
    model_name: str
    max_queued: int  # sequences admitted at once (running + waiting); more get 503
    engine: object | None = None  # AsyncLLMEngine, None while loading
    load_error: str | None = None  # why loading failed
    draining: bool = False  # SIGTERM: no new requests
    in_flight: int = 0  # sequences of the admitted requests (prompts x n each)
    live: set = field(default_factory=set)  # the Generations of admitted requests
    metrics: Metrics = field(init=False)

    def __post_init__(self):
        self.metrics = Metrics(self.model_name, self.stats)

    def stats(self) -> dict | None:
        return None if self.engine is None else self.engine.stats()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def ready_engine(self, model: str | None):
        """The engine, once loaded and if `model` names it (None does)."""
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is loading; retry when /health answers 200",
                           headers={"Retry-After": "1"})
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model")
        return self.engine

    def admit(self, sequences: int) -> Slot:
        """A slot for a new request decoding `sequences` sequences (its prompts times n): 400 if more than the
        server ever admits at once, 503 when the waiting queue cannot take them now or the server is stopping."""
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if sequences > self.max_queued:
            raise RequestError(f"the request asks for {sequences} sequences (prompts x n); this server admits at "
                               f"most {self.max_queued} at once (--max-num-seqs + --max-waiting)")
        if self.in_flight + sequences > self.max_queued:
            self.metrics.failed("queue_full")
            raise APIError(503, f"the server is busy: {self.in_flight} sequences are running or waiting (at most "
                                f"{self.max_queued}); retry later", headers={"Retry-After": "1"})
        self.in_flight += sequences
        return Slot(self, sequences)

    def interrupt_all(self, reason: str) -> None:
        """End every request still running with a 503 (in a stream: an error event, then [DONE])."""
        for generation in list(self.live):
            generation.interrupt(APIError(503, reason))

    def check_max_tokens(self, max_tokens: int) -> int:
        if max_tokens >= self.max_model_len:
            raise RequestError(f"max_tokens={max_tokens} does not fit the model's context of {self.max_model_len} "
                               "tokens, which also holds the prompt")
        return max_tokens

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> dict:
        """The conversation rendered with the model's chat template: {"prompt": text, "prompt_token_ids": ids}."""
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise RequestError(f"the model `{self.model_name}` has no chat template: use /v1/completions")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:  # the template refuses this conversation (e.g. roles out of order)
            raise RequestError(f"the chat template refused the messages: {e}") from None
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
