"""The cost model the tau solver predicts with: disk bandwidth for expert reads, and CPU / accelerator expert
throughput (`DeviceCosts`, see tiermoe.offload.tiers.accelerator). Profiled once per machine, device, disk and read
size, then cached as JSON under the user's cache dir (~/.cache/tiermoe/costs.json, or $XDG_CACHE_HOME/tiermoe).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tiermoe.offload.tiers.accelerator import profile_costs
from tiermoe.offload.tiers.direct_io import DirectReader, align_up
from tiermoe.offload.tiers.placement_rule import DeviceCosts

IO_DEPTH = 4  # reads in flight when profiling the disk: what the stores issue with their default 4 I/O threads


@dataclass(frozen=True, slots=True)
class TierCosts:
    """Throughputs of the tiers an expert moves between."""

    io_bandwidth: float  # bytes/s of direct, expert-sized reads from the disk holding the checkpoint
    device: DeviceCosts  # CPU streaming and FLOP/s, host -> accelerator copy bandwidth, accelerator FLOP/s

    def to_dict(self) -> dict:
        return {"io_bandwidth": self.io_bandwidth, "device": asdict(self.device)}

    @classmethod
    def from_dict(cls, d: dict) -> TierCosts:
        return cls(float(d["io_bandwidth"]), DeviceCosts(**d["device"]))


def cache_dir() -> Path:
    """Where tiermoe keeps what it measured on this machine: $XDG_CACHE_HOME/tiermoe, else ~/.cache/tiermoe."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tiermoe"


def cache_path() -> Path:
    return cache_dir() / "costs.json"


def costs_key(device: torch.device, probe: Path, read_bytes: int) -> str:
    """What the numbers depend on: the accelerator, the disk (st_dev of the checkpoint), the read size and depth."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{device.type}:{name}|dev={os.stat(probe).st_dev}|read={align_up(read_bytes) >> 10}KiB|qd={IO_DEPTH}"


def load_costs(device: torch.device, probe: Path, read_bytes: int, path: Path | None = None) -> TierCosts:
    """The cached costs for this device, disk and read size; profiled (about a second) and cached when missing."""
    path = path or cache_path()
    key = costs_key(device, probe, read_bytes)
    table = _read_table(path)
    if key in table:
        return TierCosts.from_dict(table[key])
    costs = TierCosts(io_bandwidth(probe, read_bytes), profile_costs(device))
    table[key] = {**costs.to_dict(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(path, table)
    return costs


def io_bandwidth(path: Path, read_bytes: int, threads: int = IO_DEPTH, total: int = 64 << 20) -> float:
    """Direct-read bytes/s of `read_bytes`-sized reads of `path`, `threads` in flight as the stores issue them
    (wrapping around a small file)."""
    size = os.stat(path).st_size
    chunk = max(min(read_bytes, size), 1)
    reads = min(max(2, total // chunk), 1024)
    return read_rate(path, [(i * chunk) % max(size - chunk + 1, 1) for i in range(reads)], chunk, threads)


def read_rate(path: Path, offsets: list[int], nbytes: int, depth: int) -> float:
    """Bytes/s of direct reads of `nbytes` at each of `offsets` of `path`, `depth` issued and waited for together."""
    with DirectReader(max_workers=depth) as reader:
        start = time.perf_counter()
        for i in range(0, len(offsets), depth):
            for seg in reader.read_many([(path, off, nbytes) for off in offsets[i:i + depth]]):
                seg.release()
        return len(offsets) * nbytes / (time.perf_counter() - start)


def _read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: profile again
        return {}
    return table if isinstance(table, dict) else {}


def write_json(path: Path, table: dict) -> None:
    """Write through a temporary file so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)
