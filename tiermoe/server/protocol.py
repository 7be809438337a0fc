"""Request bodies of the OpenAI API as vLLM accepts them, checked by pydantic, and their SamplingParams.

A field a request sends that is not defined here (logit_bias, suffix, tools, ...) is refused by name rather than
ignored (`extra="forbid"`). vLLM's sampling extras (top_k, min_p, repetition_penalty, ...) and the diffusion
models' (steps, block_length, threshold, remasking) are top-level fields, which the `openai` client sends through
`extra_body`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from tiermoe.errors import RequestError
from tiermoe.sampling_params import SamplingParams

MAX_N = 16  # completions per prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_STOP = 16  # stop strings
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's bound)
MAX_BODY_BYTES = 4 * 2**20  # a larger request body is refused with 413
MAX_HEADER_BYTES = 16 * 2**10  # request line and headers together
TOKEN_ID = Annotated[int, Field(ge=0, lt=2**31)]
DIFFUSION_FIELDS = ("steps", "block_length", "threshold", "remasking")


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def unicode_text(cls, data: Any) -> Any:
        """Refuse strings that are not Unicode text: JSON's escapes can spell a lone surrogate ("\\ud800"), which
        no tokenizer takes and no UTF-8 response can carry."""
        where = lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where or 'a string'} holds a lone UTF-16 surrogate escape: not valid Unicode text")
        return data


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string in `value` (JSON: dicts, lists, strings) that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = lone_surrogate(key, path) if isinstance(key, str) else None
        where = where if where is not None else lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if where is not None:
            return where
    return None


class StreamOptions(Request):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # usage in every chunk (vLLM)


class SamplingFields(Request):
    """Fields common to completions and chat completions."""

    model: str | None = None  # None: the served model
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for abuse monitoring; it has no effect on the output
    # vLLM's extras
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] | None = None  # near 0: logits / it overflow
    min_tokens: Annotated[StrictInt, Field(ge=0, lt=2**31)] = 0
    stop_token_ids: Annotated[list[TOKEN_ID], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    # diffusion models only (LLaDA, LLaDA2); refused for autoregressive ones
    steps: Annotated[StrictInt, Field(ge=1, le=2**16)] | None = None
    block_length: Annotated[StrictInt, Field(ge=1, le=2**16)] | None = None
    threshold: Annotated[float, Field(ge=0, le=1)] | None = None
    remasking: Literal["low_confidence", "random"] | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, diffusion: bool) -> SamplingParams:
        """The engine's parameters; unset fields take SamplingParams' defaults (vLLM's, e.g. temperature 1)."""
        given = {name: getattr(self, name) for name in DIFFUSION_FIELDS if getattr(self, name) is not None}
        if given and not diffusion:
            raise RequestError(f"{', '.join(given)}: diffusion sampling fields, but the served model is "
                               "autoregressive")
        fields = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
                  "repetition_penalty")
        kwargs: dict[str, Any] = {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
        return SamplingParams(**kwargs, **given, max_tokens=max_tokens, min_tokens=self.min_tokens,
                              stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
                              ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
                              logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: (str | Annotated[list[TOKEN_ID], Field(min_length=1)]
             | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[Annotated[list[TOKEN_ID], Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[StrictInt, Field(ge=1, lt=2**31)] | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: text or token ids, one or a list of them."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(Request):
    type: Literal["text"]
    text: str


class Message(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """The message as chat templates take it: role and plain text content."""
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(part.text for part in self.content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_tokens: Annotated[StrictInt, Field(ge=1, lt=2**31)] | None = None  # None: what the context leaves
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, lt=2**31)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True  # vLLM's

    @property
    def max_tokens_asked(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_asked(self) -> int | None:
        """SamplingParams.logprobs: the top-N alternatives per token, when logprobs are asked for."""
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(Request):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template (vLLM's)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: Annotated[list[TOKEN_ID], Field(max_length=2**20)]
