"""DALI's workload-aware replacement: window counts, the boundary swap rule, and the cache's budget rules."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermoe.offload.policies import POLICIES, LRUPolicy, make_policy
from tiermoe.offload.policies.dali import DALIConfig, DALIPolicy
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.sim.cache_sim import replay_layer_counts


def drive(policy, capacity, requests):
    """Per request: (hits, evicted by the request, admitted on proposal, evicted by the proposal)."""
    cache = ExpertCache(capacity, policy)
    log = []
    for step, keys in enumerate(requests):
        hits, _, evicted = cache.request(keys, step)
        _, admitted, pushed_out = cache.propose(step, keys)
        log.append((hits, evicted, admitted, pushed_out))
    return cache, log


def test_registered_and_configurable():
    assert POLICIES["dali"] is DALIPolicy
    policy = make_policy("dali", window=4, swaps=1)
    assert policy.config == DALIConfig(window=4, swaps=1)
    with pytest.raises(ValueError):
        DALIConfig(window=0)
    with pytest.raises(ValueError):
        DALIConfig(victim="mru")


def test_window_counts_slide():
    policy = DALIPolicy(window=2)
    for step, keys in enumerate([[0, 1], [0, 2], [3]]):
        for key in keys:
            policy.on_access(key, step)
    # The window holds steps 1 and 2: step 0's uses of 0 and 1 no longer count.
    assert [policy.score(k) for k in range(4)] == [1, 0, 1, 1]


def test_demand_victim_is_fewest_routed_tokens_then_least_recent():
    # Window 4, capacity 3. Before step 3, tokens: 0 -> 3, 1 -> 1, 2 -> 1. Step 3 ([3]) evicts among 0, 1, 2:
    # 1 and 2 tie on one token and 1 is the older -> 1.
    _, log = drive(DALIPolicy(window=4, swaps=0), 3, [[0, 1], [0, 2], [0], [3]])
    assert log[3][1] == [1]


def test_demand_victim_keeps_a_loaded_expert_that_lru_drops():
    # At step 5 ([3]) the residents are 0 (3 tokens, last used at step 2), 1 and 2 (1 token each, more recent).
    requests = [[0], [0], [0], [1], [2], [3], [0]]
    _, dali = drive(DALIPolicy(window=8, swaps=0), 3, requests)
    _, lru = drive(LRUPolicy(), 3, requests)
    assert dali[5][1] == [1] and dali[6][0] == [0]
    assert lru[5][1] == [0] and lru[6][0] == []


def test_boundary_swaps_most_loaded_non_resident_for_least_loaded_resident():
    # Window 4, one swap, capacity 3, LRU demand evictions (so a loaded expert can be pushed out between boundaries).
    # s0 [0,1]; s1 [0,2]; s2 [0,3] evicts 1 (LRU); s3 [4,5] evicts 2 then 0 (least recent first).
    # Boundary after s3 (4 requests): tokens 0 -> 3, the others 1. Evictable residents (not in [4,5]): 3 (1 token).
    # 0 (3) > 3 (1): 0 is proposed, and admitting it evicts 3. At s4, [0, 4] is all hits.
    requests = [[0, 1], [0, 2], [0, 3], [4, 5], [0, 4]]
    _, log = drive(DALIPolicy(window=4, swaps=1, victim="lru"), 3, requests)
    assert [entry[1] for entry in log] == [[], [], [1], [2, 0], []]
    assert [entry[2] for entry in log] == [[], [], [], [0], []]  # only at the boundary
    assert log[3][3] == [3]
    assert log[4][0] == [0, 4]
    counts = replay_layer_counts(requests, 3, DALIPolicy(window=4, swaps=1, victim="lru"))
    assert (counts.hits, counts.prefetches, counts.prefetch_hits) == (4, 1, 1)  # s1, s2: 0; s4: 0 and 4


def test_swaps_limited_to_u_and_to_room():
    # s3 [3,4] pushes out 1 then 0 (LRU); at the boundary tokens are 0 -> 3, 1 -> 2, 2 -> 1, and 2 is the only
    # evictable resident. u = 1: only the most loaded, 0, comes back, for 2.
    requests = [[0, 1], [0, 1], [0, 2], [3, 4]]
    _, log = drive(DALIPolicy(window=4, swaps=1, victim="lru"), 3, requests)
    assert log[3][1] == [1, 0] and (log[3][2], log[3][3]) == ([0], [2])
    # u = 2: 1 is proposed as well (no resident left to pair it with, so it could only take free room), but the
    # cache is full beside the request being served and the admission skips it.
    policy = DALIPolicy(window=4, swaps=2, victim="lru")
    _, log = drive(policy, 3, requests)
    assert (log[3][2], log[3][3]) == ([0], [2])


def test_no_proposals_between_boundaries():
    policy = DALIPolicy(window=3)
    cache, log = drive(policy, 2, [[0], [1], [2], [0], [1]])
    assert all(not entry[2] for entry in log[:2]) and all(not entry[2] for entry in log[3:])


def test_layers_of_live_store_keys_keep_their_own_windows():
    policy = DALIPolicy(window=2)
    policy.on_access((0, 5), 0)
    policy.on_access((1, 5), 1)
    policy.on_access((1, 6), 2)
    assert policy.score((0, 5)) == 1  # layer 0 saw one request; layer 1's two do not slide it
    assert policy.score((1, 5)) == 1 and policy.score((1, 6)) == 1


keys_strategy = st.tuples(st.integers(0, 2), st.integers(0, 7))
requests_strategy = st.lists(st.lists(keys_strategy, min_size=1, max_size=3, unique=True), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(requests=requests_strategy, extra=st.integers(0, 5), window=st.integers(1, 6), swaps=st.integers(0, 3),
       victim=st.sampled_from(["window", "lru"]), bare=st.booleans())
def test_budget_invariant(requests, extra, window, swaps, victim, bare):
    if bare:  # the simulator's keys: one layer, bare expert ids
        requests = [list(dict.fromkeys(e for _, e in r)) for r in requests]
    capacity = max(len(r) for r in requests) + extra
    cache = ExpertCache(capacity, DALIPolicy(window, swaps, victim))
    for step, keys in enumerate(requests):
        _, _, evicted = cache.request(keys, step)
        assert not set(evicted) & set(keys)
        assert cache.used <= capacity
        _, admitted, pushed_out = cache.propose(step, keys)
        assert not set(pushed_out) & set(keys)
        assert cache.used <= capacity and len(cache) == cache.used
        assert all(k in cache for k in keys) and all(k in cache for k in admitted)


class ScoreEveryCandidate(DALIPolicy):
    """DALI's victim rule stated directly: every candidate scored at every eviction."""

    def victim(self, candidates, step):
        if self.config.victim == "lru":
            return min(candidates, key=lambda k: self._last[k])
        return min(candidates, key=lambda k: (self.score(k), self._last[k]))


