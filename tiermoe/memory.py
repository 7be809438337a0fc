"""Memory accounting: what the process uses, what limit it runs under, and how a limit splits into a fixed footprint
and the expert cache.

A memory limit (`memory_limit="650MB"`, or "auto": the process's cgroup limit, else the RAM available) is split
after the non-expert weights and the tokenizer are loaded, from what the process then measurably uses plus what it
will still allocate whatever the expert budget: the KV cache of `max_model_len` tokens, the activations of one
forward of `max_num_batched_tokens` tokens, the read buffers beyond the expert budget (none when the reads land in
place), and a margin. The rest is the expert cache. Inside a cgroup whose limit is the binding one, "uses" is the
group's working set (charged memory less inactive page cache, which the kernel reclaims before it kills); elsewhere
the process's RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tiermoe.errors import ConfigError
from tiermoe.offload.tiers.budget import format_bytes, parse_budget

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1
MMAP_THRESHOLD = 1 << 20  # glibc: allocations from 1 MiB up get their own mapping, unmapped on free
MARGIN_FRACTION = 0.04  # of the limit, at least MARGIN_MIN: allocator slack, thread stacks, Python objects
MARGIN_MIN = 16 << 20
ACTIVATION_TOKENS = 512  # max_num_batched_tokens under a memory limit unless set


def tune_malloc() -> bool:
    """Make glibc return large freed blocks to the OS at once. By default its mmap threshold rises to the largest
    block freed (up to 32 MiB), after which expert-sized temporaries come from per-thread arenas that keep the memory
    once freed: the process grows past its budget. False where there is no glibc."""
    path = ctypes.util.find_library("c")
    if not path or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(path)
    if not hasattr(libc, "mallopt"):
        return False
    m_mmap_threshold, m_arena_max = -3, -8
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_arena_max, 2))


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    """Resident set of this process (anonymous, file-backed and shared memory), bytes."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup this process runs in."""

    path: Path
    version: int

    @classmethod
    def own(cls) -> Cgroup | None:
        """This process's memory cgroup (v1 memory controller, else v2), or None when none is mounted."""
        lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        for _, controllers, rel in lines:
            if "memory" in controllers.split(","):
                return cls._at(CGROUP_ROOT / "memory", rel, 1)
        for hierarchy, _, rel in lines:
            if hierarchy == "0" and (CGROUP_ROOT / "cgroup.controllers").exists():
                return cls._at(CGROUP_ROOT, rel, 2)
        return None

    @classmethod
    def _at(cls, mount: Path, rel: str, version: int) -> Cgroup | None:
        path = mount / rel.lstrip("/")
        if not path.is_dir():  # a cgroup namespace: the mount is our own group
            path = mount
        return cls(path, version) if path.is_dir() else None

    def limit(self) -> int | None:
        """The smallest memory limit on this group and its ancestors; None when there is none."""
        if self.version == 1:
            limit = _keyed(self.path / "memory.stat").get("hierarchical_memory_limit")
            if limit is None:
                limit = int((self.path / "memory.limit_in_bytes").read_text())
            return limit if limit < UNLIMITED else None
        limits = []
        for p in [self.path, *self.path.parents]:
            f = p / "memory.max"
            if f.exists() and (text := f.read_text().strip()) != "max":
                limits.append(int(text))
            if p == CGROUP_ROOT:
                break
        return min(limits) if limits else None

    def working_set(self) -> int:
        """Memory charged to the group less its inactive page cache (what the limit cannot reclaim easily)."""
        stat = _keyed(self.path / "memory.stat")
        if self.version == 1:
            usage = int((self.path / "memory.usage_in_bytes").read_text())
            return usage - stat.get("total_inactive_file", 0)
        return int((self.path / "memory.current").read_text()) - stat.get("inactive_file", 0)


