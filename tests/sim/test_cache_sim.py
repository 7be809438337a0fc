"""The cache simulator, checked against a plain re-implementation written here from the rules alone."""

import json
from pathlib import Path

import numpy as np
import pytest

from tiermoe.offload.tiers.fetch_order import fetch_order
from tiermoe.sim.cache_sim import Capacity, batched_prefill_requests, simulate
from tiermoe.sim.trace import Trace

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"
OLMOE = SHARED / "olmoe-1b-7b-0924_decode_wikitext-mbpp.npz"
QWEN = SHARED / "qwen3-30b-a3b-q4km-top6_prefill-decode_bigmoeonedge.npz"


def load_or_skip(path: Path) -> Trace:
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return Trace.load(path)


# --- the reference: one function per policy, lists and dicts only --------------------------------------------------
# Rules: a row's experts are requested together in rank order; hits are counted; the row's experts are never
# evicted; the victim is the worst resident outside the row; recency ties inside a row follow rank order.

def ref_lru(rows: list[list[int]], cap: int) -> int:
    order: list[int] = []  # residents, least recent first
    hits = 0
    for row in rows:
        for e in row:
            if e in order:
                hits += 1
                order.remove(e)
        overflow = len(order) + len(row) - cap
        if overflow > 0:
            del order[:overflow]
        order.extend(row)
    return hits


def ref_lfu(rows: list[list[int]], cap: int) -> int:
    count: dict[int, int] = {}
    last: dict[int, int] = {}
    resident: list[int] = []
    clock = hits = 0
    for row in rows:
        for e in row:
            clock += 1
            count[e] = count.get(e, 0) + 1
            last[e] = clock
            hits += e in resident
        misses = [e for e in row if e not in resident]
        overflow = len(resident) + len(misses) - cap
        if overflow > 0:
            others = sorted((e for e in resident if e not in row), key=lambda e: (count[e], last[e]))
            for e in others[:overflow]:
                resident.remove(e)
        resident.extend(misses)
    return hits


def ref_belady(rows: list[list[int]], cap: int) -> int:
    # next_use[t][e]: the next row after t that requests e (len(rows) if none), by a backward scan.
    next_use: list[dict[int, int]] = [{} for _ in rows]
    upcoming: dict[int, int] = {}
    for t in range(len(rows) - 1, -1, -1):
        for e in rows[t]:
            next_use[t][e] = upcoming.get(e, len(rows))
        for e in rows[t]:
            upcoming[e] = t
    nxt: dict[int, int] = {}
    last: dict[int, int] = {}
    resident: list[int] = []
    clock = hits = 0
    for t, row in enumerate(rows):
        for e in row:
            clock += 1
            nxt[e] = next_use[t][e]
            last[e] = clock
            hits += e in resident
        misses = [e for e in row if e not in resident]
        overflow = len(resident) + len(misses) - cap
        if overflow > 0:
            # farthest next use first; among equals, least recent first
            others = sorted((e for e in resident if e not in row), key=lambda e: (-nxt[e], last[e]))
            for e in others[:overflow]:
                resident.remove(e)
        resident.extend(misses)
    return hits


REFERENCES = {"lru": ref_lru, "lfu": ref_lfu, "belady": ref_belady}


def test_reference_agrees_on_olmoe_at_25_percent():
    trace = load_or_skip(OLMOE)
    decode = ~np.asarray(trace.is_prefill)
    experts = np.asarray(trace.experts)[decode]  # [T, L, K]
    cap = 16  # 25% of 64
    result = simulate(trace, list(REFERENCES), [Capacity.parse("25%")])
    for name, ref in REFERENCES.items():
        run = result.run(name, "25%")
        assert run.capacity_items == cap
        for layer in range(experts.shape[1]):
            rows = [[e for e in row if e >= 0] for row in experts[:, layer, :].tolist()]
            expected = ref(rows, cap) / sum(len(r) for r in rows)
            assert run.per_layer[layer] == expected, (name, layer)
    means = {name: result.run(name, "25%").mean for name in REFERENCES}
    assert means["belady"] > max(means["lru"], means["lfu"])


def test_belady_matches_the_numbers_shipped_with_the_qwen_trace():
    # The trace's JSON carries Belady hit rates computed by the trace's curators under the same rules.
    trace = load_or_skip(QWEN)
    sanity = json.loads(QWEN.with_suffix(".json").read_text())["sanity_analysis"]
    result = simulate(trace, ["belady"], [Capacity(items=32), Capacity(items=64)])
    assert result.run("belady", "32").mean == pytest.approx(sanity["belady_hit_mean_C32"], abs=5e-5)
    assert result.run("belady", "64").mean == pytest.approx(sanity["belady_hit_mean_C64"], abs=5e-5)
    assert result.tokens == sanity["decode_tokens"]


