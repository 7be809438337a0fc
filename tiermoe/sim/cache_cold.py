"""What makes the engine probe's measurements cache-cold, as a real model's decode is: a real model streams MiBs of
weights through the caches between the engine's small ops, and reads each layer's keys and values once per forward,
after the whole model's weights went through the caches (tiermoe.sim.engine_probe)."""

from __future__ import annotations

KV_RING_MIB = 128  # the cold attention's keys and values: a ring beyond the 32 MiB LLC of the machines measured
COLD_MIB = 8  # MiB a kernel call streams in the cold measurement: a layer's few products then exceed the LLC


class KVRing:
    """Keys and values [S, g, d] each, a different pair at each `next` from `ring` (larger than the caches), visited
    in order: every pair was last read a ring's bytes ago (measured: a live OLMoE-shaped decode's attention reads
    its cache in the time of such pairs, ~3x that of one pair read again and again)."""

    def __init__(self, ring, S: int, g: int, d: int):
        per = S * g * d
        self.pairs = [(ring[i:i + per].view(S, g, d), ring[i + per:i + 2 * per].view(S, g, d))
                      for i in range(0, ring.numel() - 2 * per + 1, 2 * per)]
        self.at = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.at = (self.at + 1) % len(self.pairs)
        return self.pairs[self.at]


class Stream:
    """Each call reads the next `mib` MiB of a ring larger than the caches, as a product's weights stream through
    them (read only, as weights are)."""

    def __init__(self, mib: float, ring_mib: int = 128):
        import torch

        self.ring, self.n, self.at = torch.ones(ring_mib << 18), int(mib * (1 << 18)), 0  # fp32: 2^18 per MiB

    def __call__(self) -> None:
        if self.at + self.n > self.ring.numel():
            self.at = 0
        self.ring[self.at:self.at + self.n].sum()
        self.at += self.n


def streaming(fn, stream: Stream):
    """`fn`, each call of it preceded by a `stream` of bytes through the caches."""
    def cold(*args, **kwargs):
        stream()
        return fn(*args, **kwargs)
    return cold
