"""The classic eviction policies: LRU, LFU, and Belady's clairvoyant optimum (a bound for the simulator)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from tiermoe.offload.policies.base import _SHIFT, CachePolicy, Key, VictimHeap, _TickPolicy, as_set


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
        self._heap = VictimHeap()  # entries (count * _SHIFT + last tick, key): lower is evicted first

    def on_access(self, key: Key, step: int) -> None:
        """Counts the access and refreshes the key's recency."""
        n = self.count[key] = self.count.get(key, 0) + 1
        self._heap.push((n * _SHIFT + next(self._ticks), key))

    def on_insert(self, key: Key, step: int) -> None:
        """A key inserted without an access (e.g. prefetched) starts with its past count, and is recent."""
        if key not in self._heap.current:
            self._heap.push((self.count.get(key, 0) * _SHIFT + next(self._ticks), key))

    def on_evict(self, key: Key) -> None:
        """Keeps the count (all accesses count), drops the per-resident score."""
        self._heap.discard(key)

    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        """The candidate with the fewest accesses; among equals, the least recently used."""
        return self._heap.first(candidates)


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
