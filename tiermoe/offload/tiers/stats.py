"""Per-run expert-store statistics, per MoE layer and in total."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class LayerStats:
    hits: int = 0  # requested experts that were resident
    misses: int = 0  # requested experts read from the backing tier
    bytes_read: int = 0
    read_time: float = 0.0  # seconds spent in reads, summed over I/O threads
    stall_time: float = 0.0  # seconds the model waited for an expert to arrive

    def add(self, other: LayerStats) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.bytes_read += other.bytes_read
        self.read_time += other.read_time
        self.stall_time += other.stall_time

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "bytes_read": self.bytes_read,
                "read_time_s": self.read_time, "stall_time_s": self.stall_time}


@dataclass(slots=True)
class StoreStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    evictions: int = 0
    prefetched: int = 0  # experts read ahead of their use
    streamed: int = 0  # misses read for their request only, never admitted (also counted in `misses`)

    def layer(self, layer: int) -> LayerStats:
        s = self.layers.get(layer)
        if s is None:
            s = self.layers[layer] = LayerStats()
        return s

    @property
    def total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            t.add(s)
        return t

    def to_dict(self) -> dict:
        return {"total": self.total.to_dict(), "evictions": self.evictions, "prefetched": self.prefetched,
                "streamed": self.streamed,
                "layers": {str(k): v.to_dict() for k, v in sorted(self.layers.items())}}

    def table(self) -> str:
        """A plain-text table for `tiermoe generate --stats`."""
        rows = [f"{'layer':>6} {'hits':>7} {'misses':>7} {'hit rate':>8} {'MiB read':>9} {'read s':>8} {'stall s':>8}"]
        for name, s in [*sorted(self.layers.items()), ("total", self.total)]:
            rows.append(f"{name!s:>6} {s.hits:>7} {s.misses:>7} {s.hit_rate:>8.3f} {s.bytes_read / 2**20:>9.1f} "
                        f"{s.read_time:>8.3f} {s.stall_time:>8.3f}")
        return "\n".join(rows)
