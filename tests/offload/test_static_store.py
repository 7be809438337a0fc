"""The static placement (cache_policy="static"): the experts most used on calibration prompts pinned in the RAM
budget, the rest streamed and never cached. Lossless, the pinned set is the calibrated top set under the budget,
the budget is never exceeded, and missing or stale calibrations are refused by name."""

import os

import pytest
import torch

from tests.decode.test_diffusion import LONG, SHORT
from tiermoe import LLM, SamplingParams
from tiermoe.cli import main
from tiermoe.errors import ConfigError
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.offload.placement.static_store import StaticStore
from tiermoe.offload.placement.usage import count_usage, load_usage, save_usage, usage_path
from tiermoe.offload.tiers.store import ResidentStore

PARAMS = SamplingParams(temperature=0, max_tokens=24, block_length=8, steps=8, threshold=0.95, ignore_eos=True)
CALIBRATION = [[5, 60, 8, 33, 101, 47, 12], [140, 3, 77, 25, 9], [66, 18, 120, 4, 51, 30]]  # not the test prompts


@pytest.fixture(scope="module")
def model(folders):
    """The tiny llada2_moe, calibrated on prompts other than the test's; its all-resident outputs."""
    llm = LLM(folders["llada2_moe"])
    usage = count_usage(llm, CALIBRATION, PARAMS)
    save_usage(llm.index, usage)
    expected = [o.outputs[0].token_ids for o in llm.generate([LONG, SHORT], PARAMS)]
    return folders["llada2_moe"], usage, expected


def test_usage_counts_every_expert_request_of_the_run(model):
    folder, usage, _ = model
    llm = LLM(folder)
    (out, *_) = llm.generate(CALIBRATION, PARAMS)
    total = out.stats["total"]  # the all-resident store: one hit or miss per expert per layer per forward
    assert sum(usage.requests.values()) == total["hits"] + total["misses"]
    assert sum(usage.tokens.values()) > sum(usage.requests.values())  # diffusion steps route whole blocks
    assert usage.info["prompts"] == 3 and usage.info["generated_tokens"] == 3 * 24


@pytest.mark.parametrize("budget", ["50%", "25%"])
def test_static_is_token_identical_pins_the_top_set_and_caches_nothing_else(model, budget):
    folder, usage, expected = model
    llm = LLM(folder, expert_cache=budget, cache_policy="static")
    store = llm.store
    assert isinstance(store, StaticStore)
    # The calibrated top set under the budget: experts are equal in size here, so as many as fit, each requested at
    # least as often in calibration as any expert left out.
    pinned, size = store.placement.pinned, store.cache.size((1, 0))
    assert len(pinned) == store.cache.capacity // size and 1 <= len(pinned) < len(llm.index.experts())
    left_out = set(llm.index.experts()) - pinned
    assert min(usage.requests[k] for k in pinned) >= max(usage.requests[k] for k in left_out)
    assert min(usage.requests[k] for k in pinned) > min(usage.requests[k] for k in left_out)  # a real choice
    assert store.cache.capacity == store.budget - store.reserve
    assert store.reserve >= store.window * size  # room for the streamed experts alive at once
    outputs = llm.generate([LONG, SHORT], PARAMS)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert set(store.weights) <= store.placement.pinned  # streamed experts were never cached
    assert store.cache.used <= store.cache.capacity
    stats = outputs[0].stats
    assert stats["refresh"]["streamed"] > 0 and stats["evictions"] == 0
    assert stats["total"]["hits"] > 0


def test_budget_holds_while_serving(model):
    folder, usage, _ = model
    llm = LLM(folder)
    layers = [b.layer for b in llm.model.moe_blocks]
    ranking = usage.ranking(sorted(llm.index.experts()))
    s = StaticStore(llm.index, torch.float32, 9 * 24 * 1024, layers, llm.model.shape.top_k, ranking)
    reference = ResidentStore(llm.index, torch.float32)
    try:
        for _ in range(2):  # the second time, the pinned experts are hits
            for layer in layers:
                experts = list(range(16))
                got = []
                for e, w in s.fetch(layer, experts, [1] * 16):
                    assert s.resident_bytes <= s.cache.capacity <= s.budget - s.reserve
                    (_, ref), = reference.fetch(layer, [e])
                    assert torch.equal(w.gate_up, ref.gate_up) and torch.equal(w.down, ref.down)
                    got.append(e)
                assert sorted(got) == experts
        pinned = len(s.placement.pinned)
        assert s.stats.total.hits == pinned and s.stats.streamed == 2 * 2 * 16 - 2 * pinned
    finally:
        s.close()


def test_autoregressive_models_too(tiny_models):
    folder = tiny_models("mixtral")
    llm = LLM(folder)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    count_usage(llm, [[7, 3, 19, 41, 5], [60, 2, 33]], params)  # counts only; nothing saved yet
    with pytest.raises(ConfigError, match="tiermoe calibrate"):
        LLM(folder, expert_cache="50%", cache_policy="static")
    save_usage(llm.index, count_usage(llm, [[7, 3, 19, 41, 5], [60, 2, 33]], params))
    expected = llm.generate([[11, 4, 25, 8]], params)[0].outputs[0].token_ids
    static = LLM(folder, expert_cache="50%", cache_policy="static")
    assert static.generate([[11, 4, 25, 8]], params)[0].outputs[0].token_ids == expected


def test_missing_stale_and_conflicting_calibrations_are_refused(model, folders, tmp_path):
    folder, usage, _ = model
    with pytest.raises(ConfigError, match="needs an expert budget"):
        LLM(folder, cache_policy="static")
    for option in ({"tau": 2}, {"prefetch": "plain"}):
        with pytest.raises(ConfigError, match=f"cannot be combined with {next(iter(option))}"):
            LLM(folder, expert_cache="50%", cache_policy="static", **option)
    with pytest.raises(ConfigError, match="or static"):
        LLM(folder, expert_cache="50%", cache_policy="belady")
    # A checkpoint rewritten since calibration (another time stamp) has no calibration.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in os.listdir(folder):
        (copy / f).write_bytes((folder / f).read_bytes())
    with pytest.raises(ConfigError, match=f"{copy}.*tiermoe calibrate --model"):
        LLM(copy, expert_cache="50%", cache_policy="static")
    # A calibration naming an expert the model does not have.
    llm = LLM(copy)
    usage.requests[(99, 0)] = 1
    try:
        save_usage(llm.index, usage)
    finally:
        del usage.requests[(99, 0)]
    layers = [b.layer for b in llm.model.moe_blocks]
    with pytest.raises(ConfigError, match="layer 99, expert 0"):
        load_usage(llm.index, layers)
    usage_path(llm.index).write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable"):
        load_usage(llm.index, layers)


def test_calibrate_command_saves_what_static_pins(capsys):
    args = ["calibrate", "--only", "usage", "--usage-prompts", "2", "--chunk-tokens", "24", "--max-tokens", "8",
            "--json"]
    assert main(args) == 0
    assert '"expert_usage"' in capsys.readouterr().out
    llm = LLM(DEFAULT_MODEL, expert_cache="25%", cache_policy="static")
    usage = load_usage(llm.index, [b.layer for b in llm.model.moe_blocks])
    assert usage.info["prompts"] == 2 and llm.store.placement.pinned
    top = usage.ranking(sorted(llm.index.experts()))[0]
    assert top in llm.store.placement.pinned
