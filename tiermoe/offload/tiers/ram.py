"""RAM tier over the SSD: experts cached under a byte budget, misses read with direct I/O on a thread pool.

The cache bookkeeping and the eviction policy are the same objects the simulator drives (`ExpertCache`,
`CachePolicy`); this class adds the weights, the reads and the statistics.

A request is served in the order its experts become ready: the resident ones first, while the misses are read, then
each miss as its read lands, so reads overlap the compute of what is already there. Below the working set of one
pass over the layers the cache streams misses rather than evicting what the pass is about to reuse (see
`ExpertCache`); streamed experts flow through a window beside the cache (`stream_window` streamed experts alive at
once: the next read starts when the caller releases the one it computed, so the reads in flight and that one share
the window), taken from the cache's capacity the first time a miss is streamed, so expert RAM never exceeds the
budget and a budget above the working set keeps all of it for the cache.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from tiermoe.checkpoint import CheckpointIndex
from tiermoe.errors import ConfigError, ExpertIOError
from tiermoe.offload.policies import CachePolicy
from tiermoe.offload.tiers.budget import format_bytes
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.offload.tiers.direct_io import DirectReader
from tiermoe.offload.tiers.expert_reads import ReadPlan, plan_read, read_expert, slot_nbytes
from tiermoe.offload.tiers.native_reads import ExpertReads, NativeRead, engine_module, first_landed, settle
from tiermoe.offload.tiers.stats import StoreStats
from tiermoe.offload.tiers.store import ExpertStore, ExpertWeights

Key = tuple[int, int]  # (layer, expert)
Read = Future | NativeRead  # what `_load` returns, once landed
Reads = dict[Read, tuple[Key, bool]]  # read in flight -> (expert, kept in the cache or streamed)


def min_budget(index: CheckpointIndex, moe_layers: list[int], top_k: int, dtype: torch.dtype) -> int:
    """The experts one token needs at once: the top_k largest experts of the most demanding layer."""
    experts = index.experts()
    worst = 0
    for layer in moe_layers:
        sizes = sorted((slot_nbytes(s, dtype) for (lay, _), s in experts.items() if lay == layer), reverse=True)
        worst = max(worst, sum(sizes[:top_k]))
    return worst


def stream_depth(budget: int, largest: int, io_threads: int) -> int:
    """Default reads in flight for streamed misses. A batch's union outgrows the cache far more often than one
    token's experts: read at the I/O threads' depth, not one at a time, as far as the window takes at most 1/16 of the
    budget."""
    return max(1, min(io_threads, budget // max(largest, 1) // 16))


def stream_reserve(budget: int, largest: int, window: int, cached: int = 0) -> tuple[int, int]:
    """(streamed experts alive at once, bytes) of a stream window: `window` of them (reads in flight, and the one
    being computed: `_top_up` starts a read only once the caller has released it), as far as the budget holds them
    beside `cached` experts left to the cache, and at least one."""
    if not largest:
        return 0, 0
    window = max(1, min(window, budget // largest - cached))
    return window, min(window * largest, budget)


def turns(keys: list[Key], cache: ExpertCache) -> list[list[Key]]:
    """Split a request whose experts do not fit the cache together into turns that do (the simulator's too)."""
    chunks, current, used = [], [], 0
    for key in keys:
        size = cache.size(key)
        if current and used + size > cache.capacity:
            chunks.append(current)
            current, used = [], 0
        current.append(key)
        used += size
    return chunks + [current] if current else chunks


class TieredStore(ExpertStore):
    """Experts resident in RAM up to `budget` bytes; the rest read from the checkpoint files on demand."""

    def __init__(self, index: CheckpointIndex, dtype: torch.dtype, budget: int, policy: CachePolicy,
                 moe_layers: list[int], top_k: int, io_threads: int = 4, direct_io: bool = True,
                 stream_window: int | None = None, scan_resistant: bool = True, native_io: bool = True):
        least = min_budget(index, moe_layers, top_k, dtype)
        if budget < least:
            raise ConfigError(f"expert cache budget {format_bytes(budget)} ({budget} bytes) is smaller than the "
                              f"{top_k} experts one token needs; the minimum is {format_bytes(least)} ({least} bytes)")
        self.index, self.dtype, self.budget = index, dtype, budget
        # A pass over the layers is one request per MoE layer: residents requested within it are its working set.
        horizon = max(len(moe_layers), 1) if scan_resistant else None
        self.cache = ExpertCache(budget, policy, size_of=lambda k: slot_nbytes(index.expert(*k), dtype),
                                 horizon=horizon)
        self.largest = max((self.cache.size(key) for key in index.experts()), default=0)
        depth = stream_window or stream_depth(budget, self.largest, io_threads)
        self.window, self.reserve = stream_reserve(budget, self.largest, depth, cached=1)
        self.weights: dict[Key, ExpertWeights] = {}
        self.reader = DirectReader(max_workers=1, direct=direct_io)
        self._plans: dict[Key, ReadPlan] = {}
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="expert-io")
        # Native reader threads when every expert is read in place or gathered (no dtype conversion left for a reader
        # to do: the readers run no Python)
        module = engine_module() if native_io else None
        placed = module is not None and all(self._plan(key).kept or self._plan(key).gather is not None
                                            for key in index.experts())
        self.native = ExpertReads(module, self.reader, io_threads) if placed else None
        self._reserve_buffers()
        self.stats = StoreStats()
        self.step = 0
        self.inflight: dict[Key, Read] = {}  # prefetched experts whose read has not been collected yet
        self._in_use: list[Key] = []  # keys of the request being served: never evicted by a prefetch
        self._file_state = {f: _state(f) for f in {p.file for s in index.experts().values() for p in s.parts}}
        self._checked: dict[Path, int] = {}  # file -> the step whose native reads last found it unchanged

    def _reserve_buffers(self) -> None:
        """When every expert is read in place into a buffer of one size, map the budget's buffers once: the cached
        and streamed experts are those buffers, so they never exceed it (`BufferPool.reserve`)."""
        sizes = {plan.layout.size if plan.kept else 0 for plan in map(self._plan, self.index.experts())}
        if len(sizes) == 1 and 0 not in sizes:
            size = sizes.pop()
            self.reader.pool.reserve(size, self.budget // size)

    @property
    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def fetch(self, layer: int, experts: list[int], counts: list[int] | None = None,
              prefetch: tuple[int, list[int]] | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        for group in self._groups(layer, experts, counts, prefetch, grouped=False):
            (item,) = group
            del group
            yield item
            del item  # the caller is done with it: its room serves the next streamed read

    def fetch_groups(self, layer: int, experts: list[int], counts: list[int] | None = None,
                     prefetch: tuple[int, list[int]] | None = None) -> Iterator[list[tuple[int, ExpertWeights]]]:
        """The request's residents in one group, then each set of reads that landed while the caller computed."""
        return self._groups(layer, experts, counts, prefetch, grouped=True)

    def _groups(self, layer: int, experts: list[int], counts: list[int] | None,
                prefetch: tuple[int, list[int]] | None, grouped: bool) -> Iterator[list[tuple[int, ExpertWeights]]]:
        """`fetch_groups`, or with `grouped` False one expert a group."""
        keys = [(layer, e) for e in experts]
        if len(keys) * self.largest <= self.budget or sum(self.cache.size(k) for k in keys) <= self.budget:
            yield from self._serve(keys, prefetch, grouped=grouped)
            return
        # Larger than the budget (a long prefill): turns that each fit the cache, each evicting the one before, so
        # the last turn's experts stay (fetch_order puts the prompt's last tokens' there).
        for i, chunk in enumerate(self._chunks(keys)):
            alone = sum(self.cache.size(k) for k in chunk) > self.cache.capacity  # one expert beyond the cache
            yield from self._serve(chunk, prefetch if i == 0 else None, stream=alone, grouped=grouped)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading experts predicted for `layer` in the background, after the current request's reads.

        Room is made by the policy like for a miss, except that the experts in use are never evicted and what does
        not fit beside them is skipped. A prefetched expert is accounted against the budget from now on.
        """
        self._read_ahead(self.cache.admit([(layer, e) for e in experts], self.step, self._in_use))

    def _read_ahead(self, outcome) -> None:
        """Start the reads of keys admitted ahead of use, after freeing what made room for them."""
        _, admitted, evicted = outcome
        for key in evicted:
            self._drop(key)
        for key in admitted:
            self.inflight[key] = self._submit(key)
        self.stats.prefetched += len(admitted)

    def _drop(self, key: Key) -> None:
        """Forget an evicted expert's weights, or its prefetch still in flight (a read that happened is counted)."""
        self.weights.pop(key, None)
        fut = self.inflight.pop(key, None)
        if fut is not None and not fut.cancel():
            settle(fut)  # already being read: let its bytes go before their room is reused
            if not _failed(fut):
                _, nbytes, seconds = fut.result()
                self._count_read(key, nbytes, seconds)

    def _chunks(self, keys: list[Key]) -> list[list[Key]]:
        return turns(keys, self.cache)

    def _serve(self, keys: list[Key], prefetch: tuple[int, list[int]] | None, stream: bool = True,
               grouped: bool = False) -> Iterator[list[tuple[int, ExpertWeights]]]:
        self.step += 1
        hits, misses, evicted = self.cache.request(keys, self.step, stream)
        for key in evicted:
            self._drop(key)
        # the reads first (the model waits on them), the bookkeeping after
        reads: Reads = {self._submit(key): (key, True) for key in misses}
        self._in_use = keys
        for key in [key for key in hits if key in self.inflight]:  # prefetched; one that failed is read again
            fut = self.inflight.pop(key)
            reads[self._submit(key) if _failed(fut) else fut] = (key, True)
        kept = set(hits) | set(misses)
        streamed = [key for key in keys if key not in kept]
        if streamed:
            self._open_window(hits + misses)
        stats = self.stats.layer(keys[0][0])
        stats.hits += len(hits)
        stats.misses += len(misses) + len(streamed)
        self.stats.evictions += len(evicted)
        self.stats.streamed += len(streamed)
        queue = deque(streamed)
        self._top_up(reads, queue)  # demand reads first, then the reads ahead
        if reads and self.native is None:
            time.sleep(0)  # hand the interpreter lock to the readers until they are in their reads
        self._read_ahead(self.cache.propose(self.step, keys))  # swaps a policy asks for (DALI), else nothing
        if prefetch is not None:
            self.prefetch(*prefetch)
        yield from self._collect(keys[0][0], [key for key in hits if key in self.weights], reads, queue, grouped)

    def _open_window(self, pinned: list[Key]) -> None:
        """Make room for streamed experts beside the cache (once: the cache keeps the smaller capacity after)."""
        capacity = max(self.budget - self.reserve, sum(self.cache.size(k) for k in pinned))
        if self.cache.capacity > capacity:
            evicted = self.cache.shrink(capacity, self.step, pinned)
            for key in evicted:
                self._drop(key)
            self.stats.evictions += len(evicted)

    def _collect(self, layer: int, ready: list[Key], reads: Reads, queue: deque,
                 grouped: bool = False) -> Iterator[list[tuple[int, ExpertWeights]]]:
        """Yield the `ready` experts while `reads` land, then the reads as they land, keeping the stream `queue`'s
        reads going: `grouped`, the ready ones as one group and the reads found landed together as one, else one
        expert a group. On a failed read, the others are settled before the error is raised."""
        stats, error = self.stats.layer(layer), None
        try:
            if grouped and ready:
                yield [(key[1], self.weights[key]) for key in ready]
            else:
                for key in ready:
                    yield [(key[1], self.weights[key])]
            while reads and error is None:
                done = [fut for fut in reads if fut.done()]  # landed while the caller computed: no waiter to set up
                if not done:
                    start = time.perf_counter()
                    done = first_landed(reads)
                    stats.stall_time += time.perf_counter() - start
                while done:  # popped, so that no finished future (which holds its result) outlives the caller's use
                    group = []
                    while done and (grouped or not group):  # the others stay counted in flight until their turn
                        fut = done.pop()
                        key, keep = reads.pop(fut)
                        w = self._install(key, fut) if keep else self._streamed(key, fut)
                        if w is None:
                            error = error or fut.exception() or ExpertIOError(f"read of expert {key} was cancelled")
                            continue
                        group.append((key[1], w))
                    fut = w = None
                    if group:
                        yield group
                    del group  # the caller is done with it: its room serves the next streamed reads
                    if error is None:
                        self._top_up(reads, queue)
        finally:
            for fut, (key, keep) in reads.items():  # settle every read so the books agree for the next request
                settle(fut)
                if keep:
                    self._install(key, fut)
        if error is not None:
            raise error

    def _top_up(self, reads: Reads, queue: deque) -> None:
        """Keep the stream window's reads in flight; called when the caller holds no streamed expert."""
        if not queue:
            return
        in_flight = sum(not keep for _, keep in reads.values())
        for _ in range(min(self.window - in_flight, len(queue))):
            key = queue.popleft()
            reads[self._submit(key)] = (key, False)

    def _install(self, key: Key, fut: Read) -> ExpertWeights | None:
        """Keep a finished read's weights, or forget the key if the read failed."""
        if fut.cancelled() or fut.exception() is not None:
            self.cache.discard(key)
            return None
        w, nbytes, seconds = fut.result()
        self.weights[key] = w
        self._count_read(key, nbytes, seconds)
        return w

    def _streamed(self, key: Key, fut: Read) -> ExpertWeights | None:
        """A streamed read's weights, counted but not kept."""
        if fut.cancelled() or fut.exception() is not None:
            return None
        w, nbytes, seconds = fut.result()
        self._count_read(key, nbytes, seconds)
        return w

    def _count_read(self, key: Key, nbytes: int, seconds: float) -> None:
        stats = self.stats.layer(key[0])
        stats.bytes_read += nbytes
        stats.read_time += seconds

    def _submit(self, key: Key) -> Read:
        """Start reading one expert: on the native readers when there are, else on the I/O threads (also when
        another reader was swapped in: tests inject faults through one)."""
        if self.native is None or self.native.reader is not self.reader:
            return self.pool.submit(self._load, key)
        plan = self._plan(key)
        try:
            self._check_files(key, plan, once_per_step=True)
        except ExpertIOError as err:
            fut = Future()
            fut.set_exception(err)
            return fut
        on_error = functools.partial(self._read_error, key, plan)
        if plan.kept:
            return self.native.submit(plan.spec, plan.layout, on_error)
        return self.native.gather(plan.spec, plan.gather, on_error)

    def _load(self, key: Key) -> tuple[ExpertWeights, int, float]:
        """Runs on an I/O thread: read one expert's bytes as compute-ready weights."""
        start = time.perf_counter()
        plan = self._plan(key)
        self._check_files(key, plan)
        try:
            weights, nbytes = read_expert(self.reader, plan, self.dtype)
        except OSError as err:
            raise self._read_error(key, plan, err) from err
        return weights, nbytes, time.perf_counter() - start

    def _check_files(self, key: Key, plan: ReadPlan, once_per_step: bool = False) -> None:
        """ExpertIOError if a file of the expert changed since the engine opened it; `once_per_step` (the model's
        thread only): each file is looked at once per step, so a request's reads share one look."""
        for file in plan.files:
            if once_per_step and self._checked.get(file) == self.step:
                continue
            if _state(file) != self._file_state[file]:
                raise ExpertIOError(f"{file} changed after the engine opened it (expert {key[1]} of layer {key[0]}); "
                                    "restart on the new checkpoint")
            if once_per_step:
                self._checked[file] = self.step

    @staticmethod
    def _read_error(key: Key, plan: ReadPlan, err: OSError) -> ExpertIOError:
        return ExpertIOError(f"reading expert {key[1]} of layer {key[0]} from {plan.spec.gate.file} failed: {err}")

    def _plan(self, key: Key) -> ReadPlan:
        """How an expert is read, worked out once (its reads repeat)."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_read(self.index.expert(*key), self.dtype)
        return plan

    def close(self) -> None:
        if self.native is not None:
            self.native.close()
        self.pool.shutdown()
        self.reader.close()


def _failed(fut: Read) -> bool:
    """A read that ended in an error: a prefetch that failed earlier (the file was unreadable then) is retried
    rather than failing the request that now needs the expert."""
    return fut.done() and (fut.cancelled() or fut.exception() is not None)


def _state(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
