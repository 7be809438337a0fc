"""Accelerator tier: experts on the GPU under their own byte budget, above the RAM tier.

Per expert and step it decides where the expert runs (the DALI / Fiddler observation: for a few tokens, computing
an expert on the CPU beats copying its weights over PCIe):

- resident on the device: run there;
- otherwise, `promote` (copy to the device, evicting by the policy, and run there) when the copy plus device compute
  is predicted cheaper than CPU compute, or when the device tier still has free room;
- else run it on the CPU from the RAM tier, and the hidden rows travel instead of the weights.

Copies go through pinned host staging buffers on a side CUDA stream; the compute stream waits on that stream
before the first use. The decisions are plain functions of a cost model, tested without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch

from tiermoe.offload.cache import ExpertCache
from tiermoe.offload.policies import CachePolicy
from tiermoe.offload.store import ExpertStore, ExpertWeights


class Where(Enum):
    DEVICE = "device"  # resident on the accelerator
    PROMOTE = "promote"  # copy to the accelerator now, then run there
    HOST = "host"  # run on the CPU from the RAM tier


@dataclass(frozen=True, slots=True)
class DeviceCosts:
    """Throughputs that decide placement (profile once per machine; see `profile_costs`)."""

    cpu_flops: float  # FLOP/s of an expert's matmuls on the CPU
    cpu_bandwidth: float  # bytes/s the CPU streams weights at (small batches are bandwidth bound)
    copy_bandwidth: float  # host -> device bytes/s from pinned memory
    device_flops: float

    def cpu_time(self, tokens: int, nbytes: int, flops_per_token: float) -> float:
        return max(nbytes / self.cpu_bandwidth, tokens * flops_per_token / self.cpu_flops)

    def promote_time(self, tokens: int, nbytes: int, flops_per_token: float) -> float:
        return nbytes / self.copy_bandwidth + tokens * flops_per_token / self.device_flops


def place(tokens: int, nbytes: int, flops_per_token: float, on_device: bool, has_room: bool,
          costs: DeviceCosts) -> Where:
    """Where one expert runs this step."""
    if on_device:
        return Where.DEVICE
    if has_room or costs.promote_time(tokens, nbytes, flops_per_token) < costs.cpu_time(tokens, nbytes,
                                                                                        flops_per_token):
        return Where.PROMOTE
    return Where.HOST


class Stager:
    """Host -> device copies through pinned staging buffers on a side stream (a plain copy off CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._pinned: dict[tuple, torch.Tensor] = {}

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t.to(self.device, copy=True)
        key = (tuple(t.shape), t.dtype)
        staging = self._pinned.get(key)
        if staging is None:
            staging = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        # the staging buffer is reused: wait for the previous copy out of it before refilling
        self.stream.synchronize()
        staging.copy_(t)
        with torch.cuda.stream(self.stream):
            return staging.to(self.device, non_blocking=True)

    def wait(self) -> None:
        """Make the compute stream wait for every copy issued so far."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def copy_expert(self, w: ExpertWeights) -> ExpertWeights:
        out = ExpertWeights(self.to_device(w.gate_up), self.to_device(w.down))
        self.wait()
        return out


class AcceleratorStore(ExpertStore):
    """Experts on `device` up to `budget` bytes over a host store; yields each expert where it should run.

    `counts` (tokens routed to each requested expert) drive the placement; without them every step is treated as
    one token per expert (decode).
    """

    def __init__(self, host: ExpertStore, device: torch.device | str, budget: int, policy: CachePolicy,
                 costs: DeviceCosts):
        self.host, self.device, self.budget, self.costs = host, torch.device(device), budget, costs
        self.cache = ExpertCache(budget, policy, size_of=lambda k: host.expert_nbytes(*k))
        self.weights: dict[tuple[int, int], ExpertWeights] = {}
        self.stager = Stager(self.device)
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
        rest = yield from self._device_hits(layer, experts)
        if not rest:
            return
        on_device = sorted(set(experts) - set(rest))
        for e, w in self.host.fetch(layer, rest, prefetch=prefetch):
            yield e, self._placed(layer, e, w, tokens[e], pinned=on_device)

    def _device_hits(self, layer: int, experts: list[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield the requested experts already on the device; return the others, in request order."""
        rest = []
        for e in experts:
            if (layer, e) in self.weights:
                self.cache.policy.on_access((layer, e), self.step)
                self.placements[Where.DEVICE] += 1
                yield e, self.weights[(layer, e)]
            else:
                rest.append(e)
        return rest

    def _placed(self, layer: int, e: int, w: ExpertWeights, tokens: int, pinned: list[int]) -> ExpertWeights:
        key = (layer, e)
        nbytes = self.cache.size(key)
        flops = 2.0 * (w.gate_up.numel() + w.down.numel())  # per token
        room = self.cache.used + nbytes <= self.budget
        where = place(tokens, nbytes, flops, False, room, self.costs)
        if where is Where.PROMOTE and not self._can_make_room(key, pinned):
            where = Where.HOST
        self.placements[where] += 1
        if where is Where.HOST:
            return w
        start = time.perf_counter()
        _, _, evicted = self.cache.request([(layer, p) for p in pinned] + [key], self.step)
        for old in evicted:
            del self.weights[old]
        self.weights[key] = self.stager.copy_expert(w)
        self.host.stats.layer(layer).stall_time += time.perf_counter() - start
        return self.weights[key]

    def _can_make_room(self, key, pinned: list[int]) -> bool:
        """An expert fits if the budget minus this step's device experts can hold it."""
        layer = key[0]
        keep = sum(self.cache.size((layer, p)) for p in pinned)
        return keep + self.cache.size(key) <= self.budget

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
