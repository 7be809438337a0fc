"""The cache-policy interface and the helpers policies share; the registry is `tiermoe.offload.policies.POLICIES`.

NOTE: a policy only keeps score-keeping state and answers "which of these residents goes?". The resident set, the
capacity and the rule that a token's own experts are never evicted belong to the cache that drives it
(`tiermoe.offload.tiers.cache.ExpertCache`), so the live engine and the simulator share one piece of bookkeeping and one
set of policies, and what the simulator reports about a policy is a statement about the code that runs.

Keys are any hashable: the live store uses `(layer, expert)` tuples in one cache across all layers; the simulator
uses one policy per layer keyed by expert id.

Time has two clocks. `step` is the caller's logical time: one step is one token's request of one layer's top-k set,
so several keys share a step. Inside a step, the order of `on_access` calls breaks recency ties (the cache makes
them in the order the request lists its keys; the simulator lists a row in router rank order).
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Iterable, Set
from typing import Any

Key = Hashable

# Scores below pack two integers into one, so that they compare (in a heap, or `max` with a dict lookup as key) as
# one int: primary * _SHIFT + secondary, where the secondary (an access tick) is always below _SHIFT.
_SHIFT = 1 << 40


class CachePolicy(ABC):
    """Chooses eviction victims for a capacity-bounded cache of expert weights."""

    #: True when the policy must be constructed with the future access sequence (`future=`), e.g. Belady.
    needs_future: bool = False
    #: True when the policy's constructor takes `layer=` and `num_layers=`: the simulator, which keeps one policy per
    #: layer keyed by bare expert ids, then says which MoE layer (of how many) the policy serves.
    wants_layer: bool = False

    @abstractmethod
    def on_access(self, key: Key, step: int) -> None:
        """Called for every requested key, hit or miss, at logical time `step`, before any eviction of that step."""

    @abstractmethod
    def on_insert(self, key: Key, step: int) -> None:
        """Called when `key` becomes resident at `step` (after the evictions that made room for it)."""

    @abstractmethod
    def on_evict(self, key: Key) -> None:
        """Called when `key` leaves the cache: right after `victim` chose it, or when its owner drops it; also right
        after the access of a key the cache streams (served without being made resident, see `ExpertCache`)."""

    @abstractmethod
    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        """Called when room is needed at `step`: return one of `candidates` (the evictable residents) to evict.

        Candidates are residents: keys the policy saw `on_insert` and no `on_evict` since. The caller has already
        removed the keys of the request being served, so those are never offered. Called once per eviction, so
        policies keep their ranking between calls rather than scoring every candidate each time.
        """

    def proposals(self, step: int) -> list[Key]:
        """Called after each request at `step`: keys the policy wants brought in ahead of use (none by default).

        `ExpertCache.propose` admits them, making room with this policy's `victim` and never evicting the request
        just served; a driver that loads weights (the live store) reads the admitted keys in the background. A
        proposed key that is later requested is a hit; its load is not a miss, so report such loads beside the
        hit rate (the simulator counts them as prefetches).
        """
        return []


class _TickPolicy(CachePolicy):
    """Base for policies that need an access order finer than `step`: every `on_access` takes the next tick."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1)


def as_set(candidates: Iterable[Key]) -> Collection[Key]:
    """`candidates` as something with a fast `in` (the cache passes a set already)."""
    return candidates if isinstance(candidates, Set) else set(candidates)


class VictimHeap:
    """Eviction entries `(score, ..., key)`, one current per key, in a heap: the smallest candidate's key is the victim.

    `push` makes an entry its key's current one; `discard` drops the key's. Older entries stay in the heap and are
    dropped when they reach the top, so an eviction costs a few heap operations rather than a score per candidate.
    Scores must tie only for entries of the same key (an access tick in the entry does that).
    """

    def __init__(self) -> None:
        self.heap: list[tuple] = []
        self.current: dict[Key, tuple] = {}

    def push(self, *entries: tuple) -> None:
        current, heap = self.current, self.heap
        for entry in entries:
            current[entry[-1]] = entry
            heapq.heappush(heap, entry)
        if len(heap) > 2 * len(current) + 64:  # drop the outdated entries now and then
            self.heap = list(current.values())
            heapq.heapify(self.heap)

    def discard(self, key: Key) -> None:
        self.current.pop(key, None)

    def first(self, candidates: Iterable[Key]) -> Key:
        """The key of the smallest current entry among `candidates`."""
        candidates, heap, current = as_set(candidates), self.heap, self.current
        aside = []  # current entries of keys that are not candidates (the request being served): put back after
        try:
            while heap:
                top = heap[0]
                if current.get(top[-1]) is not top:
                    heapq.heappop(heap)  # outdated: the key has a newer entry or was dropped
                elif top[-1] in candidates:
                    return top[-1]
                else:
                    aside.append(heapq.heappop(heap))
            raise ValueError("no candidate is a resident this policy was told of (on_insert)")
        finally:
            for entry in aside:
                heapq.heappush(heap, entry)


def ranked_victim(heap: VictimHeap, stale: set, candidates: Iterable[Key], rank: Callable[[Any], None]) -> Key:
    """For policies whose scores of a layer's experts change only when that layer is requested (DALI's window counts,
    the learned policy's features): such a request puts the layer in `stale`; the next eviction first re-enters its
    residents into `heap` (`rank(layer)`, for the layers that hold residents), then takes the heap's best candidate.
    A layer keeps its entries until its next request, so the evictions in between cost a few heap operations."""
    for layer in [layer for layer in stale if layer.resident]:
        rank(layer)
        stale.discard(layer)
    return heap.first(candidates)


def split_key(key: Key, layer: int | None) -> tuple[int | None, Key]:
    """(layer, expert) of a live-store key `(layer, expert)`; a bare expert id belongs to `layer` (the simulator's)."""
    if isinstance(key, tuple) and len(key) == 2:
        return key[0], key[1]
    return layer, key
