"""`tiermoe serve`: the OpenAI-compatible server on uvicorn.

The socket opens at once and the model loads in the background (/health answers 503 until it is ready). SIGTERM
or Ctrl-C stops admitting requests (the listening socket closes), lets in-flight requests and streams finish, then
shuts the engine down and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from contextlib import asynccontextmanager

import uvicorn

from tiermoe import kernels
from tiermoe.cli import engine_kwargs, model_path
from tiermoe.config import EngineConfig
from tiermoe.engine.async_engine import AsyncLLMEngine
from tiermoe.server.app import build_app
from tiermoe.server.protocol import MAX_HEADER_BYTES
from tiermoe.server.state import ServerState


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM / Ctrl-C; the exit code."""
    config = EngineConfig(model=model_path(args), **engine_kwargs(args), tau=args.tau)  # checked now
    name = args.served_model_name or args.model or config.model.name
    state = ServerState(name, max_queued=config.max_num_seqs + args.max_waiting)
    exit_code = 0

    @asynccontextmanager
    async def lifespan():
        async def load():
            nonlocal exit_code
            try:
                engine = await asyncio.to_thread(load_engine, config)
                await engine.start()
            except Exception as e:  # a model that cannot load ends the server, saying why
                state.load_error = f"the model failed to load: {e}"
                print(f"tiermoe: error: {e}", file=sys.stderr)
                exit_code, server.should_exit = 2, True
                return
            state.engine = engine
            print(f"tiermoe: serving {name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()
            if state.engine is not None:
                await state.engine.shutdown()

    app = build_app(state, lifespan, args.api_key)
    server = DrainingServer(state, args.shutdown_timeout, uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=5))
    server.run()
    return exit_code


def load_engine(config: EngineConfig) -> AsyncLLMEngine:
    """The engine, its decode kernels built (or found built) first: /health turns 200 only when the first request
    will not wait for a kernel build, nor for another process's build of them (build_lock)."""
    kernels.compiled()
    return AsyncLLMEngine(config)


class DrainingServer(uvicorn.Server):
    """uvicorn's server: on SIGTERM / SIGINT no new request is admitted, running ones get `timeout` seconds to
    finish before they are ended (a stream with an error event and [DONE]), and the process exits 0 (uvicorn's
    own handler re-raises the signal once it has stopped)."""

    def __init__(self, state: ServerState, timeout: float, config: uvicorn.Config):
        super().__init__(config)
        self.state, self.timeout = state, timeout

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            self.force_exit = self.force_exit or sig == signal.SIGINT  # a second Ctrl-C: stop without waiting
            return
        self.state.draining = self.should_exit = True
        asyncio.get_running_loop().call_later(self.timeout, self.state.interrupt_all,
                                              f"the server is shutting down (requests get {self.timeout:g} s)")
