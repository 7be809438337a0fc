"""Routers and the sparse MoE block. Routed expert weights come from the expert store, never from the module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tiermoe import kernels
from tiermoe.models.layers import RESIDUAL_DTYPE, Linear
from tiermoe.offload.tiers.fetch_order import fetch_order
from tiermoe.offload.tiers.store import ExpertStore, ExpertWeights


@dataclass(frozen=True, slots=True)
class RouterArgs:
    """How a layer's router turns logits into (weights, expert ids)."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" or "sigmoid"
    norm_topk_prob: bool = False
    scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: keep topk_group of n_group groups
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2) or "top2_sum" (DeepSeek-V3, LLaDA2)
    correction_bias: bool = False  # sigmoid routers: a bias used for selection only


class Router(nn.Module):
    """Linear scorer over experts plus the family's selection rule, in fp32 whatever the weights' dtype (as
    DeepSeek's and llama.cpp's routers are): a near-tie between experts is then decided as fp32 decides it."""

    def __init__(self, hidden: int, args: RouterArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.zeros(args.num_experts, hidden))
        if args.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(args.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> weights [T, A], expert ids [T, A]."""
        a = self.args
        logits = kernels.linear(x.float(), self.weight)  # [T, E]; bf16 weights widen exactly
        scores = logits.softmax(-1) if a.scoring == "softmax" else kernels.sigmoid(logits)  # [T, E]
        choice = scores + self.e_score_correction_bias if a.correction_bias else scores
        if a.n_group > 1:
            choice = _mask_groups(choice, a)
        top, ids = torch.topk(choice, a.top_k, dim=-1)  # [T, A]
        weights = top if choice is scores else scores.gather(1, ids)
        if a.norm_topk_prob and a.top_k > 1:
            total = weights.sum(-1, keepdim=True)  # [T, 1]
            weights = weights / (total + 1e-20 if a.scoring == "sigmoid" else total)
        # ops skipped where they change no bit: x + 0.0 and x * 1.0 (a decode step runs a few hundred small ops)
        return weights * a.scaling_factor if a.scaling_factor != 1.0 else weights, ids


def _mask_groups(choice: torch.Tensor, a: RouterArgs) -> torch.Tensor:
    """Keep the experts of the topk_group best groups; the others can't be chosen."""
    grouped = choice.view(choice.shape[0], a.n_group, -1)  # [T, G, E / G]
    if a.group_score == "max":
        group_scores = grouped.max(-1).values
        fill = 0.0
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        fill = float("-inf")
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, torch.topk(group_scores, a.topk_group, dim=-1).indices, True)  # [T, G]
    return grouped.masked_fill(~keep[..., None], fill).view_as(choice)


