"""Per-sequence KV cache: per layer, time-major buffers sized once for the whole request."""

from __future__ import annotations

import torch


class KVCache:
    """Holds whatever tensors a layer's attention caches (k and v, or MLA's latent and rotary key)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}

    def update(self, layer: int, past: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `new` (each [t, ...]) at positions [past, past + t) and return views of [0, past + t)."""
        bufs = self.layers.get(layer)
        if bufs is None:
            bufs = tuple(t.new_empty((self.capacity, *t.shape[1:])) for t in new)
            self.layers[layer] = bufs
        end = past + new[0].shape[0]
        for buf, t in zip(bufs, new, strict=True):
            buf[past:end] = t
        return tuple(buf[:end] for buf in bufs)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for bufs in self.layers.values() for b in bufs)
