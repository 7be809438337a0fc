"""Cache eviction policies: small objects with one interface, driven alike by the live store and the simulator.

NOTE: a policy only keeps score-keeping state and answers "which of these residents goes?". The resident set, the
capacity and the rule that a token's own experts are never evicted belong to the cache that drives it
(`tiermoe.offload.cache.ExpertCache`), so the live engine and the simulator share one piece of bookkeeping and one
set of policies, and what the simulator reports about a policy is a statement about the code that runs.

Keys are any hashable: the live store uses `(layer, expert)` tuples in one cache across all layers; the simulator
uses one policy per layer keyed by expert id.

Time has two clocks. `step` is the caller's logical time: one step is one token's request of one layer's top-k set,
so several keys share a step. Inside a step, the order of `on_access` calls breaks recency ties (the cache makes
them in the order the request lists its keys; the simulator lists a row in router rank order).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Iterable, KeysView, Sequence
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
        """Called when `key` leaves the cache: right after `victim` chose it, or when its owner drops it."""

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
    return candidates if isinstance(candidates, (set, frozenset, KeysView)) else set(candidates)


class LRUPolicy(CachePolicy):
    """Least recently used: evicts the candidate whose latest access is oldest."""

    def __init__(self) -> None:
        # Keys by latest access (or insert), oldest first: an access moves its key to the end, so the victim is
        # the first key that is a candidate (the request's own keys, the newest, are the ones skipped).
        self.last: dict[Key, None] = {}

    def on_access(self, key: Key, step: int) -> None:
        """Marks `key` as the most recent access."""
        self.last.pop(key, None)
        self.last[key] = None

    def on_insert(self, key: Key, step: int) -> None:
        """A key inserted without an access (e.g. prefetched) counts as just used."""
        if key not in self.last:
            self.last[key] = None

    def on_evict(self, key: Key) -> None:
        """Forgets the key: its recency only matters while it is resident."""
        self.last.pop(key, None)

    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        """The least recently used candidate."""
        candidates = as_set(candidates)
        for key in self.last:
            if key in candidates:
                return key
        raise ValueError("no candidate is a resident this policy was told of (on_insert)")


class LFUPolicy(_TickPolicy):
    """Least frequently used, counting every access since the policy was created (resident or not).

    Counts survive eviction, so a popular expert that was pushed out returns with its history ("perfect" LFU rather
    than in-cache LFU). Ties in count are broken by least recent access.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = {}
        self._score: dict[Key, int] = {}  # count * _SHIFT + last tick: lower is evicted first
        self._heap: list[tuple[int, Key]] = []  # (score, key), lowest first; entries whose score is gone are stale

    def _set(self, key: Key, score: int) -> None:
        self._score[key] = score
        heapq.heappush(self._heap, (score, key))
        if len(self._heap) > 2 * len(self._score) + 64:  # drop the stale entries now and then
            self._heap = [(s, k) for k, s in self._score.items()]
            heapq.heapify(self._heap)

    def on_access(self, key: Key, step: int) -> None:
        """Counts the access and refreshes the key's recency."""
        n = self.count[key] = self.count.get(key, 0) + 1
        self._set(key, n * _SHIFT + next(self._ticks))

    def on_insert(self, key: Key, step: int) -> None:
        """A key inserted without an access (e.g. prefetched) starts with its past count, and is recent."""
        if key not in self._score:
            self._set(key, self.count.get(key, 0) * _SHIFT + next(self._ticks))

    def on_evict(self, key: Key) -> None:
        """Keeps the count (all accesses count), drops the per-resident score."""
        self._score.pop(key, None)

    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        """The candidate with the fewest accesses; among equals, the least recently used."""
        candidates, heap, score = as_set(candidates), self._heap, self._score
        aside = []  # current entries of keys that are not candidates (the request being served): put back after
        try:
            while heap:
                s, key = heap[0]
                if score.get(key) != s:
                    heapq.heappop(heap)  # stale: the key was accessed again or evicted since
                elif key in candidates:
                    return key
                else:
                    aside.append(heapq.heappop(heap))
            raise ValueError("no candidate is a resident this policy was told of (on_insert)")
        finally:
            for item in aside:
                heapq.heappush(heap, item)


class Ranking:
    """One layer's residents in eviction order, as `(score, ..., key)` tuples: the smallest is evicted first.

    For policies whose scores of a layer's experts change only when that layer is requested (DALI's window counts,
    the learned policy's features): the policy marks the layer `stale` then, rebuilds its ranking (`reset`) when a
    victim is next needed, slots keys made resident meanwhile into it (`add`), and `ranked_victim` takes the best
    head among the layers, so an eviction costs a look at each layer's head rather than a score per candidate.
    Evicted keys stay in `order` and are skipped (they are not in `resident`).
    """

    __slots__ = ("order", "head", "resident", "stale")

    def __init__(self) -> None:
        self.order: list[tuple] = []
        self.head = 0  # entries before it are known to be evicted
        self.resident: set[Key] = set()
        self.stale = True

    def reset(self, items: Iterable[tuple]) -> None:
        self.order, self.head, self.stale = sorted(items), 0, False

    def add(self, item: tuple) -> None:
        i = bisect.bisect_right(self.order, item)
        self.order.insert(i, item)
        self.head = min(self.head, i)

    def first(self, candidates: Collection[Key]) -> tuple | None:
        """The smallest entry whose key is a candidate, or None."""
        order, resident, i = self.order, self.resident, self.head
        while i < len(order) and order[i][-1] not in resident:
            i += 1
        self.head = i
        for item in itertools.islice(order, i, None):
            if item[-1] in candidates:
                return item
        return None


