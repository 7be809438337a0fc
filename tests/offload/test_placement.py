"""TIDE's refresh placement and refresh schedule, on small cases worked out by hand and on random routing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermoe.errors import ConfigError
from tiermoe.offload.placement.refresh import DenoiseStep, Move, RefreshPlacement, RefreshSchedule, check_tau


def test_free_room_is_filled_busiest_first_ties_by_id():
    p = RefreshPlacement(capacity=3)
    assert p.refresh(0, {5: 1, 2: 4, 7: 4, 1: 2}) == Move(promote=(2, 7, 1))
    assert p.fast(0) == {1, 2, 7} and p.fast(1) == set()  # layers are independent


def test_a_full_layer_demotes_only_for_strictly_busier_experts_coldest_first():
    p = RefreshPlacement(capacity=3)
    p.refresh(0, {1: 5, 2: 3, 3: 2})
    # 1 is not routed now (0 tokens): it makes room for 4 (6 tokens). 5 and 6 (2 tokens) only tie with the next
    # coldest resident, 3 (2 tokens), so they stay out.
    move = p.refresh(0, {2: 3, 3: 2, 4: 6, 5: 2, 6: 2})
    assert move == Move(promote=(4,), demote=(1,))
    assert p.fast(0) == {2, 3, 4}


def test_an_unchanged_routing_moves_nothing():
    p = RefreshPlacement(capacity=2)
    p.refresh(0, {1: 3, 2: 2, 3: 1})
    assert p.refresh(0, {1: 3, 2: 2, 3: 1}) == Move()


def test_sizes_are_counted_in_bytes_per_layer():
    sizes = {(0, 1): 100, (0, 2): 300, (0, 3): 100}
    p = RefreshPlacement(capacity=250, size_of=lambda layer, e: sizes[(layer, e)])
    assert p.refresh(0, {2: 9, 1: 5, 3: 1}).promote == (1, 3)  # 2 can never fit; the others can
    assert p.used(0) == 200


def test_copy_is_independent():
    p = RefreshPlacement(capacity=2)
    p.refresh(0, {1: 1, 2: 1})
    twin = p.copy()
    twin.refresh(0, {3: 5, 4: 5})
    assert p.fast(0) == {1, 2} and twin.fast(0) == {3, 4}


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 6), steps=st.lists(st.dictionaries(st.integers(0, 11), st.integers(1, 9), max_size=8),
                                                   min_size=1, max_size=12))
def test_refresh_invariants(capacity, steps):
    p = RefreshPlacement(capacity)
    for tokens in steps:
        before = p.fast(0)
        move = p.refresh(0, tokens)
        after = p.fast(0)
        assert len(after) <= capacity  # never more than the budget
        assert set(move.promote) <= tokens.keys() - before  # only routed experts come in
        assert set(move.demote) <= before and after == (before - set(move.demote)) | set(move.promote)
        assert len(move.demote) <= len(move.promote)  # demotes only to make room
        if len(move.promote) > capacity - len(before):  # when room was made, only for strictly busier experts
            assert max(tokens.get(e, 0) for e in move.demote) < min(tokens[e] for e in move.promote)
        left_out = tokens.keys() - after
        if left_out and after:  # a full fast set holds the busiest (ties keep the resident)
            assert max(tokens[e] for e in left_out) <= min(tokens.get(e, 0) for e in after)
        assert not left_out or len(after) == capacity


class SpyStore:
    def __init__(self):
        self.steps = []

    def begin_step(self, step):
        self.steps.append(step)


def refresh_pattern(schedule, blocks):
    return [[schedule.begin_step(b, s).refresh for s in range(n)] for b, n in enumerate(blocks)]


def test_schedule_refreshes_the_whole_first_block_then_every_tau_steps():
    store = SpyStore()
    schedule = RefreshSchedule(3, store)
    assert refresh_pattern(schedule, [4, 7, 2]) == [[True] * 4, [True, False, False, True, False, False, True],
                                                     [True, False]]
    assert store.steps[5] == DenoiseStep(block=1, step=1, refresh=False)
    assert schedule.refreshes == 4 + 3 + 1 and schedule.interval == 3


def test_auto_asks_the_solver_once_after_the_first_block():
    calls = []
    schedule = RefreshSchedule("auto", SpyStore(), solver=lambda: calls.append(1) or 2)
    assert schedule.interval is None
    assert refresh_pattern(schedule, [3, 5, 3]) == [[True] * 3, [True, False, True, False, True],
                                                     [True, False, True]]
    assert calls == [1] and schedule.interval == 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, "fast", True])
def test_bad_tau_is_refused(bad):
    with pytest.raises(ConfigError, match="tau"):
        check_tau(bad)


def test_auto_needs_a_solver():
    with pytest.raises(ConfigError, match="auto"):
        RefreshSchedule("auto", SpyStore())
