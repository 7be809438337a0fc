"""/v1/completions and /v1/chat/completions over the async engine: whole responses, or SSE streams of deltas
ending in `data: [DONE]` (OpenAI's chunk shapes; usage in a last chunk with stream_options.include_usage)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tiermoe.errors import RequestError
from tiermoe.outputs import CompletionOutput, Logprob, RequestOutput
from tiermoe.server.errors import APIError, error_body
from tiermoe.server.generation import Generation
from tiermoe.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from tiermoe.server.state import ServerState


@dataclass
class Reply:
    """What one API call streams or returns, and the bookkeeping both need."""

    state: ServerState
    kind: str  # "text_completion" or "chat.completion"
    n: int  # completions per prompt
    include_usage: bool
    echo: list[str] = field(default_factory=list)  # per prompt, text put before the output (completions' echo)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    start: float = field(default_factory=time.perf_counter)
    top_logprobs: int = 0  # chat: alternatives per token

    def __post_init__(self):
        self.id = ("cmpl-" if self.kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex

    def usage(self, outs: list[RequestOutput | None]) -> dict:
        prompt = sum(o.num_prompt_tokens for o in outs if o is not None)
        completion = sum(o.num_completion_tokens for o in outs if o is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def record(self, outs: list[RequestOutput], first_token: float | None) -> None:
        reasons = [c.finish_reason or "abort" for o in outs for c in o.outputs]
        usage = self.usage(outs)
        self.state.metrics.finished(None if first_token is None else first_token - self.start,
                                    time.perf_counter() - self.start, usage["prompt_tokens"],
                                    usage["completion_tokens"], reasons)

    def choice(self, index: int, c: CompletionOutput, text: str, logprobs: list | None, delta: bool) -> dict:
        if self.kind == "text_completion":
            lp = None if logprobs is None else completion_logprobs(logprobs)
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}
        lp = None if logprobs is None else {"content": chat_logprobs(logprobs, self.top_logprobs)}
        body = {"content": text} if delta else {"role": "assistant", "content": text}
        return {"index": index, "delta" if delta else "message": body, "logprobs": lp,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def response(self, outs: list[RequestOutput]) -> dict:
        choices = [self.choice(i * self.n + c.index, c, (self.echo[i] if self.echo else "") + c.text, c.logprobs,
                               False) for i, o in enumerate(outs) for c in o.outputs]
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.state.model_name,
                "choices": choices, "usage": self.usage(outs)}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name,
                "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return sse(body)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


async def create_completion(req: CompletionRequest, state: ServerState, http: Request):
    engine = state.ready_engine(req.model)
    max_tokens = state.check_max_tokens(req.max_tokens)
    params = req.sampling_params(max_tokens, req.logprobs, engine.is_diffusion)
    prompts = req.prompts()
    reply = Reply(state, "text_completion", params.n, req.include_usage)
    if req.echo:
        reply.echo = [p if isinstance(p, str) else decode(engine, p) for p in prompts]
    return await respond(req, state, http, reply, prompts, params)


async def create_chat_completion(req: ChatCompletionRequest, state: ServerState, http: Request):
    engine = state.ready_engine(req.model)
    prompt = state.chat_prompt([m.as_template_input() for m in req.messages], req.add_generation_prompt)
    max_tokens = req.max_tokens_asked
    if max_tokens is None:  # what the context leaves, as vLLM
        max_tokens = max(1, state.max_model_len - len(prompt["prompt_token_ids"]))
    params = req.sampling_params(state.check_max_tokens(max_tokens), req.logprobs_asked, engine.is_diffusion)
    reply = Reply(state, "chat.completion", params.n, req.include_usage, top_logprobs=req.top_logprobs or 0)
    return await respond(req, state, http, reply, [prompt], params)


async def respond(req: SamplingFields, state: ServerState, http: Request, reply: Reply, prompts: list, params):
    """Admit the request, start its engine requests, and answer with a JSON body or an SSE stream."""
    slot = state.admit(len(prompts) * params.n)
    gen = Generation(state.engine, prompts, params, reply.id)
    slot.hold(gen)
    try:
        await failing_as_500(state, until_disconnected(http, gen.accepted()))
        if not req.stream:
            outs = await failing_as_500(state, until_disconnected(http, gen.final()))
    except BaseException:
        await gen.close()
        slot.release()
        raise
    if req.stream:
        return StreamingResponse(stream(reply, gen, slot.release), media_type="text/event-stream")
    await gen.close()
    slot.release()
    reply.record(outs, gen.first_token)
    return JSONResponse(reply.response(outs))


async def failing_as_500(state: ServerState, work):
    """Await `work`; an engine failure (e.g. an unreadable expert file) becomes a 500 naming it."""
    try:
        return await work
    except APIError as e:
        if e.status == 499:
            state.metrics.failed("aborted")
        raise
    except RequestError:
        raise
    except Exception as e:
        state.metrics.failed(type(e).__name__)
        raise APIError(500, str(e)) from e


async def until_disconnected(http: Request, work):
    """Await `work`, or cancel it when the client disconnects first (its engine requests are then aborted)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_disconnect(http))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise APIError(499, "client disconnected")
    return task.result()


