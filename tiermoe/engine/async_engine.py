"""AsyncLLMEngine: the engine behind an asyncio server. A background thread steps the LLMEngine; each request's
outputs reach its `generate` iterator through the event loop (call_soon_threadsafe).

    engine = AsyncLLMEngine(EngineConfig(model="path"))
    await engine.start()
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8), request_id="a"):
        print(out.outputs[0].text)  # cumulative; the last output has finished=True
    await engine.shutdown()

The stepping thread owns the LLMEngine: requests to add and abort reach it through a thread-safe queue and are
applied between steps, so the event loop never waits for a step to end.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator

from tiermoe.config import EngineConfig
from tiermoe.engine.llm_engine import LLMEngine, Prompt
from tiermoe.errors import RequestError, RequestFailed
from tiermoe.outputs import RequestOutput
from tiermoe.sampling_params import SamplingParams


class AsyncLLMEngine:
    """Loads the model at construction; `start` begins stepping, `shutdown` stops (aborting what still runs)."""

    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        self._commands: queue.Queue = queue.Queue()  # ("add", id, requests) / ("abort", id), applied between steps
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> its outputs (or an exception), loop side
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def hf_config(self) -> dict:
        return self.engine.hf_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_diffusion(self) -> bool:
        return self.engine.is_diffusion

    def stats(self) -> dict:
        """num_running, num_waiting, kv_usage (0..1), store statistics (hits, misses, bytes_read, stall_s), and the
        prompt/generation token totals."""
        return self.engine.stats()

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tiermoe-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop stepping after the current step; requests still running are aborted and their iterators raise
        RequestFailed."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._apply_commands()
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        for stream in self._streams.values():
            stream.put_nowait(RequestFailed("the engine shut down"))

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request after each step that advanced it (a diffusion model: after each
        block); the last has `finished` set. Bad input raises RequestError before anything is yielded; a failure of
        this request alone raises RequestFailed. Closing the iterator early aborts the request."""
        if self._thread is None:
            raise RuntimeError("AsyncLLMEngine.start() has not been awaited")
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        children = self.engine.make_requests(prompt, params, request_id)
        self.engine.check_fits(children)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(("add", request_id, children))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                if out.error is not None:
                    raise out.error
                finished = out.finished
                yield out
        finally:
            del self._streams[request_id]
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request and free everything it holds; its iterator ends with RequestFailed("aborted")."""
        self._send(("abort", request_id))
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(RequestFailed(f"request {request_id} was aborted"))

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- the stepping thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._apply_commands()
            if not engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug, not one request's failure: end what runs, keep serving
                for rid in list(engine.requests):
                    engine.abort_request(rid)
                    failure = RequestFailed(f"request {rid} failed: the engine step raised {e!r}")
                    failure.__cause__ = e
                    self._deliver(rid, failure)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self.engine.enqueue(command[1], command[2])
            else:
                self.engine.abort_request(command[1])

    def _deliver(self, request_id: str, item) -> None:
        self._loop.call_soon_threadsafe(self._put, request_id, item)

    def _put(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)  # gone: its consumer closed the iterator
        if stream is not None:
            stream.put_nowait(item)
