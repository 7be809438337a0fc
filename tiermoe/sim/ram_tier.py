"""The RAM tier's decisions without its weights: what `TieredStore` does with a request, replayed for the simulator.

The bookkeeping is the store's own objects (`ExpertCache` with the scan-resistant horizon, the cache policy, the
stream window reserve, `turns` for requests larger than the budget); this class makes the same calls in the same
order as `TieredStore.fetch` / `_serve` / `prefetch`, so its hits, misses and streamed experts are the live store's
(tests/sim/test_sim_run.py checks them equal on a recorded trace). One cache holds every layer's experts under one
byte budget, keyed `(layer, expert)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tiermoe.errors import ConfigError
from tiermoe.offload.placement.refresh import RefreshPlacement
from tiermoe.offload.policies import CachePolicy, LRUPolicy
from tiermoe.offload.tiers.budget import format_bytes
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.offload.tiers.ram import stream_depth, stream_reserve, turns

Key = tuple[int, int]  # (layer, expert)


@dataclass(slots=True)
class Served:
    """One request's outcome: which keys were resident, read and kept, or read and dropped (streamed)."""

    hits: list[Key] = field(default_factory=list)
    misses: list[Key] = field(default_factory=list)  # read, and resident afterwards
    streamed: list[Key] = field(default_factory=list)  # read for this request only
    prefetch: list[Key] = field(default_factory=list)  # admitted ahead of use (policy proposals, prefetch): read now
    evicted: int = 0  # residents the request freed
    refreshed: bool = False  # TIDE: the request moved its layer's placement


@dataclass(slots=True)
class TierCounts:
    hits: int = 0
    misses: int = 0  # as the live store counts them: read and kept, plus streamed
    streamed: int = 0
    prefetched: int = 0
    evictions: int = 0


class RamTier:
    """Experts resident in RAM up to `budget` bytes (one budget across layers), as `TieredStore` keeps them."""

    def __init__(self, budget: int, policy: CachePolicy, size_of: Callable[[Key], int], num_layers: int,
                 top_k: int, largest: int, stream_window: int | None = None, scan_resistant: bool = True,
                 io_threads: int = 4):
        least = top_k * largest
        if budget < least:
            raise ConfigError(f"expert cache budget {format_bytes(budget)} ({budget} bytes) is smaller than the "
                              f"{top_k} experts one token needs; the minimum is {format_bytes(least)} ({least} bytes)")
        self.budget = budget
        self.cache = ExpertCache(budget, policy, size_of=size_of,
                                 horizon=max(num_layers, 1) if scan_resistant else None)
        depth = stream_window or stream_depth(budget, largest, io_threads)  # the live store's default
        self.window, self.reserve = stream_reserve(budget, largest, depth, cached=1)
        self.counts = TierCounts()
        self.step = 0
        self._in_use: list[Key] = []

    def begin_step(self, refresh: bool) -> None:
        """A diffusion step begins (`ExpertStore.begin_step`): only the refresh tier acts on it."""

    def fetch(self, layer: int, experts: list[int], prefetch: tuple[int, list[int]] | None = None,
              counts: list[int] | None = None) -> list[Served]:
        """The store's `fetch`: one `Served` per turn (one turn unless the request exceeds the budget)."""
        keys = [(layer, e) for e in experts]
        if sum(self.cache.size(k) for k in keys) <= self.budget:
            return [self._serve(keys, prefetch)]
        out = []
        for i, chunk in enumerate(turns(keys, self.cache)):
            alone = sum(self.cache.size(k) for k in chunk) > self.cache.capacity
            out.append(self._serve(chunk, prefetch if i == 0 else None, stream=alone))
        return out

    def _serve(self, keys: list[Key], prefetch: tuple[int, list[int]] | None, stream: bool = True) -> Served:
        self.step += 1
        hits, misses, evicted = self.cache.request(keys, self.step, stream)
        kept = set(hits) | set(misses)
        streamed = [key for key in keys if key not in kept]
        freed = len(evicted) + (self._open_window(hits + misses) if streamed else 0)
        c = self.counts
        c.hits += len(hits)
        c.misses += len(misses) + len(streamed)
        c.evictions += freed
        c.streamed += len(streamed)
        self._in_use = keys
        out = Served(hits, misses, streamed, self._ahead(self.cache.propose(self.step, keys)), freed)
        if prefetch is not None:
            layer, experts = prefetch
            out.prefetch += self._ahead(self.cache.admit([(layer, e) for e in experts], self.step, self._in_use))
        return out

    def _ahead(self, outcome) -> list[Key]:
        _, admitted, _ = outcome
        self.counts.prefetched += len(admitted)
        return admitted

    def _open_window(self, pinned: list[Key]) -> int:
        """Room for the stream window beside the cache (once); returns the residents it freed."""
        capacity = max(self.budget - self.reserve, sum(self.cache.size(k) for k in pinned))
        if self.cache.capacity > capacity:
            return len(self.cache.shrink(capacity, self.step, pinned))
        return 0


class RefreshRamTier(RamTier):
    """TIDE on the RAM tier, as `RefreshStore` (offload/placement/refresh_store.py) keeps it: the fast set is what the
    refresh placement decided; at a refresh step each layer's set moves toward that step's busiest experts (the
    promoted ones read and kept, the demoted freed), at a reuse step a routed expert outside it is streamed."""

    def __init__(self, budget: int, size_of: Callable[[Key], int], num_layers: int, top_k: int, largest: int,
                 io_threads: int = 4):
        super().__init__(budget, LRUPolicy(), size_of, num_layers, top_k, largest, io_threads, scan_resistant=False)
        self.cache.capacity = budget - self.reserve
        self.placement = RefreshPlacement(self.cache.capacity // max(num_layers, 1), lambda lay, e: size_of((lay, e)))
        self.refreshing = True  # without step boundaries (an autoregressive trace) every request refreshes

    def begin_step(self, refresh: bool) -> None:
        self.refreshing = refresh

    def fetch(self, layer, experts, prefetch=None, counts=None) -> list[Served]:
        """`RefreshStore.fetch`: the prefetch is ignored (the refresh decides what is resident)."""
        self.step += 1
        demoted = 0
        if self.refreshing:
            move = self.placement.refresh(layer, dict(zip(experts, counts or [1] * len(experts), strict=True)))
            for e in move.demote:
                self.cache.discard((layer, e))
            demoted = len(move.demote)
            self.counts.evictions += demoted
        hits = [(layer, e) for e in experts if (layer, e) in self.cache]
        fast = [(layer, e) for e in experts if self.placement.is_fast(layer, e) and (layer, e) not in self.cache]
        self.cache.admit(fast, self.step)
        for key in fast:
            if key not in self.cache:  # did not fit: leaves the placement, as the store's `_admitted`
                self.placement.drop(*key)
        misses = [key for key in fast if key in self.cache]
        served = set(hits) | set(misses)
        streamed = [(layer, e) for e in experts if (layer, e) not in served]
        for key in hits:
            self.cache.policy.on_access(key, self.step)
        c = self.counts
        c.hits += len(hits)
        c.misses += len(misses) + len(streamed)
        c.streamed += len(streamed)
        return [Served(hits, misses, streamed, evicted=demoted, refreshed=self.refreshing)]
