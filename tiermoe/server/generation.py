"""One HTTP request's engine requests (one per prompt), run as tasks that feed a single queue of outputs.

Running each prompt's `engine.generate` in its own task lets a completions request with several prompts stream
their outputs as they come, and lets the caller check that every prompt was accepted (a RequestError comes before
the first output) before it answers 200 and starts a stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from tiermoe.outputs import RequestOutput
from tiermoe.sampling_params import SamplingParams

DONE = object()  # queued after a prompt's last output


class Generation:
    """The outputs of `prompts` as (prompt index, cumulative RequestOutput), in the order they are produced."""

    def __init__(self, engine, prompts: list, params: SamplingParams, request_id: str):
        self.engine = engine
        self.ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.early: list[tuple[int, object]] = []  # events taken from the queue by `accepted`, not yet consumed
        self.done: set[int] = set()
        self.first_token: float | None = None  # perf_counter() when the first token of any prompt came out
        self.tasks = [asyncio.create_task(self._run(i, p, params)) for i, p in enumerate(prompts)]

    async def _run(self, i: int, prompt, params: SamplingParams) -> None:
        try:
            async for out in self.engine.generate(prompt, params, self.ids[i]):
                if self.first_token is None and any(c.token_ids for c in out.outputs):
                    self.first_token = time.perf_counter()
                self.queue.put_nowait((i, out))
        except Exception as e:  # handed to the consumer, which answers with an error body
            self.queue.put_nowait((i, e))
        else:
            self.queue.put_nowait((i, DONE))

    async def accepted(self) -> None:
        """Wait for every prompt's first event; raise the first error among them (e.g. a RequestError)."""
        seen: set[int] = set()
        while len(seen) < len(self.tasks):
            i, event = await self.queue.get()
            if isinstance(event, Exception):
                raise event
            seen.add(i)
            self.early.append((i, event))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output until all prompts are done; an engine error is raised here."""
        while len(self.done) < len(self.tasks):
            i, event = self.early.pop(0) if self.early else await self.queue.get()
            if event is DONE:
                self.done.add(i)
            elif isinstance(event, Exception):
                raise event
            else:
                yield i, event

    async def final(self) -> list[RequestOutput]:
        """The last output of each prompt, in prompt order."""
        last: dict[int, RequestOutput] = {}
        async for i, out in self.outputs():
            last[i] = out
        return [last[i] for i in range(len(self.tasks))]

    def interrupt(self, error: Exception) -> None:
        """End the request with `error` (the server is stopping): the consumer raises it after the outputs queued
        before it, and then closes this generation."""
        self.queue.put_nowait((0, error))

    async def close(self) -> None:
        """Stop the prompts still running and abort them in the engine (a client left, or an error ended the
        request): their sequences and KV memory are freed."""
        running = [(i, t) for i, t in enumerate(self.tasks) if not t.done()]
        for _, task in running:
            task.cancel()
        for i, task in running:
            try:
                await task
            except asyncio.CancelledError:
                pass
            await self.engine.abort(self.ids[i])