async def wait_disconnect(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def stream(reply: Reply, gen: Generation, release: Callable[[], None]) -> AsyncIterator[str]:
    """The SSE events of a request: deltas of text (and logprobs) per choice, finish reasons, usage, [DONE].

    A client that disconnects cancels this generator; `gen.close()` then aborts its engine requests."""
    sent: dict[int, tuple[str, int]] = {}  # choice index -> (text, tokens) sent
    finished: set[int] = set()
    last: list[RequestOutput | None] = [None] * len(gen.tasks)
    ended = False  # False in `finally`: the client went away (this generator was cancelled or closed)
    try:
        async for i, out in gen.outputs():
            last[i] = out
            choices = [ch for c in out.outputs if (ch := delta(reply, i, c, sent, finished)) is not None]
            if choices:
                yield reply.chunk(choices, reply.usage(last) if reply.include_usage else None)
        if reply.include_usage:
            yield reply.chunk([], reply.usage(last))
        reply.record(last, gen.first_token)
        ended = True
    except Exception as e:  # the request failed after its stream began: say so in the stream, then end it
        reply.state.metrics.failed(type(e).__name__)
        ended = True
        status = e.status if isinstance(e, APIError) else 400 if isinstance(e, RequestError) else 500
        yield sse(error_body(status, str(e)))
    finally:
        if not ended:
            reply.state.metrics.failed("aborted")
        await gen.close()
        release()
    yield sse("[DONE]")


def delta(reply: Reply, prompt: int, c: CompletionOutput, sent: dict, finished: set) -> dict | None:
    """The choice of a chunk for what `c` adds to what was sent of it, or None when it adds nothing."""
    index = prompt * reply.n + c.index
    if index in finished:
        return None
    first, chat = index not in sent, reply.kind != "text_completion"
    text_sent, tokens_sent = sent.get(index, ("", 0))
    # NOTE: a running output's text only grows (the engine holds back incomplete characters and possible stop
    # strings); text that does not extend what was sent waits for the final output.
    text = c.text[len(text_sent):] if c.text.startswith(text_sent) else ""
    prefix = reply.echo[prompt] if first and reply.echo else ""
    if not (text or prefix or c.finish_reason or (first and chat)):
        return None
    sent[index] = (text_sent + text, len(c.token_ids))
    if c.finish_reason is not None:
        finished.add(index)
    choice = reply.choice(index, c, prefix + text, None if c.logprobs is None else c.logprobs[tokens_sent:], True)
    if first and chat:  # the first chat delta names the role
        choice["delta"] = {"role": "assistant", **choice["delta"]}
    return choice


def decode(engine, ids: list[int]) -> str:
    if engine.tokenizer is None:
        raise RequestError("echo needs a tokenizer: the served model has none")
    return engine.tokenizer.decode(ids, skip_special_tokens=False)


def completion_logprobs(entries: list[dict[int, Logprob]]) -> dict:
    """OpenAI's completions logprobs: per token its text and logprob, the alternatives, and text offsets."""
    tokens, offsets, offset = [], [], 0
    for entry in entries:
        (token, chosen), *_ = entry.items()
        tokens.append(_text(token, chosen))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [next(iter(e.values())).logprob for e in entries],
            "top_logprobs": [{_text(t, lp): lp.logprob for t, lp in e.items()} for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[dict[int, Logprob]], top: int) -> list[dict]:
    """OpenAI's chat logprobs: per token its text, logprob and bytes, and the `top` most likely tokens."""
    def item(token: int, lp: Logprob) -> dict:
        text = _text(token, lp)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}

    rows = []
    for entry in entries:
        (token, chosen), *_ = entry.items()
        best = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top]
        rows.append(item(token, chosen) | {"top_logprobs": [item(t, lp) for t, lp in best]})
    return rows


def _text(token: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token}"
