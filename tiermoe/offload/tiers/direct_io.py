"""Aligned direct-I/O reads of byte ranges (expert tensors) from files on the SSD tier.

`O_DIRECT` bypasses the page cache, so the RAM that expert reads use is the RAM our budget accounts for (and a
cold read is cold). It requires the file offset, the length and the buffer address to be block aligned; safetensors
tensors start at arbitrary offsets, so a read rounds its range out to 4 KiB pages into a page-aligned anonymous
`mmap` buffer and hands back a view of exactly the requested bytes.

What a read returns is a `Segment`: `segment.view` is a writable memoryview of the requested bytes inside the
buffer, and `segment.as_tensor(dtype, shape)` is `torch.frombuffer` over it: a tensor of any dtype and shape sharing
the buffer's memory, no copy. The buffer lives as long as any view or tensor over it; `segment.release()` returns it
to the reader's pool for reuse, after which its contents will be overwritten, so release only once every tensor
built on it is dead or copied (e.g. after converting to the compute dtype), or `segment.hand_over()` it to those
tensors: the buffer then returns to the pool by itself once the last of them is gone.

Filesystems that refuse `O_DIRECT` (EINVAL on open or on the first read: tmpfs on older kernels, some FUSE and
network filesystems) are read through the page cache instead; `DirectReader.fallbacks` records which files and why.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

PAGE = 4096  # alignment of offsets, lengths and buffers: the largest logical block size of common SSDs

# Linux transfers at most this many bytes per read call (0x7ffff000); longer ranges are read in several calls.
_MAX_CALL = 0x7FFFF000 & ~(PAGE - 1)


class ShortReadError(OSError):
    """The file ended (or a read returned nothing) before the whole requested range was read."""

    def __init__(self, path: str, offset: int, nbytes: int, got: int):
        got = max(got, 0)
        super().__init__(errno.EIO, f"short read of {path}: wanted bytes [{offset}, {offset + nbytes}) "
                                    f"({nbytes} bytes) but got {got} (file truncated?)", path)
        self.offset, self.nbytes, self.got = offset, nbytes, got


def align_down(n: int) -> int:
    return n & ~(PAGE - 1)


def align_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


Buffer = mmap.mmap | memoryview  # a buffer of its own, or one of an arena's


class BufferPool:
    """Page-aligned anonymous mmap buffers, recycled by exact (page-rounded) size.

    Expert reads of one model come in few distinct sizes, so exact-size free lists reuse well without the up to 2x
    waste of power-of-two classes. At most `max_bytes` are kept idle; the rest are left to the garbage collector.

    An arena (`reserve`) maps many buffers of one size at once, kept for the pool's life and handed out before
    any buffer is mapped anew: a cache that fills maps nothing per read (each mmap call, and the munmap of a buffer
    let go, waits for the address-space lock that reads into other buffers hold while they pin their pages).
    """

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.idle_bytes = 0  # kept for reuse, outside the arena
        self.in_use = 0  # buffers handed out and not released yet (a leak shows here)
        self.live_bytes = 0  # every buffer not unmapped yet: in use or idle, the arena's too
        self.peak_bytes = 0  # the most live_bytes so far
        self.arena_bytes = 0  # mapped by `reserve`
        self._free: dict[int, list[Buffer]] = {}
        self._arena: dict[int, list[memoryview]] = {}  # size -> the arena's idle buffers of that size
        self._lock = threading.Lock()
        self._owners: dict[int, weakref.ref] = {}  # `release_with`'s watches by id (a view has no hash), alive
        # until their owner goes

    def reserve(self, nbytes: int, count: int) -> None:
        """Maps `count` buffers of `align_up(nbytes)` bytes as one region (pages are only touched by their reads)."""
        size = max(align_up(nbytes), PAGE)
        if count < 1:
            return
        region = memoryview(mmap.mmap(-1, size * count, flags=mmap.MAP_PRIVATE))
        with self._lock:
            self._arena.setdefault(size, []).extend(region[i * size:(i + 1) * size] for i in range(count))
            self.arena_bytes += size * count
            self.live_bytes += size * count
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def acquire(self, nbytes: int) -> Buffer:
        """A buffer of `align_up(nbytes)` bytes whose address is page aligned (mmap always is): an idle one of the
        arena, else of the pool, else a new mapping."""
        size = max(align_up(nbytes), PAGE)
        with self._lock:
            self.in_use += 1
            arena = self._arena.get(size)
            if arena:
                return arena.pop()
            free = self._free.get(size)
            if free:
                self.idle_bytes -= size
                return free.pop()
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        # private, not shared, anonymous memory: counted as the process's own (RssAnon), freed at unmap
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)

    def release_with(self, owner: object, buf: Buffer) -> None:
        """Takes a buffer back once `owner` (which holds every view of it) is gone. A weak reference with a callback,
        not `weakref.finalize`: this runs for every expert read, on the model's thread, where finalize's bookkeeping
        cost several times as much."""
        owners = self._owners

        def gone(ref: weakref.ref) -> None:
            del owners[id(ref)]
            self.release(buf)

        ref = weakref.ref(owner, gone)
        owners[id(ref)] = ref

    def release(self, buf: Buffer) -> None:
        """Takes a buffer back (the caller must hold no view of it any more)."""
        with self._lock:
            self.in_use -= 1
            if isinstance(buf, memoryview):  # the arena's: kept whatever max_bytes says
                self._arena[len(buf)].append(buf)
            elif self.idle_bytes + len(buf) <= self.max_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self.idle_bytes += len(buf)
            else:
                self.live_bytes -= len(buf)  # unmapped once the caller's last reference goes


@dataclass(eq=False)
class Segment:
    """The bytes [offset, offset + nbytes) of a file, held in a page-aligned buffer."""

    path: str
    offset: int
    nbytes: int
    view: memoryview  # exactly the requested bytes, writable, inside `buffer`
    buffer: Buffer | None = field(repr=False)
    _pool: BufferPool | None = field(default=None, repr=False)

    def as_tensor(self, dtype: Any = None, shape: Sequence[int] | None = None) -> Any:
        """A torch tensor over the bytes (uint8 by default), sharing the buffer's memory: no copy.

        `dtype`'s item size must divide `nbytes`; `shape` defaults to 1-D.
        """
        import torch

        t = torch.frombuffer(self.view, dtype=dtype or torch.uint8)
        return t if shape is None else t.view(tuple(shape))

    def release(self) -> None:
        """Returns the buffer to the reader's pool; this segment's view and tensors must no longer be used."""
        if self.buffer is None:
            return
        # NOTE: the view is dropped, never `.release()`d: a tensor from `as_tensor` points into the buffer while
        # only holding a reference to the view, so the view must keep the mmap mapped for as long as it lives.
        buf, pool = self.buffer, self._pool
        self.view = memoryview(b"")
        self.buffer = None
        if pool is not None:
            pool.release(buf)

    def hand_over(self) -> None:
        """Gives the buffer to the tensors made by `as_tensor`: it returns to the pool once the last of them is gone
        (at once if there are none), rather than on `release`. The segment itself must no longer be used."""
        if self.buffer is None:
            return
        view, buf, pool = self.view, self.buffer, self._pool
        self.view = memoryview(b"")
        self.buffer = None
        if pool is not None:
            # `as_tensor` tensors hold this very view object: it dies with the last of them.
            pool.release_with(view, buf)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _OpenFile:
    fd: int
    direct: bool


class DirectReader:
    """Reads byte ranges of files with O_DIRECT into pooled page-aligned buffers, in parallel if asked.

    `direct=False` forces page-cache reads everywhere (e.g. to compare with warm buffered reads). File descriptors
    stay open until `close()`; the reader is a context manager.
    """

    def __init__(self, max_workers: int = 4, pool: BufferPool | None = None, direct: bool = True):
        self.max_workers = max_workers
        self.pool = pool or BufferPool()
        self.direct = direct
        self.fallbacks: dict[str, str] = {}  # path -> why it is read through the page cache
        self._files: dict[str, _OpenFile] = {}
        self._retired: list[int] = []  # descriptors replaced by a fallback, closed with the reader
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    # --- files ---------------------------------------------------------------------------------------------------

    def is_direct(self, path: str | os.PathLike) -> bool:
        """Whether reads of `path` bypass the page cache (opens the file if needed)."""
        return self._file(os.fspath(path)).direct

    def descriptor(self, path: str | os.PathLike) -> tuple[int, bool]:
        """(file descriptor, opened with O_DIRECT) of `path`, opened if needed, for reads made outside the reader
        (tiers/native_reads.py); it stays open until `close()`."""
        f = self._file(os.fspath(path))
        return f.fd, f.direct

    def _file(self, path: str) -> _OpenFile:
        f = self._files.get(path)
        if f is None:
            with self._lock:
                f = self._files.get(path)
                if f is None:
                    f = self._files[path] = self._open(path)
        return f

    def _open(self, path: str) -> _OpenFile:
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                return _OpenFile(os.open(path, os.O_RDONLY | os.O_DIRECT), True)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.fallbacks[path] = "the filesystem refuses O_DIRECT (EINVAL on open)"
        elif self.direct:
            self.fallbacks[path] = "O_DIRECT is not available on this platform"
        return _OpenFile(os.open(path, os.O_RDONLY), False)

    def _reopen_buffered(self, path: str, reason: str) -> _OpenFile:
        with self._lock:
            old = self._files[path]
            if old.direct:
                self.fallbacks[path] = reason
                self._files[path] = _OpenFile(os.open(path, os.O_RDONLY), False)
                # Other threads may still be reading on the old descriptor: close it only in close().
                self._retired.append(old.fd)
            return self._files[path]

    # --- reads -----------------------------------------------------------------------------------------------------

    def read(self, path: str | os.PathLike, offset: int, nbytes: int) -> Segment:
        """Bytes [offset, offset + nbytes) of `path`; raises ShortReadError if the file ends before them."""
        path = os.fspath(path)
        if offset < 0 or nbytes < 0:
            raise ValueError(f"bad range of {path}: offset {offset}, nbytes {nbytes}")
        start = align_down(offset)
        end = align_up(offset + nbytes)
        buf = self.pool.acquire(end - start)
        try:
            got = self._read_into(path, buf, start, end - start)
        except BaseException:
            self.pool.release(buf)
            raise
        if got < offset + nbytes - start:
            self.pool.release(buf)
            raise ShortReadError(path, offset, nbytes, got - (offset - start))
        view = memoryview(buf)[offset - start:offset - start + nbytes]
        return Segment(path, offset, nbytes, view, buf, self.pool)

    def buffer(self, nbytes: int) -> Segment:
        """A pooled page-aligned buffer of `nbytes` (rounded up to pages) as a Segment of no file, for
        `read_pages` to fill; released or handed over like any segment."""
        buf = self.pool.acquire(nbytes)
        return Segment("", 0, len(buf), memoryview(buf), buf, self.pool)

    def read_pages(self, path: str | os.PathLike, offset: int, nbytes: int, into: Segment, at: int) -> None:
        """Reads bytes [offset, offset + nbytes) of `path` into `into`'s buffer from byte `at` on, in whole pages
        (`offset` and `at` page aligned; up to a page past the range is overwritten); ShortReadError if the file
        ends first."""
        path = os.fspath(path)
        if offset % PAGE or at % PAGE or at + align_up(nbytes) > len(into.buffer):
            raise ValueError(f"unaligned or oversized page read of {path}: offset {offset}, {nbytes} bytes at {at}")
        got = self._read_into(path, into.buffer, offset, align_up(nbytes), at)
        if got < nbytes:
            raise ShortReadError(path, offset, nbytes, got)

    def _read_into(self, path: str, buf: Buffer, start: int, length: int, at: int = 0) -> int:
        """Fills buf[at:at + length] from file offset `start` (all page aligned); returns the bytes read (less at
        EOF)."""
        f = self._file(path)
        try:
            return _pread_full(f.fd, buf, start, length, f.direct, at)
        except OSError as e:
            if not (f.direct and e.errno == errno.EINVAL):
                raise
        # Some filesystems accept O_DIRECT at open and refuse it at read time.
        f = self._reopen_buffered(path, "the filesystem refuses O_DIRECT reads (EINVAL on read)")
        return _pread_full(f.fd, buf, start, length, f.direct, at)

    def read_many(self, ranges: Iterable[tuple[str | os.PathLike, int, int]]) -> list[Segment]:
        """Reads `(path, offset, nbytes)` ranges in parallel on the reader's threads; results in input order.

        If any read fails, the segments already read are released and the first error is raised.
        """
        ranges = list(ranges)
        if len(ranges) <= 1 or self.max_workers <= 1:
            return [self.read(*r) for r in ranges]
        futures = [self._pool_executor().submit(self.read, *r) for r in ranges]
        out, error = [], None
        for fut in futures:
            try:
                out.append(fut.result())
            except Exception as e:  # keep collecting so no buffer leaks out of the pool
                error = error or e
        if error is not None:
            for seg in out:
                seg.release()
            raise error
        return out

    def _pool_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="direct-read")
        return self._executor

    def close(self) -> None:
        """Stops the threads and closes the files."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        with self._lock:
            for fd in [f.fd for f in self._files.values()] + self._retired:
                os.close(fd)
            self._files.clear()
            self._retired.clear()

    def __enter__(self) -> DirectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_full(fd: int, buf: Buffer, start: int, length: int, direct: bool, at: int = 0) -> int:
    """preadv into buf[at:] until `length` bytes are in, the file ends, or (direct) a read ends off a page boundary
    (= EOF)."""
    base = memoryview(buf)
    view = base[at:]
    done = 0
    try:
        while done < length:
            n = os.preadv(fd, [view[done:done + min(length - done, _MAX_CALL)]], start + done)
            if n <= 0:
                break
            done += n
            if direct and done % PAGE:  # O_DIRECT returns a partial block only at the end of the file
                break
    finally:
        view.release()
        base.release()
    return done


def drop_page_cache(path: str | os.PathLike) -> None:
    """Evicts `path`'s pages from the page cache (for cold-cache measurements); dirty pages are written first."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED skips dirty pages, so flush them first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
