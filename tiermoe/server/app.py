"""The FastAPI application: OpenAI's endpoints and vLLM's extra ones over a ServerState."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from importlib.metadata import version

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from tiermoe.errors import RequestError
from tiermoe.server import serving
from tiermoe.server.errors import APIError, error_response, install_handlers
from tiermoe.server.metrics import CONTENT_TYPE
from tiermoe.server.protocol import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tiermoe.server.state import ServerState


def build_app(state: ServerState, lifespan: Callable[[], AbstractAsyncContextManager] | None = None,
              api_key: str | None = None) -> FastAPI:
    """The app; `lifespan` (which loads the engine in the background, so that /health answers 503 meanwhile, and
    shuts it down) runs with it."""
    app = FastAPI(title="tiermoe", version=version("tiermoe"), lifespan=lifespan and (lambda _: lifespan()))
    app.add_middleware(SizeLimits, max_body=MAX_BODY_BYTES, max_headers=MAX_HEADER_BYTES)
    install_handlers(app)
    auth = [Depends(key_check(api_key))]

    @app.get("/health")
    async def health() -> Response:
        if state.engine is None:
            return error_response(503, state.load_error or "the model is loading")
        return Response(status_code=200)

    @app.get("/version")
    async def show_version() -> dict:
        return {"version": version("tiermoe")}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        engine = state.ready_engine(None)
        card = {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "tiermoe",
                "root": state.model_name, "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, http: Request):
        return await serving.create_completion(req, state, http)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, http: Request):
        return await serving.create_chat_completion(req, state, http)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(req: TokenizeRequest) -> dict:
        engine = state.ready_engine(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give either prompt or messages")
        if req.messages is not None:
            ids = state.chat_prompt([m.as_template_input() for m in req.messages],
                                    req.add_generation_prompt)["prompt_token_ids"]
        else:
            ids = tokenizer(engine).encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(req: DetokenizeRequest) -> dict:
        engine = state.ready_engine(req.model)
        vocab = engine.hf_config["vocab_size"]
        if any(t >= vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": tokenizer(engine).decode(req.tokens)}

    return app


def tokenizer(engine):
    if engine.tokenizer is None:
        raise RequestError("the served model has no tokenizer")
    return engine.tokenizer


def key_check(api_key: str | None):
    """A dependency refusing requests without `Authorization: Bearer <api_key>` (compared in constant time)."""
    expected = None if api_key is None else hashlib.sha256(api_key.encode()).digest()

    async def check(http: Request) -> None:
        if expected is None:
            return
        given = http.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        # Equal-length digests: the comparison's time says nothing about the key.
        if not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), expected):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})

    return check


class SizeLimits:
    """ASGI middleware: headers over `max_headers` bytes get 431, a body over `max_body` bytes (by Content-Length,
    or as it arrives) 413, before any handler runs; the body read here is replayed to the app."""

    def __init__(self, app, max_body: int, max_headers: int):
        self.app, self.max_body, self.max_headers = app, max_body, max_headers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_headers:
            return await error_response(431, f"request headers larger than {self.max_headers} bytes")(
                scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, send)
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.max_body:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await error_response(413, f"request body larger than {self.max_body} bytes")(scope, receive, send)
