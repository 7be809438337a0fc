"""TIDE on the RAM tier: the fast set is what the refresh placement decided, not what the last steps touched.

At a refresh step each MoE layer's placement moves toward the experts with the most tokens in that step (promoted
experts are read and admitted, demoted ones freed); at a reuse step the placement is frozen: a routed expert outside
it is streamed -- read, computed with, dropped -- without being admitted, so one-off experts never push the hot set
out (what a per-step LRU cache does). The reads, the byte accounting (`ExpertCache`) and the statistics are the
tiered store's; only which experts are admitted, and when, differs.

Budget: the fast set gets `budget` minus room for the streamed experts alive at once (`stream_window`, reads in
flight and the one being computed together, by default one per I/O thread but no more than the budget holds), split
evenly over the MoE layers, so expert RAM never exceeds the budget (the caller releases each expert before asking for
the next, as `ExpertStore.fetch` says).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from tiermoe.checkpoint import CheckpointIndex
from tiermoe.offload.placement.costs import TierCosts, load_costs
from tiermoe.offload.placement.refresh import DenoiseStep, Move, RefreshPlacement
from tiermoe.offload.placement.routing_log import RoutingLog
from tiermoe.offload.placement.tau_solver import BlockModel, TauChoice, choose_tau
from tiermoe.offload.policies import LRUPolicy
from tiermoe.offload.tiers.ram import Key, TieredStore
from tiermoe.offload.tiers.stats import StoreStats
from tiermoe.offload.tiers.store import ExpertWeights

CostSource = TierCosts | Callable[[], TierCosts]  # the costs, or how to get them when first needed


@dataclass(slots=True)
class RefreshStats(StoreStats):
    """Store statistics plus what the refreshes did (`streamed`: routed experts served from outside the fast tier;
    RAM: read and dropped, device: computed on the CPU)."""

    refreshes: int = 0  # layer refreshes (one per MoE layer per refresh step)
    promoted: int = 0  # experts brought into the fast tier
    demoted: int = 0  # experts sent back to make room (also counted in `evictions`)

    def to_dict(self) -> dict:
        return {**StoreStats.to_dict(self), "refresh": {"refreshes": self.refreshes, "promoted": self.promoted,
                                                        "demoted": self.demoted, "streamed": self.streamed}}


def as_refresh_stats(value: StoreStats) -> RefreshStats:
    """The engine resets statistics with a plain StoreStats; keep its layers and add the refresh counters."""
    if isinstance(value, RefreshStats):
        return value
    return RefreshStats(value.layers, value.evictions, value.prefetched, value.streamed)


class RefreshMixin:
    """What both TIDE stores share: the per-layer placement, the current block's routing, the tau solver."""

    tier = "ram"  # which side of the cost model the fast tier is ("ram" or "device")

    def _init_refresh(self, per_layer_capacity: int, costs: CostSource | None) -> None:
        self.placement = RefreshPlacement(per_layer_capacity, self._size)
        self.log = RoutingLog(keep=1)  # the current block, for the tau solver
        self.refreshing = True  # without the decoder's hook (no begin_step), every request refreshes
        self.choice: TauChoice | None = None  # the solver's last answer
        self.choices: list[TauChoice] = []  # every answer, one per request that solved tau (bench/tide_speed.py)
        self._costs: CostSource = costs if costs is not None else self._profiled_costs

    def begin_step(self, step: DenoiseStep) -> None:
        self.refreshing = step.refresh
        self.log.begin_step(step)

    def solve_tau(self) -> int:
        """The refresh interval for the rest of the request, from the routing of the block just finished."""
        model = BlockModel(self.tier_costs, self._size, self.dtype.itemsize, self.tier, self._read_size)
        self.choice = choose_tau(self.log.last_block, self.placement, model)
        self.choices.append(self.choice)
        return self.choice.tau

    def _size(self, layer: int, expert: int) -> int:
        return self.cache.size((layer, expert))

    _read_size: Callable[[int, int], int] | None = None  # bytes a disk read of an expert transfers (RAM tier)

    @property
    def tier_costs(self) -> TierCosts:
        if callable(self._costs):
            self._costs = self._costs()
        return self._costs


