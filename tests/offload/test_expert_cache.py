"""ExpertCache: the request rule, capacities in items and bytes, and its invariants under random traffic."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermoe.offload.policies import POLICIES, make_policy
from tiermoe.offload.tiers.cache import ExpertCache


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


# --- scan resistance: a horizon of one pass over the layers ------------------------------------------------------

LIVE = sorted(name for name, cls in POLICIES.items() if not cls.needs_future)


def replay(cache: ExpertCache, requests: list[list], passes: int = 1) -> list[tuple]:
    return [tuple(map(tuple, cache.request(keys, step))) for step, keys in enumerate(requests * passes)]


@pytest.mark.parametrize("policy", LIVE)
def test_a_cycle_longer_than_the_cache_keeps_a_stable_share_with_a_horizon(policy):
    cycle = [[(layer, e) for e in (0, 1)] for layer in range(8)]  # one token: 8 layers x top-2 = 16 keys
    plain = replay(ExpertCache(8, make_policy(policy)), cycle, passes=5)
    assert sum(len(hits) for hits, _, _ in plain[8:]) == 0, "each key is evicted just before its next use"
    resisting = replay(ExpertCache(8, make_policy(policy), horizon=8), cycle, passes=5)
    # the first four layers' keys were admitted and stay; the last four's are streamed on every pass
    assert [len(hits) for hits, _, _ in resisting[8:]] == ([2] * 4 + [0] * 4) * 4
    assert all(not evicted for _, _, evicted in resisting[4:]), "once full, misses are streamed, nothing churns"


@settings(max_examples=150, deadline=None)
@given(requests=requests_st, policy=st.sampled_from(LIVE), horizon=st.integers(1, 6), data=st.data())
def test_above_the_working_set_a_horizon_changes_nothing(requests, policy, horizon, data):
    """When every `horizon` consecutive requests touch at most `capacity - 1` distinct keys, an evictable resident
    older than the horizon always exists, so every outcome (and the policy's choices) are those without one."""
    widest = max(len({k for keys in requests[max(0, i - horizon + 1):i + 1] for k in keys})
                 for i in range(len(requests)))
    capacity = data.draw(st.integers(widest + 1, widest + 4), label="capacity")
    plain, resisting = ExpertCache(capacity, make_policy(policy)), ExpertCache(capacity, make_policy(policy),
                                                                               horizon=horizon)
    for step, keys in enumerate(requests):
        assert resisting.request(keys, step) == plain.request(keys, step)
        assert resisting.propose(step, keys) == plain.propose(step, keys)


def test_a_prefetch_takes_only_the_room_of_residents_older_than_the_horizon():
    cache = ExpertCache(3, make_policy("lru"), horizon=3)
    cache.request([1], 0)
    cache.request([2], 1)
    cache.request([3], 2)
    assert cache.admit([4], 2, pinned=[3]) == ([], [], [])  # 1 and 2 were requested within 3 steps: 4 is skipped
    cache.request([3], 3)  # 1 is now older than the horizon
    assert cache.admit([4], 3, pinned=[3]) == ([], [4], [1])


def test_a_request_streams_what_fits_only_by_evicting_the_working_set():
    cache = ExpertCache(2, make_policy("lru"), horizon=3)
    cache.request([1, 2], 0)
    hits, misses, evicted = cache.request([1, 3], 1)
    assert (hits, misses, evicted) == ([1], [], []) and sorted(cache.resident) == [1, 2]  # 3 streamed
    assert 3 not in cache.policy.last, "a streamed key leaves no trace among the policy's residents"
    cache.request([1], 2)
    cache.request([1], 3)  # 2 was last requested at step 0: older than the horizon
    assert cache.request([3], 4) == ([], [3], [2])


def test_shrink_evicts_the_policys_victims_but_never_the_pinned():
    cache = ExpertCache(4, make_policy("lru"), horizon=4)
    cache.request([1, 2, 3, 4], 0)
    assert cache.shrink(2, 1, pinned=[1, 2]) == [3, 4] and cache.capacity == 2 and cache.used == 2
    with pytest.raises(ValueError, match="minimum capacity is 2"):
        cache.shrink(1, 2, pinned=[1, 2])


def test_a_key_read_ahead_is_evicted_last_until_the_request_after_next():
    cache = ExpertCache(3, make_policy("lfu"))
    cache.request([1, 2], 0)
    cache.request([1, 2], 1)
    assert cache.admit([3], 1) == ([], [3], [])  # never used, so LFU's first victim; its read has just started
    assert cache.admit([4], 1) == ([], [4], [1])  # the others go first
    assert cache.request([5], 2) == ([], [5], [2])  # still protected during the next request...
    assert cache.request([6], 3).evicted == [3]  # ...not after it (its read has landed)
    assert cache.request([4], 4).hits == [4]
