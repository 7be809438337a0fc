"""Continuous batching is lossless and keeps its budgets: whatever the arrival times, batch composition, chunked-
prefill split, preemption and expert budget, each request's greedy tokens are those it gets alone; KV and expert
bytes stay within their budgets; aborts and preemptions leave nothing behind; a failing request fails alone."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiermoe.config import EngineConfig
from tiermoe.engine import LLMEngine
from tiermoe.engine.kv_cache_manager import KVCacheManager, PagedBatch
from tiermoe.engine.scheduler import Scheduler
from tiermoe.errors import RequestFailed
from tiermoe.models.layers import ForwardBatch, SeqSlice
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.sampling_params import SamplingParams

# (family or "builtin", engine options): resident, MLA, and offloaded under tight expert budgets
ENGINES = {
    "olmoe": ("olmoe", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "deepseek_v2": ("deepseek_v2", {}),
    "mixtral-offloaded": ("mixtral", {"expert_cache": "30%"}),
    "builtin-offloaded": ("builtin", {"expert_cache": "25%"}),
}


@pytest.fixture(scope="module")
def engines(tiny_models):
    made = {}

    def get(name: str) -> LLMEngine:
        if name not in made:
            family, options = ENGINES[name]
            folder = DEFAULT_MODEL if family == "builtin" else tiny_models(family)
            made[name] = LLMEngine(EngineConfig(model=folder, **options))
        return made[name]

    return get


def configure(engine: LLMEngine, kv_tokens: int, block_size: int, max_num_seqs: int, budget: int | None) -> None:
    """A fresh scheduler and KV cache, as LLMEngine(kv_cache_memory=..., max_num_seqs=..., max_num_batched_tokens=...)
    would make them, without reloading the model."""
    per_token = engine.kv.bytes_per_token
    engine.kv = KVCacheManager(kv_tokens * per_token, per_token, block_size)
    engine.scheduler = Scheduler(engine.kv, max_num_seqs, budget)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


_alone: dict = {}


def alone(name: str, engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    """The request's tokens when it runs by itself, its prompt in one step."""
    key = (name, tuple(prompt), max_tokens)
    if key not in _alone:
        configure(engine, 4096, 16, 1, None)
        _alone[key] = run(engine, [(0, prompt, max_tokens, 0)])[0]
    return _alone[key]


def run(engine: LLMEngine, requests: list[tuple[int, list[int], int, int]], check=None) -> dict[int, list[int]]:
    """Add request i (arrival step, prompt, max_tokens, priority) at its arrival step and step until all are done;
    `check(engine)` runs after every step. Returns each request's generated tokens."""
    pending = sorted(range(len(requests)), key=lambda i: requests[i][0])
    done, step = {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and requests[pending[0]][0] <= step:
            i = pending.pop(0)
            engine.add_request(str(i), requests[i][1], greedy(requests[i][2]), priority=requests[i][3])
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        if check is not None:
            check(engine)
        step += 1
    return done


def within_budgets(engine: LLMEngine) -> None:
    kv = engine.kv
    assert kv.used_bytes <= kv.budget and kv.pool_bytes <= kv.budget
    store = engine.store
    if hasattr(store, "budget"):
        assert store.resident_bytes <= store.budget


request = st.tuples(st.integers(0, 6), st.integers(1, 40), st.integers(1, 10), st.integers(0, 1))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(sorted(ENGINES)), requests=st.lists(request, min_size=1, max_size=6),
       block_size=st.sampled_from([1, 4, 16]), max_num_seqs=st.integers(1, 6),
       budget=st.one_of(st.none(), st.integers(1, 32)), spare=st.integers(0, 60), seed=st.integers(0, 2**16))
