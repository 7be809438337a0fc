"""ExpertCache: the request rule, capacities in items and bytes, and its invariants under random traffic."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermoe.offload.cache import ExpertCache
from tiermoe.offload.policies import POLICIES, make_policy


def test_request_reports_hits_misses_and_evictions():
    cache = ExpertCache(3, make_policy("lru"))
    assert cache.request([1, 2, 3], 0) == ([], [1, 2, 3], [])
    hits, misses, evicted = cache.request([3, 4], 1)
    assert (hits, misses, evicted) == ([3], [4], [1])
    assert sorted(cache.resident) == [2, 3, 4] and cache.used == 3 and 4 in cache and 1 not in cache


def test_discard_frees_room_and_tells_the_policy():
    cache = ExpertCache(2, make_policy("lru"))
    cache.request([1, 2], 0)
    assert cache.discard(1) and not cache.discard(1)
    assert cache.used == 1 and 1 not in cache.policy.last
    assert cache.request([3], 1).evicted == []


def test_duplicate_keys_count_once():
    cache = ExpertCache(2, make_policy("lru"))
    assert cache.request([1, 1, 2], 0) == ([], [1, 2], [])


def test_request_larger_than_capacity_names_the_minimum():
    cache = ExpertCache(3, make_policy("lru"))
    with pytest.raises(ValueError, match="minimum capacity is 4"):
        cache.request({1, 2, 3, 4}, 0)
    sized = ExpertCache(100, make_policy("lfu"), size_of=lambda k: 30)
    with pytest.raises(ValueError, match="minimum capacity is 120"):
        sized.request({1, 2, 3, 4}, 0)
    assert sized.min_capacity([1, 2]) == 60


def test_byte_capacity_evicts_until_the_misses_fit():
    sizes = {"big": 60, "a": 20, "b": 20, "c": 50}
    cache = ExpertCache(100, make_policy("lru"), size_of=sizes.__getitem__)
    cache.request(["big"], 0)
    cache.request(["a"], 1)
    cache.request(["b"], 2)
    # c needs 50 with 0 free: evict big (least recent, frees 60); a and b stay.
    assert cache.request(["c"], 3).evicted == ["big"]
    assert cache.used == 90
    # big needs 60 with 10 free: evicting a and b (the least recent) frees only 40 more, so c goes too.
    assert cache.request(["big"], 4).evicted == ["a", "b", "c"]


def test_zero_capacity_cache_rejects_everything():
    with pytest.raises(ValueError, match="minimum capacity is 1"):
        ExpertCache(0, make_policy("lru")).request([7], 0)


requests_st = st.lists(st.lists(st.integers(0, 11), min_size=1, max_size=4, unique=True), min_size=1, max_size=60)


def _check_request(cache: ExpertCache, keys: list, step: int) -> None:
    before = set(cache.resident)
    hits, misses, evicted = cache.request(keys, step)
    assert set(hits) == set(keys) & before and set(misses) == set(keys) - before
    assert not set(evicted) & set(keys), "a key of the current request was evicted"
    assert set(evicted) <= before
    assert set(keys) <= set(cache.resident)
    assert cache.used == sum(cache.size(k) for k in cache.resident)
    assert cache.used <= cache.capacity


@settings(max_examples=150, deadline=None)
@given(requests=requests_st, capacity=st.integers(4, 14), policy=st.sampled_from(sorted(POLICIES)))
def test_item_capacity_is_never_exceeded(requests, capacity, policy):
    kw = {"future": requests} if POLICIES[policy].needs_future else {}
    cache = ExpertCache(capacity, make_policy(policy, **kw))
    for step, keys in enumerate(requests):
        _check_request(cache, keys, step)


@settings(max_examples=150, deadline=None)
@given(requests=requests_st, capacity=st.integers(1, 400), policy=st.sampled_from(sorted(POLICIES)),
       sizes=st.lists(st.integers(1, 100), min_size=12, max_size=12))
def test_byte_capacity_is_never_exceeded(requests, capacity, policy, sizes):
    kw = {"future": requests} if POLICIES[policy].needs_future else {}
    cache = ExpertCache(capacity, make_policy(policy, **kw), size_of=sizes.__getitem__)
    for step, keys in enumerate(requests):
        need = sum(sizes[k] for k in keys)
        if need > capacity:
            before = (cache.resident, cache.used)
            with pytest.raises(ValueError, match=f"minimum capacity is {need}"):
                cache.request(keys, step)
            assert (cache.resident, cache.used) == before
        else:
            _check_request(cache, keys, step)
