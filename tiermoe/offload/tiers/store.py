"""The expert-store interface the model calls, and its simplest implementation: everything fetched stays resident.

NOTE: the model never reads expert weights itself. Each MoE layer asks the store for its whole routed set at once,
so that a tiered store can read the misses in parallel, overlap the reads with compute, and account every byte.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tiermoe.checkpoint import CheckpointIndex, ExpertSpec
from tiermoe.kernels import weight_dtype
from tiermoe.offload.tiers.stats import StoreStats

SERIAL_GRAIN = 32768  # elements: torch runs an elementwise op over fewer than this (at::internal::GRAIN_SIZE) serially

if TYPE_CHECKING:
    from tiermoe.offload.placement.refresh import DenoiseStep


@dataclass(slots=True)
class ExpertWeights:
    """One routed expert ready to compute with."""

    gate_up: torch.Tensor  # [2I, H]: gate rows then up rows, so one matmul serves both
    down: torch.Tensor  # [H, I]

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def loaded_nbytes(spec: ExpertSpec, dtype: torch.dtype) -> int:
    """Bytes an expert occupies in RAM once loaded for the compute dtype (kernels.weight_dtype)."""
    return sum(p.nbytes // p.dtype.itemsize * weight_dtype(p.dtype, dtype).itemsize for p in spec.parts)


def build_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> ExpertWeights:
    """An expert from its three raw tensors (contiguous): gate | up concatenated, in the dtype kept for the compute
    dtype (kernels.weight_dtype), never aliasing the inputs.

    NOTE: made on the calling thread alone, with no torch op that splits its work over torch's intra-op threads.
    Experts are built on I/O threads, and with OpenMP (libgomp) every other thread that enters a parallel region gets
    a team of its own; once the process has more OpenMP threads than cores, libgomp makes every idle worker sleep at
    once instead of spinning, so each of the model's parallel regions then waits for its workers to wake
    (bench/results/peers_memory.md: decode with every expert cached ran at 0.7x the resident speed, with 50x the
    context switches).
    """
    gate_up = torch.empty((gate.shape[0] + up.shape[0], *gate.shape[1:]),
                          dtype=weight_dtype(gate.dtype, dtype))  # [2I, H]
    out = torch.empty(down.shape, dtype=weight_dtype(down.dtype, dtype))  # [H, I]
    serial_copy(gate_up[:gate.shape[0]], gate)
    serial_copy(gate_up[gate.shape[0]:], up)
    serial_copy(out, down)
    return ExpertWeights(gate_up, out)


def serial_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src (contiguous, same shape), converting the dtype as `Tensor.copy_` does, without intra-op
    threads: a byte copy by numpy (which releases the interpreter lock), else copy_ over pieces below the grain."""
    if dst.dtype == src.dtype:
        np.copyto(_bytes(dst), _bytes(src))
        return
    d, s = dst.view(-1), src.view(-1)
    for i in range(0, d.numel(), SERIAL_GRAIN):
        d[i:i + SERIAL_GRAIN].copy_(s[i:i + SERIAL_GRAIN])


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(-1).view(torch.uint8).numpy()


class ExpertStore(ABC):
    """Source of routed expert weights for the model. `stats` counts hits, misses and reads since the last reset."""

    stats: StoreStats
    keeps_fetched = False  # True: every yielded expert stays valid after the next (the model may hold them all)

    @abstractmethod
    def fetch(self, layer: int, experts: list[int], counts: list[int] | None = None,
              prefetch: tuple[int, list[int]] | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        """Called once per MoE layer per forward pass with the distinct experts the batch routed to, in the order
        to serve them (`fetch_order`: by the latest token using each), and how many tokens each got (a placement
        hint: where an expert runs may depend on its workload).
        `prefetch` = (layer, experts) predicted for a later layer: a store that reads ahead starts those reads once
        this request's own are issued; others ignore it.

        Yields every requested expert exactly once, in the order they become ready (resident ones first). A yielded
        expert's weights are valid until the next item is requested: compute with them and drop the reference
        before asking for more, so a store whose budget holds fewer experts than one request can serve it in turns
        without holding more than its budget.
        """

    def fetch_groups(self, layer: int, experts: list[int], counts: list[int] | None = None,
                     prefetch: tuple[int, list[int]] | None = None) -> Iterator[list[tuple[int, ExpertWeights]]]:
        """`fetch`'s experts in groups, so that a group can be computed in one kernel call: every expert of a group
        is valid until the next group is requested (the caller drops them all first). This default makes one group
        of everything when the store `keeps_fetched`, else one group per expert; a tier overrides it to group what
        becomes ready together (its residents, then the reads that landed meanwhile)."""
        if self.keeps_fetched:
            yield list(self.fetch(layer, experts, counts, prefetch))
            return
        for item in self.fetch(layer, experts, counts, prefetch):
            yield [item]
            del item  # the caller is done with it before asking for the next

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes one expert occupies once loaded (used for budgets)."""
        return loaded_nbytes(self.index.expert(layer, expert), self.dtype)

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release threads and file handles."""

    def begin_step(self, step: DenoiseStep) -> None:  # noqa: B027 - optional hook
        """Diffusion decoders call this before each denoising step's forward, saying whether it is a refresh step
        (TIDE: update the expert placement from this step's routing) or a reuse step. Only stores with a refresh
        placement (tiermoe.offload.placement.refresh) act on it."""


class ResidentStore(ExpertStore):
    """Reads each expert on first use and keeps it for the life of the engine."""

    keeps_fetched = True

    def __init__(self, index: CheckpointIndex, dtype: torch.dtype):
        self.index = index
        self.dtype = dtype
        self.resident: dict[tuple[int, int], ExpertWeights] = {}
        self.stats = StoreStats()

    def fetch(self, layer: int, experts: list[int], counts: list[int] | None = None,
              prefetch: tuple[int, list[int]] | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        stats = self.stats.layer(layer)
        for e in experts:
            w = self.resident.get((layer, e))
            if w is None:
                spec = self.index.expert(layer, e)
                start = time.perf_counter()
                w = build_expert(*(p.read() for p in spec.parts), self.dtype)
                self.resident[(layer, e)] = w
                stats.misses += 1
                stats.bytes_read += spec.nbytes
                stats.read_time += time.perf_counter() - start
                stats.stall_time += time.perf_counter() - start
            else:
                stats.hits += 1
            yield e, w
