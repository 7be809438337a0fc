"""Head-centric sparse attention for block diffusion (dLLM-Serve, arXiv 2512.17077): opt-in, approximate.

A LLaDA2 block is denoised by one heavy step, then light ones (tiermoe.decode.diffusion). The heavy step (the block's
first) writes the previous block's final K/V and runs the new block's rows over the whole prefix; it attends densely,
and from the new block's attention probabilities it keeps, per KV head, the `top_k` prefix positions that received
the most attention mass, gathered into a compact per-head store [g, N, d]: every head holds exactly N positions of
its own choosing, so heads share no padding. The light steps (the block's rows only, over the cached prefix) attend
to those N positions plus the block's own K/V: their attention costs O(N + block) instead of O(prefix + block).

Score: the attention probability a prefix position receives, summed over the block's rows and the query heads that
share the KV head (accumulated attention, as H2O and SnapKV use). The sum is the attention mass the selection keeps,
which is what decides how far the sparse output can move from the dense one; a max would keep a position one row
or head needs alone at the expense of mass every row uses. The kept positions stay in ascending order, so with N at
least the prefix the light step attends to exactly the dense keys, in the dense order (same tokens, bit for bit).

The dense K/V cache is kept whole (the next heavy step attends densely again), so this saves compute, not memory.
Only models whose finished blocks' K/V are cached (schedule "blocks": llada2_moe) have light steps to sparsify.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tiermoe.models.layers import attend


@dataclass(slots=True)
class Selection:
    """One layer's kept prefix K/V, with room behind them for the block's own K/V."""

    prefix: int  # the selection covers positions [0, prefix), the cached prefix the block's light steps see
    kept: int  # N: positions kept per head, min(top_k, prefix)
    keys: torch.Tensor  # [g, N + B, d]: [:, :N] the kept keys (ascending positions per head), [:, N:] the block's
    values: torch.Tensor  # [g, N + B, dv]


class SparseKV:
    """One request's per-layer selections; `attend` replaces dense attention for its rows."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.layers: dict[int, Selection] = {}

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
               scale: float | None, block: int | None) -> torch.Tensor:
        """q [t, h, d] of rows [past, past + t) over the dense cache keys/values [past + t, g, d]; returns [t, h, dv].

        A light step (rows of one block over the prefix a selection covers) attends sparsely; any other step
        attends densely and selects over the prefix before its last block, for the light steps that follow."""
        sel = self.layers.get(layer)
        t = q.shape[0]
        if sel is not None and sel.prefix == past and t <= sel.keys.shape[1] - sel.kept:
            return attend_kept(q, sel, keys[past:], values[past:], scale)
        out = attend(q, keys, values, past, scale, block)
        if block is not None:
            self.layers[layer] = select(q, keys, values, past, scale, block, self.top_k)
        return out


def select(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int, scale: float | None, block: int,
           top_k: int) -> Selection:
    """Per KV head, the top_k positions of [0, lo) the rows of the last block [lo, S) attend to most.

    q [t, h, d] of rows [past, S); keys [S, g, d], values [S, g, dv]."""
    S, g, d = keys.shape
    h = q.shape[1]
    lo = (S - 1) // block * block  # first position of the last row's block
    rows = q[max(lo - past, 0):].transpose(0, 1)  # [h, b, d]
    b = rows.shape[1]
    grouped = rows.reshape(g, h // g * b, d).float()  # [g, r * b, d]: query head i reads KV head i // r
    k = keys.transpose(0, 1)  # [g, S, d]
    logits = grouped @ k.float().transpose(1, 2) * (scale if scale is not None else d ** -0.5)  # [g, r * b, S]
    mass = logits.softmax(dim=-1)[..., :lo].sum(dim=1)  # [g, lo]: the rows see every key, keep the prefix's
    kept = min(top_k, lo)
    idx = mass.topk(kept, dim=1).indices.sort(dim=1).values  # [g, N], ascending positions
    v = values.transpose(0, 1)  # [g, S, dv]
    store_k = k.new_empty(g, kept + block, d)  # [g, N + B, d]
    store_v = v.new_empty(g, kept + block, v.shape[-1])
    store_k[:, :kept] = k.gather(1, idx[..., None].expand(-1, -1, d))
    store_v[:, :kept] = v.gather(1, idx[..., None].expand(-1, -1, v.shape[-1]))
    return Selection(lo, kept, store_k, store_v)


def attend_kept(q: torch.Tensor, sel: Selection, k_new: torch.Tensor, v_new: torch.Tensor,
                scale: float | None) -> torch.Tensor:
    """The block's rows q [t, h, d] over the kept prefix and their own block's k_new, v_new [t, g, d]: [t, h, dv].
    The rows are one block, which sees all of itself and all of the prefix: no mask."""
    n, t = sel.kept, q.shape[0]
    sel.keys[:, n:n + t] = k_new.transpose(0, 1)
    sel.values[:, n:n + t] = v_new.transpose(0, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), sel.keys[:, :n + t], sel.values[:, :n + t],
                                         scale=scale, enable_gqa=True)  # [h, t, dv]
    return out.transpose(0, 1)