class RefreshStore(RefreshMixin, TieredStore):
    """RAM fast tier placed by TIDE's interval refresh over direct-I/O reads of the checkpoint."""

    def __init__(self, index: CheckpointIndex, dtype: torch.dtype, budget: int, moe_layers: list[int], top_k: int,
                 io_threads: int = 4, direct_io: bool = True, costs: CostSource | None = None,
                 stream_window: int | None = None):
        # The LRU policy is bookkeeping only: the placement frees room before every admission, and streams what it
        # does not place. Streamed reads in flight: one per I/O thread by default (the disk wants a queue).
        super().__init__(index, dtype, budget, LRUPolicy(), moe_layers, top_k, io_threads, direct_io,
                         stream_window or io_threads, scan_resistant=False)
        self.cache.capacity = budget - self.reserve
        self._init_refresh(self.cache.capacity // max(len(moe_layers), 1), costs)

    @property
    def stats(self) -> RefreshStats:
        return self._stats

    @stats.setter
    def stats(self, value: StoreStats) -> None:
        self._stats = as_refresh_stats(value)

    def _profiled_costs(self) -> TierCosts:
        spec = next(iter(self.index.experts().values()))
        return load_costs(torch.device("cpu"), spec.gate.file, spec.nbytes)

    def _read_size(self, layer: int, expert: int) -> int:
        return self.index.expert(layer, expert).nbytes

    def _groups(self, layer: int, experts: list[int], counts: list[int] | None,
                prefetch: tuple[int, list[int]] | None, grouped: bool) -> Iterator[list[tuple[int, ExpertWeights]]]:
        """Fast-tier experts first, then the promoted (read and admitted) and the streamed (read and dropped) as
        their reads complete (TieredStore's groups). `prefetch` is ignored: the refresh decides what is resident."""
        counts = counts or [1] * len(experts)
        self.log.add(layer, experts, counts)
        self.step += 1
        if self.refreshing:
            self._apply(layer, self.placement.refresh(layer, dict(zip(experts, counts, strict=True))))
        ready = [e for e in experts if (layer, e) in self.weights]
        load = self._admitted(layer, [e for e in experts if self.placement.is_fast(layer, e)
                                      and (layer, e) not in self.weights])
        served = set(ready) | set(load)
        stream = [e for e in experts if e not in served]
        stats = self.stats.layer(layer)
        stats.hits += len(ready)
        stats.misses += len(load) + len(stream)
        self.stats.streamed += len(stream)
        reads = {self._submit((layer, e)): ((layer, e), True) for e in load}
        queue = deque((layer, e) for e in stream)
        self._top_up(reads, queue)
        for e in ready:
            self.cache.policy.on_access((layer, e), self.step)
        yield from self._collect(layer, [(layer, e) for e in ready], reads, queue, grouped)

    def _apply(self, layer: int, move: Move) -> None:
        """Free the demoted experts; the promoted ones are read as misses of this very request."""
        for e in move.demote:
            self._drop((layer, e))
            self.cache.discard((layer, e))
        self.stats.refreshes += 1
        self.stats.promoted += len(move.promote)
        self.stats.demoted += len(move.demote)
        self.stats.evictions += len(move.demote)

    def _admitted(self, layer: int, experts: list[int]) -> list[int]:
        """Account fast experts about to be read against the budget; any that cannot fit leave the placement."""
        _, admitted, evicted = self.cache.admit([(layer, e) for e in experts if (layer, e) not in self.cache],
                                                self.step)
        assert not evicted, "the placement makes room before it promotes"
        for e in experts:
            if (layer, e) not in self.cache:
                self.placement.drop(layer, e)
        return [e for e in experts if (layer, e) in self.cache]

    def _install(self, key: Key, fut: Future) -> ExpertWeights | None:
        """Keep a finished read's weights; an expert whose read failed leaves the placement too."""
        w = super()._install(key, fut)
        if w is None:
            self.placement.drop(*key)
        return w
