"""A static placement on the RAM tier (`cache_policy="static"`): the experts most used on calibration text are pinned
in the budget, every other routed expert is streamed (read, computed with, dropped) and never cached.

It is the baseline an interval refresh (TIDE) or a cache policy has to beat with knowledge of the request: the best
fixed set a calibration run (tiermoe.offload.placement.usage) can name, chosen once, across all MoE layers at once (a
layer whose routing is concentrated gets more of the budget than one whose routing is spread).

Budget: like TIDE's RAM tier, the pinned set gets `budget` minus room for the streamed experts alive at once, so
expert RAM never exceeds the budget. Pinned experts are read on first use, then kept for the life of the engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tiermoe.checkpoint import CheckpointIndex
from tiermoe.offload.placement.refresh import DenoiseStep, Move, SizeOf
from tiermoe.offload.placement.refresh_store import RefreshStore
from tiermoe.offload.placement.usage import load_usage

Key = tuple[int, int]  # (layer, expert)
STATIC = "static"  # the cache_policy name that selects this store


class PinnedSet:
    """A placement that never moves: the highest-ranked experts that fit `capacity` bytes together."""

    def __init__(self, ranking: list[Key], capacity: int, size_of: SizeOf):
        self.capacity = capacity
        self._fast: dict[int, set[int]] = {}  # layer -> pinned experts
        self.used = 0
        for layer, e in ranking:  # greedy in rank order; one that does not fit leaves room for a smaller one
            size = size_of(layer, e)
            if self.used + size <= capacity:
                self._fast.setdefault(layer, set()).add(e)
                self.used += size

    @property
    def pinned(self) -> set[Key]:
        return {(layer, e) for layer, fast in self._fast.items() for e in fast}

    def fast(self, layer: int) -> frozenset[int]:
        return frozenset(self._fast.get(layer, ()))

    def is_fast(self, layer: int, expert: int) -> bool:
        return expert in self._fast.get(layer, ())

    def refresh(self, layer: int, tokens: Mapping[int, int]) -> Move:
        """Nothing moves: the set was chosen from calibration, not from the request."""
        return Move()

    def drop(self, layer: int, expert: int) -> None:
        """An expert whose read failed is streamed from then on."""
        self._fast.get(layer, set()).discard(expert)


class StaticStore(RefreshStore):
    """RAM tier holding a calibrated set of experts (`ranking`, most used first) that never changes.

    It serves like TIDE's RAM tier at a reuse step, always: pinned experts from RAM (read on first use), the rest
    streamed within the reserve.
    """

    def __init__(self, index: CheckpointIndex, dtype: torch.dtype, budget: int, moe_layers: list[int], top_k: int,
                 ranking: list[Key], io_threads: int = 4, direct_io: bool = True):
        super().__init__(index, dtype, budget, moe_layers, top_k, io_threads, direct_io)
        self.placement = PinnedSet(ranking, self.cache.capacity, self._size)
        self.refreshing = False

    @classmethod
    def calibrated(cls, index: CheckpointIndex, dtype: torch.dtype, budget: int, moe_layers: list[int], top_k: int,
                   io_threads: int = 4, direct_io: bool = True) -> StaticStore:
        """The store pinning what the checkpoint's saved calibration (`tiermoe calibrate`) ranks highest."""
        keys = [k for k in index.experts() if k[0] in moe_layers]
        ranking = load_usage(index, moe_layers).ranking(keys)
        return cls(index, dtype, budget, moe_layers, top_k, ranking, io_threads, direct_io)

    def begin_step(self, step: DenoiseStep) -> None:
        """Denoising steps change nothing here."""
