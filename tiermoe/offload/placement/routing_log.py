"""Per-step routing of diffusion decoding as the expert store sees it: tokens per expert per MoE layer, by block.

A store learns a step's routing from its `fetch` calls (one per MoE layer per forward, with the tokens each expert
got) and the step boundaries from the decoder's `begin_step`. The TIDE stores keep the last block for the tau
solver; `RecordingStore` keeps everything, around any store, for measurements (bench/diffusion_stability.py).
"""

from __future__ import annotations

from collections.abc import Iterator

from tiermoe.offload.placement.refresh import DenoiseStep
from tiermoe.offload.tiers.store import ExpertStore, ExpertWeights

StepRouting = dict[int, dict[int, int]]  # layer -> {expert: tokens routed to it in this step's forward}
Block = list[StepRouting]  # one block's steps, in order


class RoutingLog:
    """The routing of every denoising step, grouped by block; only the last `keep` blocks when `keep` is set."""

    def __init__(self, keep: int | None = None):
        self.keep = keep
        self.blocks: list[Block] = []

    def begin_step(self, step: DenoiseStep) -> None:
        """A new step; step 0 opens a new block."""
        if step.step == 0 or not self.blocks:
            self.blocks.append([])
            if self.keep is not None:
                del self.blocks[:-self.keep]
        self.blocks[-1].append({})

    def add(self, layer: int, experts: list[int], counts: list[int]) -> None:
        """One MoE layer's routed experts and their token counts in the current step (ignored before any step)."""
        if not self.blocks:
            return
        seen = self.blocks[-1][-1].setdefault(layer, {})
        for e, n in zip(experts, counts, strict=True):
            seen[e] = seen.get(e, 0) + n

    @property
    def last_block(self) -> Block:
        return self.blocks[-1] if self.blocks else []


class RecordingStore(ExpertStore):
    """Serves from `inner` unchanged and records every step's routing into `log`."""

    def __init__(self, inner: ExpertStore, log: RoutingLog | None = None):
        self.inner = inner
        self.log = log or RoutingLog()

    @property
    def stats(self):
        return self.inner.stats

    @stats.setter
    def stats(self, value):
        self.inner.stats = value

    @property
    def keeps_fetched(self) -> bool:
        return self.inner.keeps_fetched

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.inner.expert_nbytes(layer, expert)

    def fetch(self, layer: int, experts: list[int], counts: list[int] | None = None,
              prefetch: tuple[int, list[int]] | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        self.log.add(layer, experts, counts or [1] * len(experts))
        yield from self.inner.fetch(layer, experts, counts, prefetch)

    def fetch_groups(self, layer: int, experts: list[int], counts: list[int] | None = None,
                     prefetch: tuple[int, list[int]] | None = None) -> Iterator[list[tuple[int, ExpertWeights]]]:
        self.log.add(layer, experts, counts or [1] * len(experts))
        yield from self.inner.fetch_groups(layer, experts, counts, prefetch)

    def begin_step(self, step: DenoiseStep) -> None:
        self.log.begin_step(step)
        self.inner.begin_step(step)

    def close(self) -> None:
        self.inner.close()