def _keyed(path: Path) -> dict[str, int]:
    """'key value' lines as a dict."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def available_ram() -> int:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class Usage:
    """What the process uses now against a limit, and how that was measured."""

    limit: int
    source: str  # where the limit comes from: "memory_limit", "cgroup", "available RAM"
    used: int
    measured: str  # "cgroup working set" or "RSS"

    @classmethod
    def of(cls, requested: str | int) -> Usage:
        """The limit to size to: `requested` (bytes, "650MB", or "auto"), capped by the cgroup's limit."""
        group = Cgroup.own() if Path("/proc/self/cgroup").exists() else None
        group_limit = group.limit() if group else None
        if requested == "auto":
            if group_limit is not None:
                return cls(group_limit, "cgroup", group.working_set(), "cgroup working set")
            return cls(rss() + available_ram(), "available RAM", rss(), "RSS")
        limit = parse_budget(requested, 0)
        if group_limit is not None and group_limit <= limit:
            return cls(group_limit, "cgroup" if group_limit < limit else "memory_limit", group.working_set(),
                       "cgroup working set")
        return cls(limit, "memory_limit", rss(), "RSS")

    @classmethod
    def default(cls, model_bytes: Callable[[], int]) -> Usage | None:
        """Without a limit or budget given: the cgroup's limit when the model (`model_bytes()`, asked only under a
        cgroup limit) cannot stay resident under it."""
        usage = cls.of("auto")
        if usage.source != "cgroup" or usage.used + model_bytes() + margin_of(usage.limit) <= usage.limit:
            return None
        return usage

    def now(self) -> int:
        """Current use, measured the same way."""
        group = Cgroup.own() if self.measured == "cgroup working set" else None
        return group.working_set() if group else rss()


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory limit is split; every field in bytes."""

    limit: int
    limit_source: str
    measured: str  # how `runtime` + `weights` were measured
    runtime: int  # interpreter, torch, tokenizer, model skeleton: measured use less the weights
    weights: int  # non-expert weights resident (the token embedding excluded when it stays on disk)
    kv_cache: int  # max_model_len tokens
    activations: int  # one forward of max_num_batched_tokens tokens
    read_buffers: int  # expert read buffers beyond the budget (read_reserve_bytes), one per I/O thread
    margin: int
    experts: int  # what is left: the expert cache
    kv_tokens: int
    batched_tokens: int
    io_threads: int
    embedding_on_disk: bool

    @property
    def fixed(self) -> int:
        return self.runtime + self.weights + self.kv_cache + self.activations + self.read_buffers + self.margin

    def to_dict(self) -> dict:
        return asdict(self) | {"fixed": self.fixed}

    def describe_fixed(self) -> str:
        mib = format_bytes
        return (f"runtime {mib(self.runtime)}, non-expert weights {mib(self.weights)}"
                f"{' (token embedding on disk)' if self.embedding_on_disk else ''}, KV cache {mib(self.kv_cache)} "
                f"({self.kv_tokens} tokens), activations {mib(self.activations)} ({self.batched_tokens} tokens per "
                f"forward), read buffers {mib(self.read_buffers)} ({self.io_threads} I/O threads), margin "
                f"{mib(self.margin)}")

    def describe(self) -> str:
        return (f"memory limit {format_bytes(self.limit)} ({self.limit_source}; use measured as {self.measured}): "
                f"{self.describe_fixed()} -> expert cache {format_bytes(self.experts)}")


def margin_of(limit: int) -> int:
    return max(MARGIN_MIN, int(limit * MARGIN_FRACTION))


def minimum_limit(rest: int, min_experts: int) -> int:
    """The smallest limit L with L - margin_of(L) - rest >= min_experts."""
    need = rest + min_experts
    if margin_of(need + MARGIN_MIN) == MARGIN_MIN:
        return need + MARGIN_MIN
    limit = int(need / (1 - MARGIN_FRACTION))
    while limit - margin_of(limit) < need:
        limit += 1
    return limit


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token adds, measured: every attention layer run on one zero row into a fresh cache."""
    from tiermoe.decode.kv_cache import KVCache
    from tiermoe.models.layers import ForwardBatch, SeqSlice

    cache = KVCache(1)
    dtype = model.dtype
    batch = ForwardBatch(torch.zeros(1, dtype=torch.long), [SeqSlice(cache, 0, 1, 0)])
    x = torch.zeros(1, model.shape.hidden_size, dtype=dtype)
    cos, sin = model.rotary.cos_sin(batch, dtype)
    with torch.inference_mode():
        for layer in model.model.layers:
            layer.self_attn(x, cos, sin, batch)
    return cache.nbytes