def tiny_trace() -> Trace:
    # 1 layer, 8 experts, top-2; row 1 is prefill, row 3 has its layer not computed.
    experts = np.array([[[0, 1]], [[2, 3]], [[0, 2]], [[-1, -1]], [[1, 0]]])
    return Trace(experts, np.ones(experts.shape), [0], [False, True, False, False, False], np.arange(5),
                 meta={"num_experts": 8})


def test_decode_only_by_default_and_prefill_on_request():
    trace = tiny_trace()
    decode = simulate(trace, ["lru"], [Capacity(items=2)])
    # decode rows {0,1}, {0,2} (0 hits, 2 evicts 1), -, {1,0} (0 hits): 2 hits of 6 requests
    assert decode.tokens == 4 and decode.runs[0].hits == 2 and decode.runs[0].requests == 6
    full = simulate(trace, ["lru"], [Capacity(items=2)], include_prefill=True)
    # all rows {0,1}, {2,3} (evicts both), {0,2} (2 hits), -, {1,0} (0 hits): 2 hits of 8 requests
    assert full.runs[0].hits == 2 and full.runs[0].requests == 8


def test_prefill_warms_the_cache_but_only_decode_counts():
    trace = tiny_trace()
    cap = [Capacity(items=4)]
    decode = simulate(trace, ["lru"], cap)
    # decode rows {0,1}, {0,2} (0 hits), -, {1,0} (both hit): 3 hits of 6 requests
    assert decode.runs[0].hits == 3 and decode.runs[0].requests == 6
    warm = simulate(trace, ["lru", "learned", "belady"], cap, warmup_prefill=True)
    # prefill {2,3} is replayed uncounted, so {0,2} hits both: 4 hits of the same 6 decode requests
    assert warm.tokens == 4 and warm.warmup_prefill
    assert warm.run("lru", "4").hits == 4 and warm.run("lru", "4").requests == 6
    assert all(r.requests == 6 for r in warm.runs)
    full = simulate(trace, ["lru"], cap, include_prefill=True)  # the same replay, prefill counted too
    assert full.runs[0].hits == 4 and full.runs[0].requests == 8


def test_batched_prefill_warms_the_cache_as_the_engine_runs_a_prompt():
    # 1 layer, 8 experts, top-2: sequence 0 = prompt of 3 tokens + 2 decode tokens, sequence 1 = 1 + 1
    experts = np.array([[[4, 5]], [[1, 2]], [[6, 3]], [[3, 6]], [[1, 2]], [[0, 1]], [[1, 0]]])
    trace = Trace(experts, np.ones(experts.shape), [0, 5], [True, True, True, False, False, True, False],
                  np.arange(7), meta={"num_experts": 8})
    requests, counted = batched_prefill_requests(trace, 0, 2)
    # each prompt's experts by latest token (ties by id), in turns of 2, then its decode rows
    assert requests == [[4, 5], [1, 2], [3, 6], [3, 6], [1, 2], [0, 1], [1, 0]]
    assert counted == [False, False, False, True, True, False, True]
    result = simulate(trace, ["lru", "belady"], [Capacity(items=2)], prefill_order=fetch_order)
    assert result.tokens == 3 and result.warmup_prefill and result.prefill_order == "fetch_order"
    assert result.run("lru", "2").hits == 4 and result.run("lru", "2").requests == 6  # {3,6} and {1,0} hit
    with pytest.raises(ValueError, match="include_prefill"):
        simulate(trace, ["lru"], [Capacity(items=2)], include_prefill=True, prefill_order=fetch_order)


def test_capacity_rounding_and_minimum():
    assert Capacity.parse("25%").items_for(64) == 16
    assert Capacity.parse("12.5%").items_for(60) == 8  # 7.5 rounds half up
    assert Capacity.parse("0.1").items_for(128) == 13
    assert Capacity.parse("16").items_for(64) == 16
    with pytest.raises(ValueError, match="minimum capacity is 2 experts"):
        simulate(tiny_trace(), ["lru"], [Capacity.parse("10%")])  # 0.8 -> 1 expert < top-2
    with pytest.raises(ValueError, match="known policies"):
        simulate(tiny_trace(), ["nope"], [Capacity(items=2)])


def test_result_serialises_to_json():
    result = simulate(tiny_trace(), ["lru", "belady"], [Capacity(items=2), Capacity.parse("50%")])
    data = json.loads(result.to_json())
    assert [(r["policy"], r["capacity"], r["capacity_items"]) for r in data["runs"]] == [
        ("lru", "2", 2), ("lru", "50%", 4), ("belady", "2", 2), ("belady", "50%", 4)]
    assert len(data["runs"][0]["per_layer"]) == 1
