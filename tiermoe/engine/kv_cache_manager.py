"""The KV cache of every running request in one byte budget, paged in fixed-size blocks (as vLLM's PagedAttention).

Per layer, each tensor the attention caches (K and V; MLA's latent and rotary key) lives in one pool
[num_blocks, block_size, ...]. A request holds a block table: its token at position p sits at row p % block_size of
block table[p // block_size]. Blocks are handed out on admission and as the request grows, and all come back when it
finishes, is aborted or is preempted, so requests of any length share the budget without fragmentation. Free blocks
are handed out lowest id first and the pools grow (doubling, up to the budget) only when a block past their end is
handed out, so memory follows the most blocks ever in use, not the budget.
"""

from __future__ import annotations

import heapq

import torch

from tiermoe import kernels

BLOCK_SIZE = 16  # tokens per block (vLLM's default)


class KVCacheManager:
    """Blocks of `block_size` tokens, as many as `budget` bytes hold at `bytes_per_token` (all layers)."""

    def __init__(self, budget: int, bytes_per_token: int, block_size: int = BLOCK_SIZE):
        self.budget, self.bytes_per_token, self.block_size = budget, bytes_per_token, block_size
        self.block_bytes = block_size * bytes_per_token
        self.num_blocks = budget // self.block_bytes if bytes_per_token else 0
        self._free = list(range(self.num_blocks))  # a heap: the lowest id is handed out first
        self.tables: dict[str, list[int]] = {}  # request id -> block ids in position order
        self.pools: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> pools [pool_blocks, block_size, ...]
        self.pool_blocks = 0  # blocks the pools hold (grown on demand, at most num_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_bytes

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pools allocated so far (at most the budget)."""
        return sum(p.nbytes for pools in self.pools.values() for p in pools)

    @property
    def usage(self) -> float:
        """Share of the blocks in use, 0..1."""
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold `num_tokens` tokens; False (nothing taken) when the free blocks can't."""
        table = self.tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            if not table:
                del self.tables[request_id]
            return False
        table.extend(heapq.heappop(self._free) for _ in range(need))
        if table and max(table) >= self.pool_blocks:
            self._grow(max(table) + 1)
        return True

    def _grow(self, blocks: int) -> None:
        """Make the pools hold at least `blocks` blocks (doubling), keeping what they hold."""
        self.pool_blocks = min(self.num_blocks, max(blocks, 2 * self.pool_blocks))
        for layer, pools in self.pools.items():
            grown = tuple(p.new_empty((self.pool_blocks, *p.shape[1:])) for p in pools)
            for new, old in zip(grown, pools, strict=True):
                new[:old.shape[0]] = old
            self.pools[layer] = grown

    def free(self, request_id: str) -> None:
        """Give back every block the request holds (finish, abort, preemption)."""
        for block in self.tables.pop(request_id, []):
            heapq.heappush(self._free, block)

    def view(self, request_id: str) -> PagedKV:
        """The request's cache as the attention layers use it (update, then read back)."""
        return PagedKV(self, request_id)

    def pool(self, layer: int, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The layer's pools, made at its first write from the shapes and dtypes it caches."""
        pools = self.pools.get(layer)
        if pools is None:
            pools = tuple(t.new_empty((self.pool_blocks, self.block_size, *t.shape[1:])) for t in like)
            self.pools[layer] = pools
        return pools


class PagedKV:
    """One request's KV cache over the manager's pools; same interface as tiermoe.decode.kv_cache.KVCache."""

    def __init__(self, manager: KVCacheManager, request_id: str):
        self.manager, self.request_id = manager, request_id

    def update(self, layer: int, past: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `new` (each [t, ...]) at positions [past, past + t) and return the cached [0, past + t) of each."""
        m = self.manager
        pools = m.pool(layer, new)
        end = past + new[0].shape[0]
        blocks = m.tables[self.request_id][:m.blocks_for(end)]
        first = blocks[0]
        if blocks == list(range(first, first + len(blocks))):  # consecutive blocks (the usual case): no gather
            base = first * m.block_size
            flat = [pool.flatten(0, 1) for pool in pools]  # [blocks * block_size, ...] views
            for f, t in zip(flat, new, strict=True):
                f[base + past:base + end] = t
            return tuple(f[base:base + end] for f in flat)
        table = torch.tensor(blocks)  # [b]
        positions = torch.arange(past, end)
        blocks, rows = table[positions // m.block_size], positions % m.block_size  # [t], [t]
        for pool, t in zip(pools, new, strict=True):
            pool[blocks, rows] = t
        return tuple(pool[table].flatten(0, 1)[:end] for pool in pools)  # [S, ...], gathered in position order


class PagedBatch:
    """The rows of one forward pass over several requests' paged caches, attended in one kernel call per layer.

    Built once per pass (the slot of each new row and the block tables are the same in every layer); a layer writes
    its new K/V with one indexed copy per pool and `tiermoe.kernels.paged_attention` reads the pools in place, each
    row as `decode_attention` would over that request's gathered cache (bit for bit).
    """

    def __init__(self, manager: KVCacheManager, seqs: list):
        bs = manager.block_size
        tables = [manager.tables[s.cache.request_id] for s in seqs]
        width = max(len(t) for t in tables)
        self.manager = manager
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # [n, b] block ids
        slots, seq, end = [], [], []
        for i, (s, table) in enumerate(zip(seqs, tables, strict=True)):
            positions = range(s.past, s.past + s.length)
            slots += [table[p // bs] * bs + p % bs for p in positions]
            seq += [i] * s.length
            end += [p + 1 for p in positions]  # a row sees the keys up to its own position
        self.slots, self.seq, self.end = torch.tensor(slots), torch.tensor(seq), torch.tensor(end)  # [T] each

    @classmethod
    def of(cls, seqs: list) -> PagedBatch | None:
        """The batch of `seqs` (SeqSlice), or None where the per-request path serves: a single row (batch-1
        decode), other caches, or chunks of several rows outside batch-invariant mode (attended by torch's SDPA)."""
        caches = [s.cache for s in seqs]
        if (sum(s.length for s in seqs) < 2 or not all(type(c) is PagedKV for c in caches)
                or any(s.sparse is not None for s in seqs)
                or len({id(c.manager) for c in caches}) != 1
                or (not kernels.batch_invariant() and any(s.length > 1 for s in seqs))):
            return None
        return cls(caches[0].manager, seqs)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               window: int | None) -> torch.Tensor | None:
        """Write k [T, g, d] and v [T, g, dv] at the rows' slots and attend q [T, h, d] -> [T, h, dv]; None when
        the kernels do not serve it (the per-request path then writes the same values again and attends)."""
        if q.device.type != "cpu":
            return None
        pools = self.manager.pool(layer, (k, v))
        for pool, t in zip(pools, (k, v), strict=True):
            pool.flatten(0, 1).index_copy_(0, self.slots, t)  # a view: the pools are contiguous
        return kernels.paged_attention(q, *pools, self.tables, self.seq, self.end, window, scale)