@settings(max_examples=60, deadline=None)
@given(requests=requests_strategy, extra=st.integers(0, 5), window=st.integers(1, 6), swaps=st.integers(0, 3),
       victim=st.sampled_from(["window", "lru"]))
def test_heap_victims_match_scoring_every_candidate(requests, extra, window, swaps, victim):
    capacity = max(len(r) for r in requests) + extra
    caches = [ExpertCache(capacity, cls(window, swaps, victim)) for cls in (DALIPolicy, ScoreEveryCandidate)]
    for step, keys in enumerate(requests):
        ranked, direct = ((c.request(keys, step), c.propose(step, keys)) for c in caches)
        assert ranked == direct


@settings(max_examples=60, deadline=None)
@given(requests=requests_strategy, ahead=st.lists(st.lists(keys_strategy, max_size=3), min_size=40, max_size=40),
       extra=st.integers(0, 5), window=st.integers(1, 6), victim=st.sampled_from(["window", "lru"]))
def test_heap_victims_match_scoring_every_candidate_with_reads_ahead(requests, ahead, extra, window, victim):
    """Keys admitted ahead of use between requests (a prefetch: inserted without an access, into a layer whose
    entries may be out of date) leave the victims those of scoring every candidate: a layer re-enters only the
    residents its requests changed."""
    capacity = max(len(r) for r in requests) + extra
    caches = [ExpertCache(capacity, cls(window, 1, victim)) for cls in (DALIPolicy, ScoreEveryCandidate)]
    for step, keys in enumerate(requests):
        ranked, direct = ((c.request(keys, step), c.admit(ahead[step], step, pinned=keys)) for c in caches)
        assert ranked == direct
