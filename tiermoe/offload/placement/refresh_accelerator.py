"""TIDE with an accelerator fast tier: the device holds what the refresh placement decided; between refreshes a
routed expert that is not there runs on the CPU from the host tier (its hidden rows travel, not its weights).

At a refresh step each MoE layer's placement moves toward the experts with the most tokens: demoted experts leave
the device at once, promoted ones are copied in as the host tier delivers them and run there. The per-expert
cost rule of `AcceleratorStore` is not consulted: placement changes only at refreshes, and the cost model enters
through the choice of tau. Copies and frees follow `AcceleratorStore`'s stream protocol (see its module): a demoted
expert's device memory is reused only after the compute work queued before the demotion has finished.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tiermoe.offload.placement.costs import TierCosts, load_costs
from tiermoe.offload.placement.refresh import DenoiseStep, Move
from tiermoe.offload.placement.refresh_store import CostSource, RefreshMixin, RefreshStats, as_refresh_stats
from tiermoe.offload.policies import LRUPolicy
from tiermoe.offload.tiers.accelerator import AcceleratorStore, DeviceOps
from tiermoe.offload.tiers.placement_rule import Where
from tiermoe.offload.tiers.store import ExpertStore, ExpertWeights


class RefreshAcceleratorStore(RefreshMixin, AcceleratorStore):
    """Experts on `device` (up to `budget` bytes, split evenly over the MoE layers) placed by interval refresh."""

    def __init__(self, host: ExpertStore, device: torch.device | str, budget: int, moe_layers: list[int],
                 dtype: torch.dtype, costs: CostSource | None = None, ops: DeviceOps | None = None):
        # No DeviceCosts: per-expert placement rules are not used here; the LRU policy is bookkeeping only.
        super().__init__(host, device, budget, LRUPolicy(), costs=None, ops=ops)
        self.dtype = dtype
        self._init_refresh(budget // max(len(moe_layers), 1), costs)
        self.host.stats = as_refresh_stats(self.host.stats)

    @property
    def stats(self) -> RefreshStats:
        return self.host.stats

    @stats.setter
    def stats(self, value) -> None:
        self.host.stats = as_refresh_stats(value)

    tier = "device"

    def begin_step(self, step: DenoiseStep) -> None:
        super().begin_step(step)
        self.host.begin_step(step)

    def _profiled_costs(self) -> TierCosts:
        spec = next(iter(self.host.index.experts().values()))
        return load_costs(self.device, spec.gate.file, spec.nbytes)

    def fetch(self, layer: int, experts: list[int], counts: list[int] | None = None,
              prefetch: tuple[int, list[int]] | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        """Device-resident experts first, then the others from the host tier: copied to the device if the refresh
        just promoted them, else returned where they are (the CPU computes them)."""
        self.step += 1
        counts = counts or [1] * len(experts)
        self.log.add(layer, experts, counts)
        self._accessed(layer, experts)
        if self.refreshing:
            self._apply(layer, self.placement.refresh(layer, dict(zip(experts, counts, strict=True))))
        rest = yield from self._device_hits(layer, experts)
        if not rest:
            return
        tokens = dict(zip(experts, counts, strict=True))
        for e, w in self.host.fetch(layer, rest, [tokens[e] for e in rest], prefetch):
            yield e, self._placed(layer, e, w)

    def _apply(self, layer: int, move: Move) -> None:
        for e in move.demote:
            self.cache.discard((layer, e))
        self._free([(layer, e) for e in move.demote])
        self.stats.refreshes += 1
        self.stats.promoted += len(move.promote)
        self.stats.demoted += len(move.demote)
        self.stats.evictions += len(move.demote)

    def _placed(self, layer: int, e: int, w: ExpertWeights) -> ExpertWeights:
        """A host expert: copied to the device when the placement holds it (promoted, or an earlier copy was lost),
        else computed on the CPU."""
        key = (layer, e)
        if self.placement.is_fast(layer, e):
            _, admitted, evicted = self.cache.admit([key], self.step)
            assert not evicted, "the placement makes room before it promotes"
            if admitted:
                self.placements[Where.PROMOTE] += 1
                self.weights[key] = self.stager.copy_expert(w)
                return self.weights[key]
            self.placement.drop(layer, e)
        self.placements[Where.HOST] += 1
        self.stats.streamed += 1
        return w

