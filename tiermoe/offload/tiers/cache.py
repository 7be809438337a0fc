"""The resident set of a tier: which expert keys are held, under a capacity, with a policy choosing evictions.

This is bookkeeping only (no weights): the live tiered store keeps its tensors in a dict beside it and loads the
misses / frees the evicted that `request` reports; the simulator just counts. Both thus apply the same rules:

- every requested key is reported to the policy (`on_access`), hit or miss;
- the keys of the current request are never evicted (the token being computed needs all of them at once);
- the resident size never exceeds the capacity.

With a `horizon` the cache also resists scans: when the budget is below the working set of a pass over the layers
(one token's experts in decode; a denoising step's in diffusion), a recency-driven policy evicts each expert just
before it is needed again and nothing ever hits. So a miss may evict only residents that were not requested within
the last `horizon` steps (one pass: `horizon` = the number of MoE layers); when the evictable residents are all more
recent than that, the miss is *streamed* instead: read for this request only, never admitted. The resident subset
then stays put and hits every pass, while the rest of the working set flows through a small window the driver
keeps beside the cache. Above the working set some resident is always older than a pass, so the policy evicts
as it would without a horizon.

Keys admitted ahead of use (`admit`, `propose`) are *pending* through the next request: until the request after it
begins, a victim is chosen among the other candidates while any remain. The live store has just started their
reads, so evicting one would make the model thread wait for a read it then throws away; the rule is a function of
the calls alone, so the simulator, making the same calls, keeps the same resident set.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Set
from typing import NamedTuple

from tiermoe.offload.policies import CachePolicy

Key = Hashable


class RequestOutcome(NamedTuple):
    """What one `ExpertCache.request` did; unpacks as `hits, misses, evicted`. A requested key in neither `hits` nor
    `misses` was streamed (only with a horizon): not resident before the request nor after it."""

    hits: list[Key]  # requested keys that were resident, in request order
    misses: list[Key]  # requested keys that were not resident and are now, in request order
    evicted: list[Key]  # keys removed to make room, in eviction order


class Evictable(Set):
    """The residents outside `excluded`, as a live view: a miss evicts a few of hundreds of residents, so the
    candidates are not copied per miss. An evicted key leaves the view with the resident dict."""

    __slots__ = ("_resident", "_excluded")

    def __init__(self, resident: dict[Key, int], excluded: set[Key]):
        self._resident, self._excluded = resident, excluded

    def __contains__(self, key: object) -> bool:
        return key in self._resident and key not in self._excluded

    def __iter__(self) -> Iterator[Key]:
        return (k for k in self._resident if k not in self._excluded)

    def __len__(self) -> int:
        return len(self._resident) - sum(k in self._resident for k in self._excluded)


class ExpertCache:
    """A capacity-bounded resident set driven by a `CachePolicy`.

    Capacity is counted in items when `size_of` is None (every key weighs 1), else in whatever unit `size_of(key)`
    returns (bytes for the live store). `size_of` is called once per key when it is first seen; a key's size must
    not change.
    """

    def __init__(self, capacity: int, policy: CachePolicy, size_of: Callable[[Key], int] | None = None,
                 horizon: int | None = None):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        if horizon is not None and horizon < 1:
            raise ValueError(f"cache horizon must be >= 1 step, got {horizon}")
        self.capacity = capacity
        self.policy = policy
        self.horizon = horizon
        self._size_of = size_of
        self._sizes: dict[Key, int] = {}  # memo of size_of
        self._resident: dict[Key, int] = {}  # key -> size, in insertion order
        self._seen: dict[Key, int] = {}  # with a horizon: resident -> step of its latest request, oldest first
        self._pending: set[Key] = set()  # admitted ahead of use since the request before the last (see the NOTE)
        self._admitted: set[Key] = set()  # admitted ahead of use since the last request
        self.used = 0  # sum of resident sizes

    def __contains__(self, key: Key) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    @property
    def resident(self) -> list[Key]:
        """The resident keys, oldest insertion first (a copy)."""
        return list(self._resident)

    def size(self, key: Key) -> int:
        """The size one key counts for against the capacity."""
        if self._size_of is None:
            return 1
        s = self._sizes.get(key)
        if s is None:
            s = self._sizes[key] = int(self._size_of(key))
            if s < 0:
                raise ValueError(f"size_of({key!r}) returned a negative size {s}")
        return s

    def min_capacity(self, keys: Iterable[Key]) -> int:
        """The smallest capacity that can serve a request for `keys` (they must all be resident at once)."""
        return self._total(set(keys))

    def _total(self, keys: Collection[Key]) -> int:
        """Sum of sizes of distinct `keys` (a len() in items mode: this runs on every replayed request)."""
        if self._size_of is None:
            return len(keys)
        return sum(self.size(k) for k in keys)

    def request(self, keys: Iterable[Key], step: int, stream: bool = True) -> RequestOutcome:
        """Serves one request at logical time `step`: all of `keys` are resident afterwards, except the misses a
        cache with a horizon streams (`stream=False` turns that off for this request).

        `keys` may be a set, or a sequence whose order is the access order the policy sees (duplicates ignored).
        Raises ValueError, naming the minimum capacity, if the keys together exceed the capacity and none may be
        streamed; nothing changes in the cache then, though the policy has seen the accesses.
        """
        keys = list(dict.fromkeys(keys))
        self._pending, self._admitted = self._admitted, set()  # those of the previous call stay protected now
        hits: list[Key] = []
        misses: list[Key] = []
        on_access, resident = self.policy.on_access, self._resident  # locals: this loop runs per replayed expert
        for key in keys:
            on_access(key, step)
            (hits if key in resident else misses).append(key)
        if self.horizon is not None:
            self._seen_at(hits, step)
            if stream:
                return self._request_or_stream(keys, hits, misses, step)
        evicted = self._make_room(keys, misses, step) if misses else []
        for key in misses:
            self._insert(key, step)
        return RequestOutcome(hits, misses, evicted)

    def _request_or_stream(self, keys: list[Key], hits: list[Key], misses: list[Key], step: int) -> RequestOutcome:
        """Admits each miss that fits, or fits by evicting residents older than the horizon; streams the others."""
        admitted, evicted = [], []
        room = self.capacity - self._total(hits)  # what the request's own residents leave
        for key in misses:
            size = self.size(key)
            if size > room or not self._stale_hold(self.used + size - self.capacity, step):
                self.policy.on_evict(key)  # streamed: it passes through without ever being resident
                continue
            evicted += self._make_room(hits + admitted, [key], step, fits=True)  # room: they fit beside it
            self._insert(key, step)
            admitted.append(key)
            room -= size
        return RequestOutcome(hits, admitted, evicted)

    def _stale_hold(self, need: int, step: int) -> bool:
        """Whether residents not requested within the horizon hold at least `need` (the policy picks the victims)."""
        held = 0
        for key, seen in self._seen.items():  # oldest request first
            if held >= need or seen > step - self.horizon:
                break
            held += self._resident[key]
        return held >= need

    def _seen_at(self, keys: list[Key], step: int) -> None:
        for key in keys:
            self._seen.pop(key, None)
            self._seen[key] = step

    def _make_room(self, keys: list[Key], misses: list[Key], step: int, pinned: Collection[Key] = (),
                   fits: bool = False) -> list[Key]:
        """Evicts residents outside `keys` and `pinned` until `misses` fit; returns them in eviction order. `fits`:
        the caller knows `keys` and `pinned` fit the capacity (its room check ran), so that sum is not made again."""
        need = self.used + self._total(misses) - self.capacity
        if need <= 0:
            return []
        least = 0 if fits else self._total(set(keys) | (set(pinned) & self._resident.keys()))
        if least > self.capacity:
            unit = "items" if self._size_of is None else "size units"
            raise ValueError(
                f"one request needs {least} {unit} resident at once but the cache capacity is {self.capacity}; "
                f"the minimum capacity is {least}")
        excluded = {*keys, *pinned}
        candidates = Evictable(self._resident, excluded)
        protected = {k for k in (*self._pending, *self._admitted) if k in candidates}
        settled = Evictable(self._resident, excluded | protected) if protected else candidates  # victims first
        evicted = []
        while need > 0:
            pool = settled if settled is candidates or len(settled) else candidates
            key = self.policy.victim(pool, step)
            if key not in pool:
                raise RuntimeError(f"{type(self.policy).__name__}.victim returned {key!r}, not an evictable resident")
            need -= self._evict(key)
            evicted.append(key)
        return evicted

    def admit(self, keys: Iterable[Key], step: int, pinned: Collection[Key] = ()) -> RequestOutcome:
        """Brings keys in ahead of use (a prefetch): no access is recorded, `pinned` residents are protected, and
        keys that do not fit beside `pinned` (with a horizon: in the room of residents older than it) are skipped
        rather than refused. Returns (already resident, admitted, evicted)."""
        keys = list(dict.fromkeys(keys))
        hits = [k for k in keys if k in self._resident]
        room = self.capacity - self._total((set(pinned) | set(hits)) & self._resident.keys())
        admitted, evicted = [], []
        for key in (k for k in keys if k not in self._resident):
            if self.size(key) > room or (self.horizon is not None and
                                         not self._stale_hold(self.used + self.size(key) - self.capacity, step)):
                continue
            evicted += self._make_room([key], [key], step, list(pinned) + admitted + hits)
            self._insert(key, step)
            admitted.append(key)
            self._admitted.add(key)
            room -= self.size(key)
        return RequestOutcome(hits, admitted, evicted)

    def propose(self, step: int, pinned: Collection[Key] = ()) -> RequestOutcome:
        """Admits what the policy proposes after the request at `step` (`CachePolicy.proposals`), like `admit`.

        Call it right after `request`, with that request's keys as `pinned`. Returns (already resident, admitted,
        evicted); all empty for a policy that proposes nothing, so calling it costs the other policies nothing.
        """
        keys = self.policy.proposals(step)
        return self.admit(keys, step, pinned) if keys else RequestOutcome([], [], [])

    def shrink(self, capacity: int, step: int, pinned: Collection[Key] = ()) -> list[Key]:
        """Lowers the capacity to `capacity`, evicting the policy's victims (never `pinned`); returns them.
        Raises ValueError if the pinned residents alone exceed `capacity`."""
        self.capacity = capacity
        return self._make_room(list(pinned), [], step)

    def discard(self, key: Key) -> bool:
        """Drops `key` outside any request (e.g. the store frees it); returns whether it was resident."""
        if key not in self._resident:
            return False
        self._evict(key)
        return True

    def _insert(self, key: Key, step: int) -> None:
        size = self.size(key)
        self._resident[key] = size
        self.used += size
        if self.horizon is not None:
            self._seen[key] = step
        self.policy.on_insert(key, step)

    def _evict(self, key: Key) -> int:
        size = self._resident.pop(key)
        self._seen.pop(key, None)
        self._pending.discard(key)
        self._admitted.discard(key)
        self.used -= size
        self.policy.on_evict(key)
        return size