class SparseMoE(nn.Module):
    """Routed experts (from the store), plus optional shared expert(s) and a sigmoid gate on the shared output."""

    def __init__(self, layer: int, hidden: int, router: RouterArgs, shared: nn.Module | None = None,
                 shared_gate: bool = False, act: Callable = F.silu):
        super().__init__()
        self.layer = layer
        self.gate = Router(hidden, router)
        self.shared_expert = shared
        self.shared_expert_gate = Linear(hidden, 1, bias=False, fp32_out=True) if shared_gate else None
        self.act = act
        self.store: ExpertStore | None = None  # set by the engine
        self.prefetcher = None  # optional: predicts the next MoE layer's experts from this layer's input and choice
        # Router observer (trace recording, routing replay): sees (layer, ids, weights), returns the pair to use.
        self.on_route: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)  # [T, A], [T, A]
        if self.on_route is not None:
            ids, weights = self.on_route(self.layer, ids, weights)
        ahead = self.prefetcher.predict(self.layer, x, ids) if self.prefetcher is not None else None
        out = self.routed(x, weights, ids, ahead)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = kernels.sigmoid(self.shared_expert_gate(x)) * shared  # [T, 1]
            out = out + shared
        return out

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               ahead: tuple[int, list[int]] | None = None) -> torch.Tensor:
        """Sum over each token's experts of weight * expert(x), in fp32 (rounded once, by the residual stream's user).

        Experts are computed in the order the store delivers them but summed in ascending id order, so the result
        is bit-identical whatever was resident: that order is what makes offloading lossless.
        """
        if x.shape[0] == 1:
            return self._routed_one(x, weights, ids, ahead)
        experts, counts = fetch_order(ids.cpu().numpy())
        # The store sees the layer's experts before the gather bookkeeping: asking for the first group submits
        # every miss's read, so the reads run while the entries are sorted (and the residents computed).
        groups = self.store.fetch_groups(self.layer, experts, counts, ahead)
        group = next(groups, None)
        xs, scales, rows, span = _entries_by_expert(x, weights, ids, experts, counts)
        ys = xs.new_empty(xs.shape, dtype=RESIDUAL_DTYPE)  # [N, H] each entry's output, in xs's order
        while group is not None:
            self._group(group, xs, scales, span, ys)
            group = None  # release the weights before asking for more: a store under a budget may evict them next
            group = next(groups, None)
        return _sum_by_token(x, ids, rows, ys)

    def _group(self, group: list[tuple[int, ExpertWeights]], xs: torch.Tensor, scales: torch.Tensor,
               span: dict[int, slice], ys: torch.Tensor) -> None:
        """Experts the store handed over together, into their entries' rows of ys: one kernel call when the kernels
        serve them (each row the bits `expert` gives it), else one by one."""
        if len(group) > 1 and self.act is F.silu:
            group = sorted(group, key=lambda item: item[0])  # ascending ids: entries in xs's order
            parts = [span[e] for e, _ in group]
            at = _entries(parts)
            y = kernels.grouped_swiglu(_rows(xs, at), [w.gate_up for _, w in group], [w.down for _, w in group],
                                       [p.stop - p.start for p in parts], _rows(scales, at),
                                       out_dtype=RESIDUAL_DTYPE)  # [n, H], or None: not served
            if y is not None:
                if isinstance(at, slice):
                    ys[at] = y
                else:
                    ys.index_copy_(0, at, y)
                return
        for e, w in group:
            ys[span[e]] = self._on_device(xs[span[e]], w, scales[span[e]])

    def expert(self, h: torch.Tensor, w: ExpertWeights, scale: torch.Tensor) -> torch.Tensor:
        """down(act(gate(h)) * up(h)) * scale: h [n, H], scale [n, 1] -> [n, H] in fp32."""
        if self.act is F.silu:
            return kernels.swiglu(h, w.gate_up, w.down, scale, out_dtype=RESIDUAL_DTYPE)
        gate, up = F.linear(h, kernels.widened(w.gate_up, h.dtype)).chunk(2, dim=-1)
        return (F.linear(self.act(gate) * up, kernels.widened(w.down, h.dtype)) * scale).to(RESIDUAL_DTYPE)

    def _on_device(self, h: torch.Tensor, w: ExpertWeights, scale: torch.Tensor) -> torch.Tensor:
        """expert(h) where the weights are (CPU or accelerator), returned on h's device."""
        if w.down.device == h.device:
            return self.expert(h, w, scale)
        return self.expert(h.to(w.down.device), w, scale.to(w.down.device)).to(h.device)

    def _routed_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    ahead: tuple[int, list[int]] | None) -> torch.Tensor:
        """The same sum for a single token (decode at batch 1) without the gather/scatter bookkeeping."""
        slot_of = {e: i for i, e in enumerate(ids[0].tolist())}
        experts = sorted(slot_of)
        scale = weights[0, :, None]  # [A, 1]: a [1] slice per expert promotes dtypes as the batched path does
        outputs = {}
        for e, w in self.store.fetch(self.layer, experts, [1] * len(experts), ahead):
            outputs[e] = self._on_device(x, w, scale[slot_of[e]])  # [1, H]
            del w
        out = x.new_zeros(x.shape, dtype=RESIDUAL_DTYPE)
        for e in experts:
            out += outputs[e]
        return out


def _entries_by_expert(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: list[int],
                       counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, slice]]:
    """Entries (token, slot) grouped by expert, ascending ids, tokens ascending within an expert, so that every
    expert's tokens are one slice, gathered once for the whole layer: their inputs xs [N, H], weights [N, 1], tokens
    rows [N], and each expert's slice."""
    flat = ids.flatten()  # [T*A]
    order = torch.argsort(flat, stable=True)  # [T*A]
    skip = int((flat < 0).sum())  # entries of tokens the layer does not compute sort first
    entries = order[skip:]  # [N]
    rows = entries // ids.shape[1]  # [N] token of each entry
    span, n = {}, 0  # expert -> its entries' slice
    for e, c in sorted(zip(experts, counts, strict=True)):
        span[e], n = slice(n, n + c), n + c
    # index_select, not x[rows]: advanced indexing costs ~50x more on these few rows (a decode step has 16+ layers)
    return x.index_select(0, rows), weights.flatten().index_select(0, entries)[:, None], rows, span


def _sum_by_token(x: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Each token's entry outputs ys [N, H] (rows [N]: their tokens, entries in ascending expert id) summed in
    ascending expert id from 0.0, as at batch 1: bit-identical to it. x [T, H] -> [T, H] in fp32."""
    out = x.new_zeros(x.shape, dtype=RESIDUAL_DTYPE)  # [T, H]
    if rows.numel() != ids.numel():  # a token the layer does not compute: an index_add_, in index order
        return out.index_add_(0, rows, ys)
    # every token has A entries: stable by token keeps each token's in ascending id; A adds of [T, H] cost less than
    # index_add_'s one small add per entry
    per_token = ys.index_select(0, torch.argsort(rows, stable=True)).view(*ids.shape, -1)  # [T, A, H]
    for a in range(ids.shape[1]):
        out += per_token[:, a]
    return out


def _rows(t: torch.Tensor, at: slice | torch.Tensor) -> torch.Tensor:
    """t[at] for a slice (a view) or row indices (index_select: cheaper than advanced indexing)."""
    return t[at] if isinstance(at, slice) else t.index_select(0, at)


def _entries(parts: list[slice]) -> slice | torch.Tensor:
    """The rows of ascending, disjoint slices: one slice when they are back to back (a whole layer), else indices."""
    if all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False)):
        return slice(parts[0].start, parts[-1].stop)
    starts = np.array([p.start for p in parts])
    lengths = np.array([p.stop - p.start for p in parts])
    ends = np.cumsum(lengths)
    return torch.from_numpy(np.repeat(starts - ends + lengths, lengths) + np.arange(ends[-1]))  # [n]
