"""Eviction policies on small sequences worked out by hand (single-key requests unless said otherwise)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermoe.offload.policies import POLICIES, BeladyPolicy, CachePolicy, LFUPolicy, LRUPolicy, make_policy
from tiermoe.offload.tiers.cache import ExpertCache


def replay(policy: CachePolicy, capacity: int, requests: list) -> tuple[list[bool], list[list]]:
    """Per request: whether every key hit, and what was evicted."""
    cache = ExpertCache(capacity, policy)
    hit, evicted = [], []
    for step, keys in enumerate(requests):
        out = cache.request(keys, step)
        hit.append(not out.misses)
        evicted.append(out.evicted)
    return hit, evicted


def test_lru_evicts_least_recently_used():
    # A B C fill the cache; A is touched again, so at D the oldest is B; at B (again) the oldest is C.
    hit, evicted = replay(LRUPolicy(), 3, [["A"], ["B"], ["C"], ["A"], ["D"], ["B"]])
    assert hit == [False, False, False, True, False, False]
    assert evicted == [[], [], [], [], ["B"], ["C"]]


def test_lru_ties_within_a_step_follow_request_order():
    # A and B share step 0; A was listed first, so it is the less recent of the two.
    _, evicted = replay(LRUPolicy(), 2, [["A", "B"], ["C"]])
    assert evicted[1] == ["A"]


def test_lru_never_evicts_the_current_request():
    # At step 2, A is the least recent resident but is requested again with C: B must go instead.
    hit, evicted = replay(LRUPolicy(), 2, [["A"], ["B"], ["A", "C"]])
    assert evicted[2] == ["B"]
    assert not hit[2]


def test_lfu_counts_all_accesses_and_breaks_ties_by_recency():
    # Counts after step 3: A=2, B=1, C=1. At D: B and C tie on 1, B is older -> B.
    # B returns with count 2 (its first access still counts): C=1, D=1 tie, C older -> C.
    # At E: A=2 (tick of step 1), D=1, B=2 -> D has the fewest.
    hit, evicted = replay(LFUPolicy(), 3, [["A"], ["A"], ["B"], ["C"], ["D"], ["B"], ["E"]])
    assert hit == [False, True, False, False, False, False, False]
    assert evicted == [[], [], [], [], ["B"], ["C"], ["D"]]


def test_lfu_keeps_a_frequent_key_that_lru_would_drop():
    requests = [["A"], ["A"], ["A"], ["B"], ["C"], ["A"]]
    assert replay(LFUPolicy(), 2, requests)[0][-1] is True  # C evicted B, A (count 3) stayed
    assert replay(LRUPolicy(), 2, requests)[0][-1] is False  # B, C pushed A out


def test_belady_evicts_farthest_next_use_then_never_used_least_recent():
    requests = [["A"], ["B"], ["C"], ["A"], ["D"], ["B"], ["A"], ["C"]]
    # At step 4 (D): next uses A->6, B->5, C->7: evict C.
    # At step 7 (C): A, B, D are never used again: tie -> least recent, D (step 4).
    hit, evicted = replay(BeladyPolicy(future=requests), 3, requests)
    assert hit == [False, False, False, True, False, True, True, False]
    assert evicted == [[], [], [], [], ["C"], [], [], ["D"]]


def test_belady_is_optimal_on_a_classic_sequence():
    # Reference string from textbook paging examples, 3 frames: OPT takes 9 faults on these 20 references.
    refs = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    requests = [[r] for r in refs]
    hit, _ = replay(BeladyPolicy(future=requests), 3, requests)
    assert hit.count(False) == 9
    assert replay(LRUPolicy(), 3, requests)[0].count(False) == 12


def test_belady_with_a_bounded_view_spans_lru_to_belady():
    refs = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    requests = [[r] for r in refs]
    assert replay(BeladyPolicy(requests, window=0), 3, requests) == replay(LRUPolicy(), 3, requests)
    assert replay(BeladyPolicy(requests, window=len(refs)), 3, requests) == replay(BeladyPolicy(requests), 3, requests)
    # At step 7 (4) the residents 2, 0, 3 are next used at steps 8, 10, 9: Belady drops 0. Seeing one step ahead,
    # only 2 is known to come back; 0 and 3 look alike, and the less recent, 3 (step 5, 0 at step 6), goes.
    _, evicted = replay(BeladyPolicy(requests, window=1), 3, requests)
    assert replay(BeladyPolicy(requests), 3, requests)[1][7] == [0]
    assert evicted[7] == [3]


def test_victim_only_returns_a_candidate():
    for policy in (LRUPolicy(), LFUPolicy(), BeladyPolicy(future=[[1], [2], [3]])):
        for step, key in enumerate([1, 2, 3]):
            policy.on_access(key, step)
            policy.on_insert(key, step)
        assert policy.victim([2, 3], 3) in (2, 3)


def test_registry_builds_by_name_and_rejects_unknown_names():
    assert set(POLICIES) == {"lru", "lfu", "belady", "dali", "learned"}
    assert isinstance(make_policy("LRU"), LRUPolicy)
    assert isinstance(make_policy("belady", future=[[1]]), BeladyPolicy)
    assert POLICIES["belady"].needs_future and not POLICIES["lru"].needs_future
    with pytest.raises(ValueError, match="known policies: belady, dali, learned, lfu, lru"):
        make_policy("fifo")


def test_tuple_keys_work_for_the_store():
    # The live store keys one cache by (layer, expert) across layers.
    hit, evicted = replay(LRUPolicy(), 2, [[(0, 5)], [(1, 5)], [(0, 5)], [(2, 1)]])
    assert hit == [False, False, True, False]
    assert evicted[3] == [(1, 5)]


class LFUScoringEveryCandidate(LFUPolicy):
    """LFU's rule stated directly: the fewest accesses, then the least recent, over all candidates."""

    def victim(self, candidates, step):
        return min(candidates, key=lambda k: self._heap.current[k][0])


@settings(max_examples=60, deadline=None)
@given(requests=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True), min_size=1, max_size=60),
       extra=st.integers(0, 4), prefetch=st.lists(st.integers(0, 9), max_size=60))
def test_lfu_heap_matches_scoring_every_candidate(requests, extra, prefetch):
    capacity = max(map(len, requests)) + extra
    caches = [ExpertCache(capacity, LFUPolicy()), ExpertCache(capacity, LFUScoringEveryCandidate())]
    for step, keys in enumerate(requests):
        heap, direct = (c.request(keys, step) for c in caches)
        assert heap == direct
        if step < len(prefetch):  # a key brought in without an access
            assert caches[0].admit([prefetch[step]], step, keys) == caches[1].admit([prefetch[step]], step, keys)