def ranked_victim(layers: Iterable[Any], candidates: Iterable[Key], refresh: Callable[[Any], None]) -> Key:
    """The key of the smallest candidate entry over the layers' `.ranking`s; `refresh(layer)` first rebuilds a stale
    ranking that holds residents.

    Candidates must be residents the policy was told of (`on_insert`), as the cache guarantees.
    """
    candidates = as_set(candidates)
    best = None
    for layer in layers:
        ranking = layer.ranking
        if not ranking.resident:
            continue
        if ranking.stale:
            refresh(layer)
        item = ranking.first(candidates)
        if item is not None and (best is None or item < best):
            best = item
    if best is None:
        raise ValueError("no candidate is a resident this policy was told of (on_insert)")
    return best[-1]


class BeladyPolicy(_TickPolicy):
    """Belady's offline optimum: evicts the candidate whose next use lies farthest in the future.

    `future[s]` is the set of keys requested at step `s`; the caller's steps must index this list. Keys never used
    again count as farthest of all. Ties (two keys next needed by the same step) go to the least recently used.

    With `window`, the oracle sees only the next `window` steps: keys not requested within them count as never used
    again (so they go least recently used first). That bounds what any predictor of the next `window` tokens'
    routing could gain over LRU (`window=0` is LRU).
    """

    needs_future = True

    def __init__(self, future: Sequence[Iterable[Key]], window: int | None = None) -> None:
        super().__init__()
        self.window = window
        self._never = len(future)  # the "next use" of a key that is not used again
        self._uses: dict[Key, list[int]] = {}  # key -> ascending steps at which it is requested
        for step, keys in enumerate(future):
            for key in keys:
                self._uses.setdefault(key, []).append(step)
        self._tick: dict[Key, int] = {}  # key -> tick of its latest access (or insert)
        self._score: dict[Key, int] = {}  # next use * _SHIFT - last tick: higher is evicted first

    def next_use(self, key: Key, step: int) -> int:
        """First step after `step` at which `key` is requested, or `len(future)` if none."""
        uses = self._uses.get(key)
        if not uses:
            return self._never
        i = bisect.bisect_right(uses, step)
        return uses[i] if i < len(uses) else self._never

    def on_access(self, key: Key, step: int) -> None:
        """Looks up the key's next use after this step."""
        self._tick[key] = next(self._ticks)
        self._score[key] = self.next_use(key, step) * _SHIFT - self._tick[key]

    def on_insert(self, key: Key, step: int) -> None:
        """Scores a key inserted without an access at this step (e.g. prefetched)."""
        if key not in self._score:
            self.on_access(key, step)

    def on_evict(self, key: Key) -> None:
        """Drops the key's score; it is recomputed when the key is accessed again."""
        self._score.pop(key, None)
        self._tick.pop(key, None)

    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        """The candidate used farthest in the future (never-used-again first).

        A candidate's score was computed at its last access, before `step`; since it is not requested at `step` (the
        caller excludes the current request) nor in between, that next use is still its next use after `step`.
        A bounded view depends on `step`, so it is scored here.
        """
        if self.window is None:
            return max(candidates, key=self._score.__getitem__)
        horizon = step + self.window

        def seen(key: Key) -> int:
            use = self.next_use(key, step)
            return (use if use <= horizon else self._never) * _SHIFT - self._tick[key]

        return max(candidates, key=seen)


POLICIES: dict[str, type[CachePolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "belady": BeladyPolicy,
}


def split_key(key: Key, layer: int | None) -> tuple[int | None, Key]:
    """(layer, expert) of a live-store key `(layer, expert)`; a bare expert id belongs to `layer` (the simulator's)."""
    if isinstance(key, tuple) and len(key) == 2:
        return key[0], key[1]
    return layer, key


def make_policy(name: str, **kw: Any) -> CachePolicy:
    """Builds the policy registered as `name` (case-insensitive) with keyword arguments `kw`."""
    cls = POLICIES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown cache policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    return cls(**kw)


# Policies in their own modules register themselves in POLICIES when imported. A plain module import (not `from ...
# import`) works in either import order, though each of them imports this module back.
import tiermoe.offload.dali  # noqa: E402, F401
import tiermoe.offload.learned  # noqa: E402, F401
