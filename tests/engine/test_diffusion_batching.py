"""Diffusion requests in the engine: steps of different requests batched in one forward give each request the tokens
it gets decoded alone, whatever the scheduling policy, arrivals, block lengths and token budget; KV within its
budget; nothing left. Each policy picks what it says: fcfs-request one request at a time, phase every step that fits
the budget, the oldest heavy step first."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiermoe import LLM
from tiermoe.config import EngineConfig
from tiermoe.decode import diffusion
from tiermoe.decode.diffusion import DiffusionOptions
from tiermoe.engine import LLMEngine
from tiermoe.engine.kv_cache_manager import KVCacheManager
from tiermoe.engine.scheduler import DIFFUSION_POLICIES, DiffusionScheduler
from tiermoe.errors import ConfigError
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL
from tiermoe.sampling_params import SamplingParams

ENGINES = {"llada2_moe": {}, "llada": {}, "builtin-offloaded": {"expert_cache": "30%"}}


@pytest.fixture(scope="module")
def engines(folders):
    made = {}

    def get(name: str) -> LLMEngine:
        if name not in made:
            folder = DEFAULT_DIFFUSION_MODEL if name.startswith("builtin") else folders[name]
            made[name] = LLMEngine(EngineConfig(model=folder, **ENGINES[name]))
        return made[name]

    return get


def params(block_length: int, steps: int, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, block_length=block_length, steps=steps,
                          threshold=0.9, ignore_eos=True)


def alone(engine: LLMEngine, prompt: list[int], p: SamplingParams) -> list[int]:
    req = engine.new_request(prompt, p)
    diffusion.generate(engine.model, [req], engine.tokenizer, engine.diffusion, DiffusionOptions())
    return req.output_ids


request = st.tuples(st.integers(0, 4), st.integers(1, 20), st.sampled_from([4, 8]), st.integers(1, 6),
                    st.integers(1, 16))


def check_pick(policy: str, running: list, chosen: list, budget: int | None) -> None:
    """What each policy promises of one engine step's pick."""
    assert chosen or not running
    if policy == "fcfs-request":
        assert len(running) <= 1
    if policy != "phase" or budget is None:
        return
    left = budget - sum(diffusion_cost(j) for j in chosen)
    assert left >= 0 or len(chosen) == 1  # over the budget only a step that alone does not fit it
    # nothing left out would have fitted: a heavy step holds back no light one
    assert all(diffusion_cost(j) > left for j in running if j not in chosen)
    heavy = [j for j in running if j.pending is not None and j.pending.heavy]
    if heavy and diffusion_cost(heavy[0]) <= budget:  # the oldest heavy step is never starved by light ones
        assert heavy[0] in chosen


def diffusion_cost(job) -> int:
    return job.pending.cost if job.pending is not None else 0


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(sorted(ENGINES)), policy=st.sampled_from(sorted(DIFFUSION_POLICIES)),
       requests=st.lists(request, min_size=1, max_size=5), max_num_seqs=st.integers(1, 5),
       budget=st.one_of(st.none(), st.integers(1, 40)), kv_room=st.integers(0, 96), seed=st.integers(0, 999))
def test_batched_diffusion_equals_each_request_alone(engines, name, policy, requests, max_num_seqs, budget, kv_room,
                                                     seed):
    engine = engines(name)
    rng = random.Random(seed)
    vocab = engine.model.shape.vocab_size
    reqs = [(t, [rng.randrange(vocab) for _ in range(n)], params(b, s, m)) for t, n, b, s, m in requests]
    expected = {str(i): alone(engine, prompt, p) for i, (_, prompt, p) in enumerate(reqs)}
    per_token = engine.kv.bytes_per_token
    # room for the largest canvas and kv_room tokens more: admissions wait for KV blocks
    canvas = max(diffusion.canvas_length(engine.new_request(prompt, p), engine.diffusion.schedule)
                 for _, prompt, p in reqs)
    engine.kv = KVCacheManager((canvas + 4 + kv_room) * per_token, per_token, 4)
    scheduler = engine.diffusion_scheduler = DiffusionScheduler(engine.kv, max_num_seqs, budget, policy)
    schedule = scheduler.schedule

    def checked_schedule():
        chosen = schedule()
        check_pick(policy, list(scheduler.running), chosen, budget)
        return chosen

    scheduler.schedule = checked_schedule
    pending = sorted(range(len(reqs)), key=lambda i: reqs[i][0])
    got, step, outputs_per_request = {}, 0, {}
    while pending or engine.has_unfinished_requests():
        while pending and reqs[pending[0]][0] <= step:
            i = pending.pop(0)
            engine.add_request(str(i), reqs[i][1], reqs[i][2])
        for out in engine.step():
            outputs_per_request[out.request_id] = outputs_per_request.get(out.request_id, 0) + 1
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        assert engine.kv.used_bytes <= engine.kv.budget
        step += 1
    assert got == expected
    assert engine.kv.used_blocks == 0 and not engine.jobs
    # one output per committed block: a request of several blocks streams more than once
    for i, (_, _, p) in enumerate(reqs):
        if len(expected[str(i)]) > p.block_length:
            assert outputs_per_request[str(i)] > 1


def test_steps_of_concurrent_requests_share_forwards(engines, monkeypatch):
    engine = engines("builtin-offloaded")
    per_token = engine.kv.bytes_per_token
    engine.kv = KVCacheManager(4096 * per_token, per_token)
    engine.diffusion_scheduler = DiffusionScheduler(engine.kv, 8, None)
    sizes, real = [], diffusion.forward
    monkeypatch.setattr(diffusion, "forward", lambda model, jobs: (sizes.append(len(jobs)), real(model, jobs))[1])
    p = params(8, 4, 16)
    prompts = [engine.tokenizer.encode(t) for t in ("ROMEO:", "JULIET: O", "First Citizen:", "KING")]
    expected = [alone(engine, prompt, p) for prompt in prompts]
    sizes.clear()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, p)
    got = {}
    while engine.has_unfinished_requests():
        got.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert [got[f"r{i}"] for i in range(4)] == expected
    assert max(sizes) == 4 and engine.stats()["generation_tokens"] >= 4 * 16


def test_the_scheduler_is_chosen_by_name_and_unknown_names_are_refused():
    prompts = ["ROMEO:", "JULIET: O", "KING"]
    p = params(8, 4, 16)
    outputs = {}
    for name in DIFFUSION_POLICIES:
        llm = LLM(DEFAULT_DIFFUSION_MODEL, scheduler=name, max_num_batched_tokens=32)
        assert llm.engine.diffusion_scheduler.policy is DIFFUSION_POLICIES[name]
        outputs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    assert outputs["fcfs"] == outputs["phase"] == outputs["fcfs-request"]
    default = LLM(DEFAULT_DIFFUSION_MODEL).engine.diffusion_scheduler
    assert default.policy is DIFFUSION_POLICIES["phase"] and default.max_num_seqs == 256
    with_tau = LLM(DEFAULT_DIFFUSION_MODEL, expert_cache="50%", tau=2).engine.diffusion_scheduler
    assert with_tau.policy is DIFFUSION_POLICIES["fcfs-request"] and with_tau.max_num_seqs == 1
    with pytest.raises(ConfigError, match="scheduler must be one of fcfs-request, fcfs, phase; got 'PHASE'"):
        LLM(DEFAULT_DIFFUSION_MODEL, scheduler="PHASE")
