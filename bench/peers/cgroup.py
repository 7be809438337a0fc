"""A memory cgroup for one engine run: limit, join, peak usage, OOM kills, bytes read; v1 or v2.

Under v1 the group is made inside the cgroup this process already runs in, so any limit set above it still
applies, and the limit is memory.limit_in_bytes (page cache included). Under v2 it is made at the top of the
hierarchy (v2 lets no group with processes in it, like a login session's, hand the memory controller to children),
with memory.max, memory.peak, memory.events and io.stat. v1's blkio.throttle.io_service_bytes stays 0 on recent
kernels without a throttle rule, so under v1 bytes read come from the process's /proc/PID/io (bench.peers.process).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


@dataclass
class GroupStats:
    peak_bytes: int  # memory.max_usage_in_bytes (v1) / memory.peak (v2): RSS + page cache + kernel memory
    oom_kills: int  # processes the kernel killed for this group's limit
    read_bytes: int | None  # block-device bytes read by the group (v2 io.stat; None under v1)
    cache_bytes: int  # page cache charged to the group now (it stays charged after its processes exit)


def _own_v1_path() -> str:
    """This process's group in the v1 memory hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if "memory" in names.split(","):
            return path.lstrip("/")
    return ""


def _parent(v: int) -> Path:
    return ROOT / "memory" / _own_v1_path() if v == 1 else ROOT


def version() -> int | None:
    """1 or 2 for the memory controller's hierarchy, None if there is none."""
    if (ROOT / "memory" / "memory.limit_in_bytes").exists():
        return 1
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    return None


def unavailable() -> str | None:
    """Why memory-limited runs cannot happen here, or None if they can."""
    v = version()
    if v is None:
        return "no cgroup memory controller is mounted under /sys/fs/cgroup"
    parent = _parent(v)
    if not os.access(parent, os.W_OK):
        return f"cannot create a cgroup in {parent} (not root?)"
    if v == 2:
        _write(parent / "cgroup.subtree_control", "+memory", ok_fail=True)
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            return f"the memory controller cannot be enabled for children of {parent}"
    return None


class MemoryGroup:
    """`with MemoryGroup(name, limit) as g:` start processes with preexec_fn=g.join, then read g.stats()."""

    def __init__(self, name: str, limit: int | None):
        self.version = version()
        self.limit = limit
        self.mem = _parent(self.version) / name

    def __enter__(self) -> MemoryGroup:
        if self.version == 2:
            _write(self.mem.parent / "cgroup.subtree_control", "+memory +io", ok_fail=True)
        self.mem.mkdir(exist_ok=True)
        if self.limit is not None:
            _write(self.mem / ("memory.limit_in_bytes" if self.version == 1 else "memory.max"), str(self.limit))
        if self.version == 2:
            _write(self.mem / "memory.swap.max", "0", ok_fail=True)
        return self

    def join(self) -> None:
        """Move the calling process into the group (use as subprocess preexec_fn: the child joins before exec)."""
        _write(self.mem / "cgroup.procs", str(os.getpid()))

    def stats(self) -> GroupStats:
        if self.version == 1:
            peak = int((self.mem / "memory.max_usage_in_bytes").read_text())
            ooms = _keyed(self.mem / "memory.oom_control").get("oom_kill", 0)
            reads = None
            cache = _keyed(self.mem / "memory.stat").get("total_cache", 0)
        else:
            peak_file = self.mem / "memory.peak"
            peak = int(peak_file.read_text()) if peak_file.exists() else int((self.mem / "memory.current").read_text())
            ooms = _keyed(self.mem / "memory.events").get("oom_kill", 0)
            reads = _v2_read_bytes(self.mem / "io.stat")
            cache = _keyed(self.mem / "memory.stat").get("file", 0)
        return GroupStats(peak, ooms, reads, cache)

    def __exit__(self, *exc) -> None:
        if not self.mem.exists():
            return
        if self.version == 1:
            _write(self.mem / "memory.force_empty", "0", ok_fail=True)  # give its page cache back before removal
        for _ in range(50):  # a killed process may take a moment to leave
            try:
                self.mem.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _write(path: Path, value: str, ok_fail: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not ok_fail:
            raise


def _keyed(path: Path) -> dict[str, int]:
    """'key value' lines as a dict."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _v2_read_bytes(path: Path) -> int | None:
    if not path.exists():
        return None
    return sum(int(kv.split("=")[1]) for line in path.read_text().splitlines()
               for kv in line.split()[1:] if kv.startswith("rbytes="))
