"""TIDE on the RAM tier, with real direct-I/O reads: the budget never exceeded, placement changed only at refresh
steps, faults contained; and the engine options that turn it on. Lossless for every tau and budget:
test_lossless_matrix.py."""

from concurrent.futures import Future

import pytest
import torch

from tests.decode.test_diffusion import LONG
from tiermoe import LLM, SamplingParams
from tiermoe.cli import build_parser
from tiermoe.errors import ConfigError, ExpertIOError
from tiermoe.offload.placement.refresh import DenoiseStep
from tiermoe.offload.placement.refresh_store import RefreshStore
from tiermoe.offload.tiers.store import ResidentStore, loaded_nbytes

REFRESH, REUSE = DenoiseStep(0, 0, True), DenoiseStep(1, 1, False)


def test_refresh_steps_follow_tau(folders):
    # threshold 1 commits one position per step: the first block (5 masked positions) takes 5 steps, the next
    # three 8 each. tau=4 refreshes all 5, then steps 0 and 4 of each later block.
    llm = LLM(folders["llada2_moe"], expert_cache="50%", tau=4)
    out = llm.generate([LONG], SamplingParams(temperature=0, max_tokens=24, block_length=8, steps=8, threshold=1.0))
    d = out[0].stats["diffusion"]
    assert (d["nfe"], d["refresh_steps"], d["tau"]) == (29, 11, 4)
    assert out[0].stats["refresh"]["refreshes"] == 11 * len(llm.model.moe_blocks)


@pytest.fixture
def store(folders):
    llm = LLM(folders["llada2_moe"])
    layers = [b.layer for b in llm.model.moe_blocks]
    total = sum(loaded_nbytes(s, torch.float32) for s in llm.index.experts().values())
    s = RefreshStore(llm.index, torch.float32, total // 4, layers, llm.model.shape.top_k)
    yield s, ResidentStore(llm.index, torch.float32), layers
    s.close()


def served(store, layer, experts, counts, reference):
    """Fetch and check every expert's weights against the all-resident store, and the budget while serving."""
    got = []
    for e, w in store.fetch(layer, experts, counts):
        assert store.resident_bytes <= store.cache.capacity and store.cache.used <= store.budget - store.reserve
        (_, ref), = reference.fetch(layer, [e])
        assert torch.equal(w.gate_up, ref.gate_up) and torch.equal(w.down, ref.down)
        got.append(e)
    assert sorted(got) == experts
    return got


def test_refresh_places_the_busiest_and_reuse_steps_admit_nothing(store):
    s, reference, (layer, *_) = store
    capacity = s.placement.capacity // s.cache.size((layer, 0))
    assert capacity >= 1
    s.begin_step(REFRESH)
    experts = list(range(8))
    counts = [1, 9, 2, 8, 3, 7, 4, 6]
    served(s, layer, experts, counts, reference)
    busiest = sorted(experts, key=lambda e: -counts[e])[:capacity]
    assert s.placement.fast(layer) == set(busiest) and {e for _, e in s.weights} == set(busiest)
    s.begin_step(REUSE)
    before = dict(s.weights)
    reuse = sorted({busiest[0], *range(7, 16)})  # one fast expert, nine others
    order = served(s, layer, reuse, [50] * 10, reference)
    assert s.weights == before  # hot or not, nothing new is admitted between refreshes
    assert order[0] == busiest[0]  # the fast expert is served first
    assert s.stats.streamed == (8 - capacity) + 9
    s.begin_step(REFRESH)
    served(s, layer, list(range(10, 16)), [50] * 6, reference)
    assert s.placement.fast(layer) == set(range(10, 10 + capacity))  # 0 tokens now: every resident makes room


def test_a_failed_read_leaves_placement_and_budget_consistent(store, monkeypatch):
    s, reference, (layer, *_) = store
    submit = s._submit

    def failing(key):  # the read of expert 3 fails, on whichever readers the store has
        if key != (layer, 3):
            return submit(key)
        fut = Future()
        fut.set_exception(ExpertIOError("disk says no"))
        return fut

    monkeypatch.setattr(s, "_submit", failing)
    s.begin_step(REFRESH)
    with pytest.raises(ExpertIOError):
        list(s.fetch(layer, [1, 3, 5], [1, 9, 1]))
    assert (layer, 3) not in s.cache and not s.placement.is_fast(layer, 3)
    assert set(s.weights) == {k for k in s.cache.resident}  # the books agree
    monkeypatch.setattr(s, "_submit", submit)
    served(s, layer, [1, 3, 5], [1, 9, 1], reference)
    assert s.placement.is_fast(layer, 3)


def test_tau_options_are_checked(folders, tiny_models):
    with pytest.raises(ConfigError, match="needs an expert budget"):
        LLM(folders["llada2_moe"], tau=2)
    for bad in (0, "sometimes", 1.5):
        with pytest.raises(ConfigError, match="tau"):
            LLM(folders["llada2_moe"], expert_cache="50%", tau=bad)
    with pytest.raises(ConfigError, match="diffusion models only"):
        LLM(tiny_models("mixtral"), expert_cache="50%", tau=2)
    parser = build_parser()
    assert parser.parse_args(["generate", "hi", "--tau", "auto"]).tau == "auto"
    assert parser.parse_args(["generate", "hi", "--tau", "3"]).tau == 3
    assert parser.parse_args(["generate", "hi"]).tau is None