def activation_bytes(model, tokens: int, expert_inner: int) -> int:
    """An upper estimate of one forward's live activations over `tokens` tokens: per token, a dozen hidden-size rows
    in fp32 (residual, norms, attention projections), an expert's gate/up/act rows, the router's scores; plus the
    sampled rows' fp32 logits and torch's scratch for one expert matmul."""
    s = model.shape
    per_token = (12 * s.hidden_size + 3 * expert_inner + 2 * s.num_experts) * 4
    return tokens * per_token + 2 * s.vocab_size * 4 + 2 * expert_inner * s.hidden_size


def plan(usage: Usage, runtime_and_weights: int, weights: int, kv_per_token: int, kv_tokens: int, activations: int,
         batched_tokens: int, read_buffer: int, io_threads: int, min_experts: int,
         embedding_on_disk: bool) -> MemoryPlan:
    """Split `usage.limit`; refuses a limit that cannot hold the fixed footprint plus `min_experts`."""
    p = MemoryPlan(usage.limit, usage.source, usage.measured, runtime_and_weights - weights, weights,
                   kv_per_token * kv_tokens, activations, read_buffer * io_threads, margin_of(usage.limit), 0,
                   kv_tokens, batched_tokens, io_threads, embedding_on_disk)
    experts = usage.limit - p.fixed
    if experts < min_experts:
        least = minimum_limit(p.fixed - p.margin, min_experts)
        raise ConfigError(f"memory_limit {format_bytes(usage.limit)} ({usage.limit} bytes, {usage.source}) is too "
                          f"small: the fixed footprint is {format_bytes(p.fixed)} ({p.describe_fixed()}) and the "
                          f"experts one token needs take {format_bytes(min_experts)}; the minimum is "
                          f"{format_bytes(least)} ({least} bytes), less with a smaller max_model_len or "
                          "max_num_batched_tokens")
    return MemoryPlan(**{**asdict(p), "experts": experts})


def read_buffer_bytes(index, dtype: torch.dtype) -> int:
    """The most one expert read holds: its page-rounded read buffer (kept by the reader's pool for the next read),
    and the concatenated gate/up rows when the checkpoint's dtype is not the dtype its weights are kept in (converted
    afterwards)."""
    from tiermoe.kernels import weight_dtype
    from tiermoe.offload.tiers.direct_io import PAGE

    worst = 0
    for spec in index.experts().values():
        converted = spec.nbytes if spec.gate.dtype != weight_dtype(spec.gate.dtype, dtype) else 0
        worst = max(worst, spec.nbytes + 2 * PAGE * len(spec.parts) + converted)
    return worst


def read_reserve_bytes(index, dtype: torch.dtype) -> int:
    """What each I/O thread's reads hold beyond the expert budget. Nothing when every expert is read in place into
    buffers of one size: each buffer in use is then a cached or streamed expert, counted in the budget, and one an
    eviction frees waits idle in the pool for the read that takes its room, so the pool never holds more buffers
    than the budget held experts at once. Otherwise an idle read buffer (read_buffer_bytes) beside the converted
    weights."""
    from tiermoe.offload.tiers.expert_reads import in_place, slot_nbytes

    specs = index.experts().values()
    if all(in_place(s, dtype) for s in specs) and len({slot_nbytes(s, dtype) for s in specs}) == 1:
        return 0
    return read_buffer_bytes(index, dtype)


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage once (tied weights share one)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta" and (key := t.untyped_storage().data_ptr()) not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
