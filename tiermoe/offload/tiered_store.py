"""RAM tier over the SSD: experts cached under a byte budget, misses read with direct I/O on a thread pool.

The cache bookkeeping and the eviction policy are the same objects the simulator drives (`ExpertCache`,
`CachePolicy`); this class adds the weights, the reads and the statistics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from tiermoe.checkpoint import CheckpointIndex, ExpertSpec, TensorInfo
from tiermoe.errors import ConfigError, ExpertIOError
from tiermoe.offload.budget import format_bytes
from tiermoe.offload.cache import ExpertCache
from tiermoe.offload.direct_io import DirectReader
from tiermoe.offload.policies import CachePolicy
from tiermoe.offload.stats import StoreStats
from tiermoe.offload.store import ExpertStore, ExpertWeights, build_expert, loaded_nbytes

Key = tuple[int, int]  # (layer, expert)

# Parts of one expert closer together than this are fetched with one read (save_pretrained writes an expert's
# down, gate and up tensors next to each other).
COALESCE_GAP = 64 << 10


def min_budget(index: CheckpointIndex, moe_layers: list[int], top_k: int, dtype: torch.dtype) -> int:
    """The experts one token needs at once: the top_k largest experts of the most demanding layer."""
    experts = index.experts()
    worst = 0
    for layer in moe_layers:
        sizes = sorted((loaded_nbytes(s, dtype) for (lay, _), s in experts.items() if lay == layer), reverse=True)
        worst = max(worst, sum(sizes[:top_k]))
    return worst


class TieredStore(ExpertStore):
    """Experts resident in RAM up to `budget` bytes; the rest read from the checkpoint files on demand."""

    def __init__(self, index: CheckpointIndex, dtype: torch.dtype, budget: int, policy: CachePolicy,
                 moe_layers: list[int], top_k: int, io_threads: int = 4, direct_io: bool = True):
        least = min_budget(index, moe_layers, top_k, dtype)
        if budget < least:
            raise ConfigError(f"expert cache budget {format_bytes(budget)} ({budget} bytes) is smaller than the "
                              f"{top_k} experts one token needs; the minimum is {format_bytes(least)} ({least} bytes)")
        self.index, self.dtype, self.budget = index, dtype, budget
        self.cache = ExpertCache(budget, policy, size_of=lambda k: loaded_nbytes(index.expert(*k), dtype))
        self.weights: dict[Key, ExpertWeights] = {}
        self.reader = DirectReader(max_workers=1, direct=direct_io)
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="expert-io")
        self.stats = StoreStats()
        self.step = 0
        self.inflight: dict[Key, Future] = {}  # prefetched experts whose read has not been collected yet
        self._in_use: list[Key] = []  # keys of the request being served: never evicted by a prefetch
        self._file_state = {f: _state(f) for f in {p.file for s in index.experts().values() for p in s.parts}}

    @property
    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def fetch(self, layer: int, experts: list[int], counts: list[int] | None = None,
              prefetch: tuple[int, list[int]] | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        for i, chunk in enumerate(self._chunks([(layer, e) for e in experts])):
            yield from self._serve(chunk, prefetch if i == 0 else None)

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
            self.inflight[key] = self.pool.submit(self._load, key)
        self.stats.prefetched += len(admitted)

    def _drop(self, key: Key) -> None:
        """Forget an evicted expert's weights, or its prefetch still in flight."""
        self.weights.pop(key, None)
        fut = self.inflight.pop(key, None)
        if fut is not None and not fut.cancel():
            wait([fut])  # already being read: let its bytes go before their room is reused

    def _chunks(self, keys: list[Key]) -> list[list[Key]]:
        """Split a request whose experts do not fit the budget together into turns that do (prefill of many tokens)."""
        chunks, current, used = [], [], 0
        for key in keys:
            size = self.cache.size(key)
            if current and used + size > self.budget:
                chunks.append(current)
                current, used = [], 0
            current.append(key)
            used += size
        return chunks + [current] if current else chunks

    def _serve(self, keys: list[Key], prefetch: tuple[int, list[int]] | None) -> Iterator[tuple[int, ExpertWeights]]:
        self.step += 1
        hits, misses, evicted = self.cache.request(keys, self.step)
        for key in evicted:
            self._drop(key)
        stats = self.stats.layer(keys[0][0])
        stats.hits += len(hits)
        stats.misses += len(misses)
        self.stats.evictions += len(evicted)
        self._in_use = keys
        futures = {self.pool.submit(self._load, key): key for key in misses}
        futures.update({self.inflight.pop(key): key for key in hits if key in self.inflight})  # prefetched
        self._read_ahead(self.cache.propose(self.step, keys))  # swaps a policy asks for (DALI), else nothing
        if prefetch is not None:
            self.prefetch(*prefetch)
        for key in hits:
            if key in self.weights:
                yield key[1], self.weights[key]
        pending, error = set(futures), None
        try:
            while pending:
                start = time.perf_counter()
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                stats.stall_time += time.perf_counter() - start
                for fut in done:
                    if (w := self._install(futures[fut], fut)) is not None:
                        yield futures[fut][1], w
                    else:
                        error = error or fut.exception()
                if error is not None:
                    break
        finally:
            # Whatever happens (a failed read, an abandoned request), settle every read so the cache's books and
            # the weights agree for the next request.
            for fut in pending:
                self._install(futures[fut], fut)
        if error is not None:
            raise error

    def _install(self, key: Key, fut: Future) -> ExpertWeights | None:
        """Keep a finished read's weights, or forget the key if the read failed."""
        if fut.cancelled() or fut.exception() is not None:
            self.cache.discard(key)
            return None
        w, nbytes, seconds = fut.result()
        self.weights[key] = w
        stats = self.stats.layer(key[0])
        stats.bytes_read += nbytes
        stats.read_time += seconds
        return w

    def _load(self, key: Key) -> tuple[ExpertWeights, int, float]:
        """Runs on an I/O thread: read one expert's bytes and convert them to compute-ready weights."""
        layer, e = key
        spec = self.index.expert(layer, e)
        start = time.perf_counter()
        for part in spec.parts:
            if _state(part.file) != self._file_state[part.file]:
                raise ExpertIOError(f"{part.file} changed after the engine opened it (expert {e} of layer {layer}); "
                                    "restart on the new checkpoint")
        segments = []
        try:
            tensors = [self._read(spec, part, segments) for part in spec.parts]
            weights = build_expert(spec, *tensors, self.dtype)  # copies out of the read buffers
        except OSError as err:
            raise ExpertIOError(f"reading expert {e} of layer {layer} from {spec.gate.file} failed: {err}") from err
        finally:
            for seg in segments:
                seg.release()
        return weights, sum(seg.nbytes for seg in segments), time.perf_counter() - start

    def _read(self, spec: ExpertSpec, part: TensorInfo, segments: list) -> torch.Tensor:
        """One part of an expert, from a segment already read for a neighbouring part when there is one.

        Parts in one file close together are fetched with one read (the converted layout, and save_pretrained's).
        """
        for seg in segments:
            if seg.path == os.fspath(part.file) and seg.offset <= part.offset <= seg.offset + seg.nbytes - part.nbytes:
                return _tensor(seg.as_tensor(), part, part.offset - seg.offset)
        same_file = [p for p in spec.parts if p.file == part.file]
        lo, hi = min(p.offset for p in same_file), max(p.offset + p.nbytes for p in same_file)
        if hi - lo > sum(p.nbytes for p in same_file) + COALESCE_GAP:
            lo, hi = part.offset, part.offset + part.nbytes
        segments.append(self.reader.read(part.file, lo, hi - lo))
        return _tensor(segments[-1].as_tensor(), part, part.offset - lo)

    def close(self) -> None:
        self.pool.shutdown()
        self.reader.close()


def _tensor(raw: torch.Tensor, part: TensorInfo, offset: int) -> torch.Tensor:
    """View of `part`'s bytes inside a uint8 buffer, as its dtype and shape."""
    return raw[offset:offset + part.nbytes].view(part.dtype).view(part.shape)


def _state(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