def test_batched_greedy_tokens_equal_each_request_alone(engines, name, requests, block_size, max_num_seqs, budget,
                                                         spare, seed):
    engine = engines(name)
    rng = random.Random(seed)
    vocab = engine.model.shape.vocab_size
    reqs = [(t, [rng.randrange(vocab) for _ in range(n)], m, p) for t, n, m, p in requests]
    expected = {i: alone(name, engine, r[1], r[2]) for i, r in enumerate(reqs)}
    # room for the longest request alone plus `spare` tokens: small values force preemptions
    longest = max(len(r[1]) + r[2] for r in reqs)
    kv_tokens = -(-longest // block_size) * block_size + spare
    configure(engine, kv_tokens, block_size, max_num_seqs, budget)
    assert run(engine, reqs, within_budgets) == expected
    assert engine.kv.used_blocks == 0 and not engine.kv.tables


def test_preemption_recomputes_and_gives_the_same_tokens(engines):
    engine = engines("qwen2_moe")
    rng = random.Random(1)
    reqs = [(0, [rng.randrange(128) for _ in range(12)], 20, 0) for _ in range(4)]
    expected = {i: alone("qwen2_moe", engine, r[1], r[2]) for i, r in enumerate(reqs)}
    configure(engine, 48, 4, 4, 16)  # 4 requests of up to 32 tokens in room for 48: some must be preempted
    preempted = []
    original = engine.scheduler._preempt
    engine.scheduler._preempt = lambda req: (preempted.append(req.request_id), original(req))
    assert run(engine, reqs, within_budgets) == expected
    assert preempted


@pytest.mark.parametrize("name", ["mixtral-offloaded", "olmoe"])
def test_rows_are_batch_invariant(engines, name):
    """A decode row and prefill chunks computed beside other requests' rows give the bits they give alone, with the
    batch's attention in one call over the paged caches (as the engine runs it) and one request at a time; resident
    experts run grouped, one call per layer, offloaded ones in the groups the store hands over."""
    engine = engines(name)
    configure(engine, 4096, 16, 8, None)
    rng = random.Random(2)
    reqs = [engine.new_request([rng.randrange(128) for _ in range(n)], greedy(4)) for n in (9, 30, 5, 17)]
    for r in reqs:
        engine.kv.allocate(r.request_id, 64)
        r.cache = engine.kv.view(r.request_id)

    def hidden(parts: list[tuple[int, int, list[int]]], paged: bool = True) -> list[torch.Tensor]:
        """Rows of (request, first position, tokens) parts in one forward -> each part's hidden states."""
        ids = [t for _, _, toks in parts for t in toks]
        positions = [p for _, start, toks in parts for p in range(start, start + len(toks))]
        slices, row = [], 0
        for i, start, toks in parts:
            slices.append(SeqSlice(reqs[i].cache, row, len(toks), start))
            row += len(toks)
        batch = ForwardBatch(torch.tensor(positions), slices, paged=PagedBatch.of(slices) if paged else None)
        with torch.inference_mode():
            out = engine.model(torch.tensor(ids), batch)
        return list(out.split([len(toks) for _, _, toks in parts]))

    p = [r.prompt_ids for r in reqs]
    hidden([(0, 0, p[0])])  # request 0's prompt is cached: it decodes next
    parts = [(3, 0, p[3][:11]), (0, 9, [3]), (1, 0, p[1][:20]), (2, 0, p[2])]
    batched = hidden(parts)
    for part, rows in zip(parts, batched, strict=True):
        assert torch.equal(rows, hidden([part])[0])
        assert torch.equal(rows, hidden([part], paged=False)[0])
    # the rest of request 1's prompt, as a second chunk beside a decode, equals the same rows of its prompt in one go
    second = hidden([(1, 20, p[1][20:]), (0, 9, [3])])[0]
    assert torch.equal(second, hidden([(1, 0, p[1])])[0][20:])
    for r in reqs:
        engine.kv.free(r.request_id)


def test_no_leak_after_a_thousand_requests_with_aborts(engines):
    engine = engines("mixtral-offloaded")
    configure(engine, 256, 4, 12, 24)
    rng = random.Random(3)
    vocab = engine.model.shape.vocab_size
    live, added = [], 0
    while added < 1000 or engine.has_unfinished_requests():
        for _ in range(rng.randrange(4) if added < 1000 else 0):
            rid = str(added)
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 24))]
            engine.add_request(rid, prompt, greedy(rng.randrange(1, 6)))
            live.append(rid)
            added += 1
        if live and rng.random() < 0.3:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
        within_budgets(engine)
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv.used_blocks == 0 and not engine.kv.tables
    assert engine.stats()["kv_usage"] == 0.0


def test_an_unreadable_expert_file_fails_only_the_requests_that_read_it(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models("mixtral"), tmp_path / "mixtral")
    engine = LLMEngine(EngineConfig(model=folder, expert_cache="100%", prefetch="off"))
    short, long = [5, 6], list(range(1, 120))
    engine.add_request("warm", short, greedy(2))
    while engine.has_unfinished_requests():
        engine.step()
    cached = set(engine.store.weights)
    assert len(cached) < len(engine.index.experts())  # some experts are still on disk only
    # the checkpoint is cut short under the engine: every expert not in RAM is now unreadable
    (shard,) = {p.file for s in engine.index.experts().values() for p in s.parts}
    os.truncate(shard, os.path.getsize(shard) // 2)
    engine.add_request("cached", short, greedy(2))
    engine.add_request("reads", long, greedy(2))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert outs["cached"].error is None and len(outs["cached"].outputs[0].token_ids) == 2
    assert isinstance(outs["reads"].error, RequestFailed)
    assert "changed after the engine opened it" in str(outs["reads"].error.__cause__)
    assert engine.kv.used_blocks == 0 and not engine.requests


def test_waiting_requests_are_admitted_by_priority_then_arrival(engines):
    engine = engines("qwen2_moe")
    configure(engine, 4096, 16, 1, None)  # one seat: admission order is completion order
    for rid, priority in (("a", 1), ("b", 0), ("c", 1), ("d", 0)):
        engine.add_request(rid, [1, 2, 3], greedy(2), priority=priority)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["b", "d", "a", "c"]


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "llada2_moe"])
def test_a_row_among_48_on_2_threads_gives_its_bits_alone(tiny_models, folders, family):
    """Sigmoid gates and routers (qwen2_moe's shared-expert gate, deepseek_v3's and llada2_moe's router) over many
    rows: torch computes vector-sized runs of a tensor and its tail by different exp code and splits it between
    threads, so without a position-independent sigmoid a row's bits would depend on its place in the batch."""
    folder = folders[family] if family == "llada2_moe" else tiny_models(family)
    engine = LLMEngine(EngineConfig(model=folder))
    rng = random.Random(4)
    tokens = [rng.randrange(engine.model.shape.vocab_size - 1) for _ in range(48)]  # never llada2's mask id
    caches = []
    for i in range(len(tokens)):
        engine.kv.allocate(str(i), 1)
        caches.append(engine.kv.view(str(i)))

    def hidden(rows: list[int]) -> torch.Tensor:
        """One forward of the given requests' one-token prompts -> their hidden states [len(rows), H]."""
        slices = [SeqSlice(caches[i], n, 1, 0) for n, i in enumerate(rows)]
        batch = ForwardBatch(torch.zeros(len(rows), dtype=torch.long), slices, paged=PagedBatch.of(slices))
        with torch.inference_mode():
            return engine.model(torch.tensor([tokens[i] for i in rows]), batch)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batched = hidden(list(range(len(tokens))))
        for i in range(len(tokens)):
            assert torch.equal(batched[i], hidden([i])[0]), f"row {i}"
    finally:
        torch.set_num_threads(before)
