"""Observers of the router: record every token's routing as a trace, or replay a trace's routing (benchmarks only).

Both see a forward pass as `begin(scheduled)` -> one `on_route(layer, ...)` per MoE layer -> `end()`; the rows of
the pass are the scheduled requests' next uncached tokens ((request, count) pairs), flattened in order. A diffusion
forward (the recorder only) begins with `begin_denoise(jobs)` instead: its rows are the jobs' pending steps' tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tiermoe.engine.request import Request
from tiermoe.errors import ConfigError, RequestError
from tiermoe.models.transformer import CausalLM
from tiermoe.sim.trace import Trace, TraceRecorder


@dataclass(slots=True)
class _Row:
    seq: Request
    position: int
    token: int
    extras: dict[str, int] | None = None  # diffusion: forward, denoise_block, denoise_step


def _rows(scheduled: list[tuple[Request, int]]) -> list[_Row]:
    """One entry per token of the coming forward pass (n tokens of each request), in row order."""
    return [_Row(s, s.cached + i, t) for s, n in scheduled for i, t in enumerate(s.ids(s.cached, s.cached + n))]


class RoutingRecorder:
    """Records the experts each token was routed to, and writes them in the ../shared/traces format.

    Rows are written per request (its prompt, then its generated tokens), requests in arrival order, whatever
    the batching interleaved. A diffusion request's rows are its forwards' rows, in order, with the forward, block
    and step of each (the trace layout's diffusion extension, tiermoe.sim.trace).
    """

    def __init__(self, model: CausalLM):
        self.layers = [b.layer for b in model.moe_blocks]
        if not self.layers:
            raise RequestError("the model has no MoE layers: there is no routing to record")
        self.top_k = model.shape.top_k
        self.num_experts = model.shape.num_experts
        for block in model.moe_blocks:
            block.on_route = self.on_route
        self._rows: list[_Row] = []
        self._pass: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._by_seq: dict[str, list[tuple]] = {}
        self._forwards = 0  # diffusion forwards recorded
        self._steps: dict[str, tuple[int, int]] = {}  # diffusion: request id -> (block, step) of its last forward
        self._requests: dict[str, Request] = {}
        self._mask_id: int | None = None

    def begin(self, scheduled: list[tuple[Request, int]]) -> None:
        self._rows, self._pass = _rows(scheduled), {}

    def begin_denoise(self, jobs: list) -> None:
        """A diffusion forward over the pending steps of `jobs` (tiermoe.decode.diffusion.Denoising), in row order.

        A job's step within its block is counted here: the decoder runs one forward per step, numbered from 0 in
        each block, so this is the (block, step) its `begin_step` gave the expert store."""
        self._rows, self._pass = [], {}
        for job in jobs:
            req, work = job.req, job.pending
            block, step = self._steps.get(req.request_id, (-1, -1))
            step = step + 1 if block == job.blocks else 0
            self._steps[req.request_id] = (job.blocks, step)
            self._requests[req.request_id] = req
            self._mask_id = job.denoiser.mask_id
            extras = {"forward": self._forwards, "denoise_block": job.blocks, "denoise_step": step}
            self._rows += [_Row(req, work.start + i, t, extras) for i, t in enumerate(work.ids.tolist())]
        self._forwards += 1

    def on_route(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._pass[layer] = (ids, weights)
        return ids, weights

    def end(self) -> None:
        ids = torch.stack([self._pass[lay][0] for lay in self.layers], dim=1)  # [T, L, A]
        weights = torch.stack([self._pass[lay][1].float() for lay in self.layers], dim=1)
        for i, row in enumerate(self._rows):
            prefill = row.position < len(row.seq.prompt_ids)
            self._by_seq.setdefault(row.seq.request_id, []).append(
                (ids[i].numpy(), weights[i].numpy(), prefill, row.position, row.token, row.extras))

    def save(self, path, meta: dict | None = None) -> Trace:
        recorder = TraceRecorder()
        for rows in self._by_seq.values():
            recorder.begin_sequence()
            for row in rows:
                recorder.record(*row)
        base = {"layers": len(self.layers), "num_experts": self.num_experts, "top_k": self.top_k,
                "weights_meaning": "router weight of each selected expert, as applied to its output"}
        extras = None
        if self._requests:  # diffusion
            base |= {"mask_token_id": self._mask_id, "forwards": self._forwards}
            extras = {"seq_output_tokens": np.array([len(self._requests[r].output_ids) for r in self._by_seq],
                                                    np.int32)}
        return recorder.save(path, {**base, **(meta or {})}, extras)


class RoutingReplay:
    """Routes the token at position p of request i as the row of trace sequence i at position p did; tokens the
    trace has no row for (e.g. the prompt of a decode-only trace) use the model's own router.

    For benchmarks only: a synthetic-weight model shaped like the traced model then performs exactly the expert
    I/O the real model performed. Outputs are not meaningful text.
    """

    def __init__(self, model: CausalLM, trace: Trace):
        layers = [b.layer for b in model.moe_blocks]
        if trace.num_layers != len(layers) or trace.top_k != model.shape.top_k:
            raise ConfigError(f"trace has {trace.num_layers} MoE layers x top-{trace.top_k}; the model has "
                              f"{len(layers)} x top-{model.shape.top_k}")
        if trace.num_experts > model.shape.num_experts:
            raise ConfigError(f"trace routes to {trace.num_experts} experts; the model has {model.shape.num_experts}")
        if "forward" in trace.extras:
            raise ConfigError("a diffusion model's trace (rows per denoising forward) cannot be replayed; replay "
                              "takes autoregressive traces")
        self.trace, self.layer_index = trace, {lay: i for i, lay in enumerate(layers)}
        self.bounds = trace.sequence_bounds()
        self.sequence_of: dict[str, int] = {}  # request id -> trace sequence
        for block in model.moe_blocks:
            block.on_route = self.on_route
        self._sel = torch.empty(0, dtype=torch.long)

    def begin(self, scheduled: list[tuple[Request, int]]) -> None:
        rows = []
        for r in _rows(scheduled):
            start, end = self.bounds[self.sequence_of[r.seq.request_id]]
            row = start + r.position - int(self.trace.positions[start])  # a sequence's rows are consecutive positions
            rows.append(row if start <= row < end else -1)
        rows = np.array(rows, dtype=np.int64)
        have = rows >= 0
        # this pass's traced rows, all layers at once: [n, L, A]
        self._sel = torch.from_numpy(np.flatnonzero(have))
        self._ids = torch.from_numpy(self.trace.experts[rows[have]].astype(np.int64))
        self._weights = torch.from_numpy(self.trace.weights[rows[have]].astype(np.float32))
        # layers where every row of the pass is traced and computed: on_route hands the trace's own tensors over
        whole = bool(have.all()) and len(rows) > 0
        self._whole = ((self._ids >= 0).all(dim=2).all(dim=0) & whole).tolist()  # [L]

    def on_route(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._sel) == 0:
            return ids, weights
        lay = self.layer_index[layer]
        traced = self._ids[:, lay]  # [n, A]
        if self._whole[lay]:  # the same values as the general path below, without its copies
            return traced, self._weights[:, lay].to(weights.dtype)
        ok = (traced >= 0).all(dim=1)  # -1: the layer was not computed for that token in the source
        sel = self._sel[ok]
        ids, weights = ids.clone(), weights.clone()
        ids[sel] = traced[ok]
        weights[sel] = self._weights[:, lay][ok].to(weights.dtype)
        return ids, weights

    def end(self) -> None:
        pass

    def prompts(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """Per trace sequence: a prompt as long as the traced context before its first decode row, and max_tokens
        such that every decode row is replayed (the last sampled token is never fed back, hence + 1)."""
        out = []
        t = self.trace
        for start, end in self.bounds:
            prefill = int(t.is_prefill[start:end].sum())
            length = int(t.positions[start]) + prefill
            prompt = [1] * length
            if t.token_ids is not None and prefill:  # the traced prompt tokens, where recorded
                first = int(t.positions[start])
                prompt[first:] = [int(x) % vocab_size if x >= 0 else 1 for x in t.token_ids[start:start + prefill]]
            out.append((prompt, end - start - prefill + 1))
        return out
