"""Accelerator tier: experts on the GPU under their own byte budget, above the RAM tier.

Per expert and step it decides where the expert runs (the DALI / Fiddler observation: for a few tokens, computing
an expert on the CPU beats copying its weights over PCIe):

- resident on the device: run there;
- otherwise, `promote` (copy to the device, evicting by the policy, and run there) when the copy plus device compute
  is predicted cheaper than CPU compute, or when the device tier still has free room;
- else run it on the CPU from the RAM tier, and the hidden rows travel instead of the weights.

The policy sees every requested expert once per step wherever it runs, so it learns what is popular; experts it
proposes (DALI's window swaps) are admitted at the end of the step and copied on their first use.

Copy protocol (`Stager`; the decisions above are plain functions of a cost model, tested without a GPU):
- an expert is staged in the next of a small ring of pinned buffers; before refilling one, the host waits on the
  event of that buffer's previous copy only, so copies overlap each other and compute;
- the device tensors are allocated and filled on a side stream, then an event is recorded there; the compute stream
  waits on that event (on the device: the host does not block) before its first use;
- each copy is `record_stream`ed on the compute stream: when eviction frees it, the caching allocator keeps its
  memory until the compute work queued by then (kernels still reading the expert) has finished, so device memory
  may briefly exceed the budget by the experts being evicted.
All CUDA calls go through `CudaOps`, so tests check this ordering with a recording stand-in. The compute stream is
the current stream when a copy is made: the model must compute with the expert there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tiermoe.offload.policies import CachePolicy
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.offload.tiers.placement_rule import DeviceCosts, Where, place
from tiermoe.offload.tiers.store import ExpertStore, ExpertWeights

Key = tuple[int, int]  # (layer, expert)


class CudaOps:
    """The CUDA calls of the copy protocol, in one place (tests drive `Stager` through a stand-in with the same
    methods)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def record(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        """`event` completes when the work queued on `stream` so far has."""
        event.record(stream)

    def host_wait(self, event: torch.cuda.Event) -> None:
        """Block the host until `event` completed (at once for an event never recorded)."""
        event.synchronize()

    def stream_wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        """Work queued on `stream` from now on starts after `event` (as recorded now) completed."""
        stream.wait_event(event)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy_to_device(self, src: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
        """A device copy of pinned `src`, allocated and filled on `stream` (asynchronously)."""
        with torch.cuda.stream(stream):
            return src.to(self.device, non_blocking=True)

    def record_stream(self, t: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """When `t` is freed, its memory waits for the work queued on `stream` by then."""
        t.record_stream(stream)


class SyncOps:
    """A device without streams (the CPU standing in for an accelerator): a copy is complete when it returns."""

    copy_stream = None

    def __init__(self, device: torch.device):
        self.device = device

    def compute_stream(self) -> None:
        return None

    def new_event(self) -> None:
        return None

    def record(self, event, stream) -> None:
        pass

    def host_wait(self, event) -> None:
        pass

    def stream_wait(self, stream, event) -> None:
        pass

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_to_device(self, src: torch.Tensor, stream) -> torch.Tensor:
        return src.to(self.device, copy=True)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        pass


DeviceOps = CudaOps | SyncOps


def device_ops(device: torch.device) -> DeviceOps:
    return CudaOps(device) if device.type == "cuda" else SyncOps(device)


_ALIGN = 64  # bytes: each tensor in a staging buffer starts aligned for any dtype view and for DMA


@dataclass(slots=True)
class _Slot:
    """One pinned staging buffer and the event of the latest copy out of it."""

    done: object  # the ops' event
    buffer: torch.Tensor | None = None  # uint8, grown to the largest expert staged in it

    def stage(self, tensors: list[torch.Tensor], ops: DeviceOps) -> list[torch.Tensor]:
        """Copies `tensors` into the buffer; returns views of it shaped like them."""
        offsets = [0]
        for t in tensors:
            offsets.append(offsets[-1] + -(-t.nbytes // _ALIGN) * _ALIGN)
        if self.buffer is None or self.buffer.numel() < offsets[-1]:
            self.buffer = ops.pinned(offsets[-1])
        views = [self.buffer[o:o + t.nbytes].view(t.dtype).view(t.shape)
                 for t, o in zip(tensors, offsets[:-1], strict=True)]
        for view, t in zip(views, tensors, strict=True):
            view.copy_(t)
        return views


class Stager:
    """Host -> device copies of experts through a ring of pinned staging buffers on a side stream (module doc)."""

    def __init__(self, ops: DeviceOps, slots: int = 2):
        self.ops = ops
        self.ring = [_Slot(ops.new_event()) for _ in range(slots)]
        self.turn = 0

    def copy_expert(self, w: ExpertWeights) -> ExpertWeights:
        """Device copies of `w`, ready for use on the current (compute) stream; returns once the copy is queued."""
        ops, slot = self.ops, self.ring[self.turn]
        self.turn = (self.turn + 1) % len(self.ring)
        ops.host_wait(slot.done)  # this buffer's previous copy has left it; later copies keep running
        staged = slot.stage([w.gate_up, w.down], ops)
        out = [ops.copy_to_device(t, ops.copy_stream) for t in staged]
        ops.record(slot.done, ops.copy_stream)
        compute = ops.compute_stream()
        ops.stream_wait(compute, slot.done)  # the first use waits for this copy, not for the whole side stream
        for t in out:  # allocated on the side stream, read on the compute stream
            ops.record_stream(t, compute)
        return ExpertWeights(*out)


class AcceleratorStore(ExpertStore):
    """Experts on `device` up to `budget` bytes over a host store; yields each expert where it should run.

    `counts` (tokens routed to each requested expert) drive the placement; without them every step is treated as
    one token per expert (decode). `ops` replaces the device calls of the copies (tests); by default CUDA's.
    """

    def __init__(self, host: ExpertStore, device: torch.device | str, budget: int, policy: CachePolicy,
                 costs: DeviceCosts, ops: DeviceOps | None = None):
        self.host, self.device, self.budget, self.costs = host, torch.device(device), budget, costs
        self.cache = ExpertCache(budget, policy, size_of=lambda k: host.expert_nbytes(*k))
        self.weights: dict[Key, ExpertWeights] = {}  # the device copies (the cache may hold more keys)
        self.stager = Stager(ops or device_ops(self.device))
        self.placements = {w: 0 for w in Where}  # how often each decision was taken
        self.step = 0

    @property
    def stats(self):
        return self.host.stats

    @stats.setter
    def stats(self, value):
        self.host.stats = value

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.host.expert_nbytes(layer, expert)

    def fetch(self, layer: int, experts: list[int], counts: list[int] | None = None,
              prefetch: tuple[int, list[int]] | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        self.step += 1
        tokens = dict(zip(experts, counts or [1] * len(experts), strict=True))
        self._accessed(layer, experts)
        rest = yield from self._device_hits(layer, experts)
        if rest:
            on_device = [(layer, e) for e in experts if e not in rest]
            for e, w in self.host.fetch(layer, rest, prefetch=prefetch):
                yield e, self._placed(layer, e, w, tokens[e], on_device)
        self._free(self.cache.propose(self.step, [(layer, e) for e in experts]).evicted)

    def _accessed(self, layer: int, experts: list[int]) -> None:
        """Every requested expert counts as used once this step, wherever it runs: the policy learns what is busy."""
        on_access = self.cache.policy.on_access
        for e in experts:
            on_access((layer, e), self.step)

    def _device_hits(self, layer: int, experts: list[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield the requested experts already on the device; return the others, in request order."""
        rest = []
        for e in experts:
            w = self.weights.get((layer, e))
            if w is None:
                rest.append(e)
                continue
            self.placements[Where.DEVICE] += 1
            yield e, w
        return rest

    def _placed(self, layer: int, e: int, w: ExpertWeights, tokens: int, pinned: list[Key]) -> ExpertWeights:
        """A host expert: copied to the device if it was admitted there (now, or by the policy's proposal at an
        earlier step), else computed on the CPU. `pinned`: this step's device experts, never evicted for it."""
        key = (layer, e)
        where = Where.PROMOTE if key in self.cache else self._admit(key, w, tokens, pinned)
        self.placements[where] += 1
        if where is Where.HOST:
            return w
        start = time.perf_counter()
        self.weights[key] = self.stager.copy_expert(w)
        self.host.stats.layer(layer).stall_time += time.perf_counter() - start
        return self.weights[key]

    def _admit(self, key: Key, w: ExpertWeights, tokens: int, pinned: list[Key]) -> Where:
        """PROMOTE when the cost rule says so and the expert fits beside `pinned` (the policy choosing what
        leaves), else HOST."""
        nbytes = self.cache.size(key)
        flops = 2.0 * (w.gate_up.numel() + w.down.numel())  # per token
        room = self.cache.used + nbytes <= self.budget
        if place(tokens, nbytes, flops, False, room, self.costs) is Where.HOST:
            return Where.HOST
        _, admitted, evicted = self.cache.admit([key], self.step, pinned)
        self._free(evicted)
        return Where.PROMOTE if admitted else Where.HOST

    def _free(self, keys: list[Key]) -> None:
        """Drop evicted experts' device copies (a key admitted by a proposal may not have one yet). Their memory
        returns to the allocator only after the compute work queued so far (each copy was `record_stream`ed)."""
        for key in keys:
            self.weights.pop(key, None)

    def close(self) -> None:
        self.host.close()


def profile_costs(device: torch.device, hidden: int = 2048, inter: int = 1024) -> DeviceCosts:
    """Measure CPU and device expert throughput and the copy bandwidth once (a few hundred ms)."""
    w = torch.randn(2 * inter, hidden)
    x1, xn = torch.randn(1, hidden), torch.randn(256, hidden)
    cpu_bw = w.nbytes / _timed(lambda: x1 @ w.T)
    cpu_flops = 2 * 256 * w.numel() / _timed(lambda: xn @ w.T)
    if device.type != "cuda":
        return DeviceCosts(cpu_flops, cpu_bw, cpu_bw, cpu_flops)
    pinned = w.pin_memory()
    copy_bw = w.nbytes / _timed(lambda: (pinned.to(device, non_blocking=True), torch.cuda.synchronize()))
    wd, xd = w.to(device), xn.to(device)
    dev_flops = 2 * 256 * w.numel() / _timed(lambda: (xd @ wd.T, torch.cuda.synchronize()))
    return DeviceCosts(cpu_flops, cpu_bw, copy_bw, dev_flops)


def _timed(fn, reps: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps
