"""DALI's workload-aware cache replacement: per layer, routed-token counts over a window of steps decide residency.

DALI (arXiv 2602.03495) keeps, per MoE layer, the number of tokens routed to each expert over a window of `w`
steps and, at the end of every window, swaps up to `u` experts: the most loaded non-residents come in, the least
loaded residents go. Here that is a `CachePolicy`:

- `victim` (a demand miss between boundaries) evicts the candidate with the fewest routed tokens over the layer's
  last `w` steps, the least recently used among equals (or, with `victim="lru"`, the least recently used);
- `proposals` (called by the cache after each request) returns, at a layer's window boundary, the non-residents that
  beat a resident: the i-th most loaded non-resident is proposed while it outscores the i-th least loaded resident
  that may be evicted (not in the request just served), for i < u. The cache admits them with `victim` making room,
  which evicts exactly those least loaded residents.

NOTE: DALI's own cache never loads on a miss (a non-resident expert is computed on the CPU), so only the boundary
swaps change its contents. Here a miss must be loaded, and its eviction already follows the window counts, so a
non-resident rarely outscores a resident at the boundary and the swaps add few loads; `victim="lru"` leaves the
workload-aware choice to the swaps alone, which shows what they contribute on their own.

Keys are expert ids (one policy per layer, as in the simulator) or `(layer, expert)` (one policy for all layers, as
in the live store); each layer keeps its own window and clock, which advances once per request of that layer.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from tiermoe.offload.policies.base import CachePolicy, Key, VictimHeap, ranked_victim, split_key


@dataclass(frozen=True, slots=True)
class DALIConfig:
    """Window and swap budget of the workload-aware replacement."""

    window: int = 32  # w: requests of a layer whose routed-token counts score its experts (chosen on training data)
    swaps: int = 2  # u: most experts exchanged at one window boundary
    victim: str = "window"  # demand-miss evictions: "window" (fewest routed tokens) or "lru"

    def __post_init__(self) -> None:
        if self.victim not in ("window", "lru"):
            raise ValueError(f"DALI victim rule must be 'window' or 'lru', got {self.victim!r}")
        if self.window < 1:
            raise ValueError(f"DALI window must be at least 1 step, got {self.window}")
        if self.swaps < 0:
            raise ValueError(f"DALI swaps must be >= 0, got {self.swaps}")


_DEFAULTS = DALIConfig()


@dataclass(eq=False)
class _LayerWindow:
    """One layer's sliding window of requests and its residents."""

    steps: deque = field(default_factory=deque)  # key lists of the last `window` requests, oldest first
    count: dict = field(default_factory=dict)  # key -> routed tokens within the window (absent = 0)
    resident: set = field(default_factory=set)
    changed: set = field(default_factory=set)  # keys whose eviction entry is out of date (accessed, count dropped)
    step: int | None = None  # the caller's step of the latest request
    clock: int = 0  # requests seen so far
    proposed_at: int | None = None  # step whose boundary swap was already proposed

    def open(self, step: int, window: int) -> None:
        """Starts a new request: the oldest request beyond the window stops counting."""
        self.step = step
        self.clock += 1
        self.steps.append([])
        if len(self.steps) > window:
            dropped = self.steps.popleft()
            self.changed.update(dropped)
            for key in dropped:
                n = self.count[key] - 1
                if n:
                    self.count[key] = n
                else:
                    del self.count[key]


class DALIPolicy(CachePolicy):
    """Workload-aware replacement: window counts choose victims, window boundaries propose swaps (see module doc)."""

    def __init__(self, window: int = _DEFAULTS.window, swaps: int = _DEFAULTS.swaps,
                 victim: str = _DEFAULTS.victim):
        self.config = DALIConfig(window, swaps, victim)
        self._layers: dict[int | None, _LayerWindow] = {}
        self._ticks = itertools.count(1)
        self._last: dict[Key, int] = {}  # key -> tick of its latest access or insert (breaks ties, oldest first)
        self._heap = VictimHeap()  # residents' (routed tokens, tick, key), or (tick, key) with LRU victims
        self._stale: set[_LayerWindow] = set()  # layers requested since their residents' entries were made
        self._state_of: dict[Key, _LayerWindow] = {}  # key -> its layer's window (one lookup per access)

    def _layer(self, key: Key) -> _LayerWindow:
        state = self._state_of.get(key)
        if state is None:
            layer, _ = split_key(key, None)
            state = self._layers.get(layer)
            if state is None:
                state = self._layers[layer] = _LayerWindow()
            self._state_of[key] = state
        return state

    def score(self, key: Key) -> int:
        """Tokens routed to `key` over its layer's last `window` requests."""
        return self._layer(key).count.get(key, 0)

    def on_access(self, key: Key, step: int) -> None:
        """Counts one routed token for `key`; the first access of a new step opens that layer's next request."""
        state = self._layer(key)
        if state.step != step:
            state.open(step, self.config.window)
        current = state.steps[-1]
        if key not in current:  # a request lists a key once; guard against a repeated access anyway
            current.append(key)
            state.count[key] = state.count.get(key, 0) + 1
        self._last[key] = next(self._ticks)
        state.changed.add(key)
        self._stale.add(state)

    def on_insert(self, key: Key, step: int) -> None:
        """Marks `key` resident; a key never accessed before (prefetched) counts as just used for tie-breaking."""
        state = self._layer(key)
        self._last.setdefault(key, next(self._ticks))
        state.resident.add(key)
        if state in self._stale:
            state.changed.add(key)
        else:
            self._heap.push(self._entry(state, key))

    def on_evict(self, key: Key) -> None:
        """Drops `key` from its layer's residents; its window count and recency stay (they describe routing)."""
        self._layer(key).resident.discard(key)
        self._heap.discard(key)

    def victim(self, candidates, step: int) -> Key:
        """The candidate with the fewest routed tokens in its layer's window; the least recent among equals."""
        return ranked_victim(self._heap, self._stale, candidates, self._rank)

    def _entry(self, state: _LayerWindow, key: Key) -> tuple:
        """A resident's eviction entry: (routed tokens, tick, key), or (tick, key) for LRU victims."""
        if self.config.victim == "lru":
            return self._last[key], key
        return state.count.get(key, 0), self._last[key], key

    def _rank(self, state: _LayerWindow) -> None:
        """Re-enters the layer's residents whose entry changed since the last rank (a request touches at most its own
        keys and those its window dropped): every other resident's entry is still what it would be made now."""
        changed = state.changed & state.resident
        state.changed = set()
        self._heap.push(*[self._entry(state, key) for key in changed])

    def proposals(self, step: int) -> list[Key]:
        """At a layer's window boundary (its request count a multiple of `window`), the swaps worth making."""
        out: list[Key] = []
        for state in self._layers.values():
            if state.step == step and state.clock % self.config.window == 0 and state.proposed_at != step:
                state.proposed_at = step
                out += self._swaps(state)
        return out

    def _swaps(self, state: _LayerWindow) -> list[Key]:
        """Most loaded non-residents paired with least loaded evictable residents, while the newcomer scores more."""
        current = set(state.steps[-1]) if state.steps else set()
        resident = state.resident
        incoming = sorted((k for k in state.count if k not in resident),
                          key=lambda k: (-state.count[k], -self._last.get(k, 0)))
        outgoing = sorted((k for k in resident if k not in current),
                          key=lambda k: (state.count.get(k, 0), self._last.get(k, 0)))
        out = []
        for i, key in enumerate(incoming[: self.config.swaps]):
            if i < len(outgoing) and state.count[key] <= state.count.get(outgoing[i], 0):
                break
            out.append(key)
        return out
