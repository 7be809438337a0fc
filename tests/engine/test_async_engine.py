"""AsyncLLMEngine: concurrent streams give what LLM.generate gives, bad input fails early, abort and disconnect free
what the request held, a request's failure ends only that request."""

import asyncio

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.config import EngineConfig
from tiermoe.engine import AsyncLLMEngine
from tiermoe.errors import RequestError, RequestFailed
from tiermoe.models.registry import DEFAULT_MODEL

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["To be, or not to be", "My lord,", "What light through yonder window breaks"]


@pytest.fixture(scope="module")
def engine():
    return AsyncLLMEngine(EngineConfig(model=DEFAULT_MODEL, max_num_batched_tokens=8))


async def collect(engine, prompt, params, rid):
    return [out async for out in engine.generate(prompt, params, rid)]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_streams_match_generate(engine):
    expected = LLM(DEFAULT_MODEL).generate(PROMPTS, GREEDY, use_tqdm=False)

    async def main():
        await engine.start()
        try:
            return await asyncio.gather(*(collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))
        finally:
            await engine.shutdown()

    for outs, want in zip(run(main()), expected, strict=True):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids
        assert outs[-1].outputs[0].text == want.outputs[0].text
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[-1] == GREEDY.max_tokens
    stats = engine.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_usage"] == 0.0
    assert stats["generation_tokens"] >= 3 * GREEDY.max_tokens


def test_bad_input_raises_before_anything_is_yielded(engine):
    async def main():
        await engine.start()
        try:
            with pytest.raises(RequestError, match="prompt is empty"):
                await anext(engine.generate("", GREEDY, "bad"))
            with pytest.raises(RequestError, match="context"):
                await anext(engine.generate(list(range(5)) * 1000, GREEDY, "long"))
            # the engine still serves
            return await collect(engine, PROMPTS[0], GREEDY, "ok")
        finally:
            await engine.shutdown()

    assert run(main())[-1].finished


def test_abort_and_disconnect_free_the_request(engine):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        await engine.start()
        try:
            stream = engine.generate(PROMPTS[1], long, "gone")
            await anext(stream)
            await stream.aclose()  # a client that disconnects

            async def aborted():
                async for _ in engine.generate(PROMPTS[2], long, "abort-me"):
                    await engine.abort("abort-me")
            with pytest.raises(RequestFailed, match="aborted"):
                await aborted()
            done = await collect(engine, PROMPTS[0], GREEDY, "after")
            return done
        finally:
            await engine.shutdown()

    assert run(main())[-1].finished
    stats = engine.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_usage"] == 0.0
    assert not engine.engine.requests and not engine.engine.kv.tables
