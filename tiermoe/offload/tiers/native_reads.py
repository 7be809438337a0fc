"""Expert reads on native threads (tiermoe/kernels/expert_io.cpp) whose reader side runs no Python.

With reads on Python threads, every read needs the interpreter lock to start, to wrap its bytes and to complete its
future, while the model's thread holds it for the Python between its kernels: a landed read then waits for the model,
and the model, handing the lock over, waits for the readers (bench/results/offload_speed.md). Here the store's
thread queues an in-place expert's page reads straight into its pooled buffer (`ExpertReads.submit`), native
threads run them, and the store's thread polls or blocks with the lock released, then views the filled buffer as
the weights: no copy, no future, no reader thread in the interpreter. An expert that is not read in place but whose
conversion is placement alone (`expert_reads.Gather`: small experts whole pages would pad out) is read into a bounce
buffer of the engine's and copied into its exact-size slot by the native thread that read it (`ExpertReads.gather`).

A `NativeRead` answers the `concurrent.futures.Future` methods the store uses (done, cancel, cancelled, exception,
result), so the store drives either kind of read the same way; `first_landed` and `settle` wait on either kind.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from types import ModuleType

import torch

from tiermoe.checkpoint import ExpertSpec
from tiermoe.kernels import build
from tiermoe.offload.tiers.direct_io import DirectReader, Segment, ShortReadError, align_up
from tiermoe.offload.tiers.expert_reads import Gather, Layout, in_place_weights, read_pages
from tiermoe.offload.tiers.store import ExpertWeights

SOURCE = Path(build.__file__).with_name("expert_io.cpp")
_UNSET = object()
_module = _UNSET


def disabled() -> bool:
    """TIERMOE_NATIVE_IO=off (or TIERMOE_KERNELS=off: no compiled code at all) keeps reads on Python threads."""
    return build.disabled() or os.environ.get("TIERMOE_NATIVE_IO", "").lower() in ("0", "off", "false", "no")


def engine_module() -> ModuleType | None:
    """The compiled read engine (built once per machine, like the kernels), or None with one warning line."""
    global _module
    if disabled() or not sys.platform.startswith("linux"):
        return None
    if _module is _UNSET:
        _module = build.build_extension("tiermoe_expert_io", SOURCE, ["-O2"], what="native expert reads",
                                        instead="reading on Python threads")
    return _module


class ExpertReads:
    """In-place expert reads on `threads` native threads, into buffers of `reader`'s pool over its open files.

    An expert's reads are split into about `threads` pieces (whole pages, at least `MIN_PIECE`), which the threads
    take together: one expert read alone keeps as many reads in flight as several would, so a layer's single miss
    reads at the disk's bandwidth at that depth (what bench/offload_speed.py's bound assumes), not at one read's."""

    MIN_PIECE = 128 << 10

    def __init__(self, module: ModuleType, reader: DirectReader, threads: int):
        self.engine = module.ReadEngine(threads)
        self.reader = reader
        self.threads = threads
        self._pieces: dict[int, tuple] = {}  # id(layout) -> (layout, (reader, its fallbacks) then, pieces with
        # their buffer offset, owners): `submit` runs once per miss, on the model's thread, before the disk can start
        self._bases: dict[int, tuple[memoryview, int]] = {}  # id(arena buffer) -> (buffer, address): kept for good

    def submit(self, spec: ExpertSpec, lay: Layout, on_error: Callable[[OSError], Exception]) -> NativeRead:
        """Queue an expert's reads; `on_error` turns a failed read's OSError into the error its result raises."""
        seg = self.reader.buffer(lay.size)
        base = self._base(seg.buffer)
        _, _, pieces, owners = self._plan(lay)
        try:
            job = self.engine.submit([(fd, off, n, need, base + at, direct) for fd, off, n, need, at, direct in pieces])
        except BaseException:
            seg.release()
            raise
        return NativeRead(self, job, spec, lay, seg, on_error, owners)

    def gather(self, spec: ExpertSpec, plan: Gather, on_error: Callable[[OSError], Exception]) -> GatherRead:
        """Queue a gather: the reads into a bounce buffer of the engine's, the copies into a new slot, both on the
        native threads."""
        slot, weights = plan.weights(spec)
        base = slot.data_ptr()
        _, _, pieces, owners = self._plan(plan.bounce)
        job = self.engine.submit(pieces, plan.bounce.size, [(src, base + dst, n) for src, dst, n in plan.copies])
        return GatherRead(self, job, spec, plan, slot, weights, on_error, owners)

    def _plan(self, lay: Layout) -> tuple:
        """A layout's pieces (fd, file offset, bytes, bytes needed, offset in the buffer, direct), made again when
        its descriptors may have changed: another reader, or a file fallen back to page-cache reads since."""
        plan, files = self._pieces.get(id(lay)), (self.reader, len(self.reader.fallbacks))
        if plan is not None and plan[0] is lay and plan[1][0] is files[0] and plan[1][1] == files[1]:
            return plan
        pieces, owners = [], []  # owners: (read of the layout, byte offset in it) of each piece
        chunk = max(align_up(-(-sum(n for _, _, n, _ in lay.reads) // self.threads)), self.MIN_PIECE)
        for i, (f, off, n, at) in enumerate(lay.reads):
            fd, direct = self.reader.descriptor(f)
            for start in range(0, n, chunk):
                length = min(chunk, align_up(n) - start)
                pieces.append((fd, off + start, length, min(length, n - start), at + start, direct))
                owners.append((i, start))
        plan = self._pieces[id(lay)] = (lay, files, pieces, tuple(owners))
        return plan

    def _base(self, buf) -> int:
        """The address of a pooled buffer; an arena's buffers live as long as the pool, so theirs is kept."""
        known = self._bases.get(id(buf))
        if known is not None and known[0] is buf:
            return known[1]
        base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
        if isinstance(buf, memoryview):
            self._bases[id(buf)] = (buf, base)
        return base

    def close(self) -> None:
        """Finish the running reads and drop the queued ones (their buffers are then free)."""
        self.engine.close()


class NativeRead:
    """One expert's read on the engine, with the `Future` methods the store uses. Its result is (weights, bytes
    read, seconds), as `TieredStore._load` returns; it is made on the first call that needs it, on that thread."""

    __slots__ = ("reads", "job", "spec", "lay", "seg", "on_error", "owners", "_value", "_error", "_cancelled",
                 "_landed")

    def __init__(self, reads: ExpertReads, job: int, spec: ExpertSpec, lay: Layout, seg: Segment,
                 on_error: Callable[[OSError], Exception], owners: tuple[tuple[int, int], ...]):
        self.reads, self.job, self.spec, self.lay, self.seg, self.on_error = reads, job, spec, lay, seg, on_error
        self.owners = owners  # (read of the layout, byte offset in it) of each piece of the job
        self._value: tuple[ExpertWeights, int, float] | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._landed = False  # the engine said it finished: no need to ask (or wait) again

    def _settled(self) -> bool:
        return self._value is not None or self._error is not None or self._cancelled

    def done(self) -> bool:
        if not self._landed and not self._settled():
            self._landed = self.reads.engine.done(self.job)
        return self._landed or self._settled()

    def cancel(self) -> bool:
        """Drop the read if it has not started (its buffer goes back to the pool); False once it has."""
        if not self._cancelled and (self._settled() or not self.reads.engine.cancel(self.job)):
            return False
        self._cancelled = True
        self._free()
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def exception(self) -> BaseException | None:
        self._settle()
        return self._error

    def result(self) -> tuple[ExpertWeights, int, float]:
        self._settle()
        if self._error is not None:
            raise self._error
        return self._value

    def wait(self) -> None:
        """Block (without the interpreter lock) until the read has finished."""
        if not self._landed and not self._settled():
            self.reads.engine.wait_any([self.job])
            self._landed = True

    def _settle(self) -> None:
        if self._settled():
            return
        self.wait()
        error, piece, got, nbytes, seconds = self.reads.engine.take(self.job)
        try:
            if error == errno.EINVAL:
                self._read_in_python()  # O_DIRECT refused at read time: page-cache reads
            elif error:
                read, start = self.owners[piece]
                f, off, n, _ = self.lay.reads[read]
                raise (ShortReadError(os.fspath(f), off, n, start + got) if error < 0 else
                       OSError(error, os.strerror(error), os.fspath(f)))
            self._value = self._weights(), nbytes, seconds
        except OSError as err:
            self._error = self.on_error(err)
        finally:
            self._free()

    def _read_in_python(self) -> None:
        read_pages(self.reads.reader, self.lay, self.seg)

    def _weights(self) -> ExpertWeights:
        return in_place_weights(self.spec, self.lay, self.seg)

    def _free(self) -> None:
        self.seg.release()  # nothing left to release once handed over to the weights


class GatherRead(NativeRead):
    """A gather on the engine: its slot, filled by the native thread that finished its reads, is the weights."""

    __slots__ = ("plan", "slot", "weights")

    def __init__(self, reads: ExpertReads, job: int, spec: ExpertSpec, plan: Gather, slot: torch.Tensor,
                 weights: ExpertWeights, on_error: Callable[[OSError], Exception], owners: tuple[tuple[int, int], ...]):
        super().__init__(reads, job, spec, plan.bounce, None, on_error, owners)
        self.plan, self.slot, self.weights = plan, slot, weights

    def _read_in_python(self) -> None:
        """The reads and copies the engine would have done, on this thread."""
        seg = self.reads.reader.buffer(self.lay.size)
        try:
            read_pages(self.reads.reader, self.lay, seg)
            out = self.slot.view(-1).view(torch.uint8).numpy()
            for src, dst, n in self.plan.copies:
                out[dst:dst + n] = seg.as_tensor()[src:src + n].numpy()
        finally:
            seg.release()

    def _weights(self) -> ExpertWeights:
        return self.weights

    def _free(self) -> None:
        self.slot = self.weights = None  # the weights live on in the result, if any


def first_landed(reads: Collection) -> list:
    """The reads that have finished, blocking until one has: futures, or `NativeRead`s beside futures already done
    (a read refused before it started)."""
    done = [r for r in reads if r.done()]
    if done:
        return done
    native = [r for r in reads if isinstance(r, NativeRead)]
    if not native:
        return list(wait(reads, return_when=FIRST_COMPLETED).done)
    job = native[0].reads.engine.wait_any([r.job for r in native])
    for r in native:
        if r.job == job:
            r._landed = True
    return [r for r in native if r.done()]


def settle(read: Future | NativeRead) -> None:
    """Block until a read has finished."""
    if isinstance(read, NativeRead):
        read.wait()
    else:
        wait([read])
