"""The engine's own fixed costs on this machine: what a forward pass costs besides streaming weights, measured by
running the engine (part of `tiermoe profile`).

An eager engine pays, per MoE layer, for many small operators (norms, rotary, the paged K/V cache's writes and
gathers, softmax, top-k, residual adds), per routed expert for selecting its rows and adding its output, and per
forward for embedding, sampling and the scheduler. On a CPU these are not small beside the weights of a
decode step (bench/results/sim_validation.md: before they were measured, the simulator priced an all-resident
decode 16% slow). The probe decodes with a small model all resident, times its decoder layers, routed experts and
head, and subtracts the seconds their weights take at the engine's GEMV rate; what remains is the overhead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Overheads:
    """Microseconds the engine spends besides streaming weights, at one thread count."""

    layer_us: float  # per MoE layer of a one-token forward: attention's small ops, norms, router, K/V cache
    expert_us: float  # per routed expert computed: row selection, the kernel call, adding its output
    step_us: float  # per forward: embedding, final norm, sampling, scheduling


class _Timer:
    """Wraps module methods to add up their seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed


def measure_overheads(gemv_bytes_per_s: float, model: str | Path | None = None, tokens: int = 48) -> Overheads:
    """Decodes `tokens` tokens from a one-token prompt with `model` (default: the shipped autoregressive model),
    every expert resident, at the current torch thread count; returns the engine's overheads (best of 3 runs)."""
    from tiermoe import LLM, SamplingParams
    from tiermoe.models.registry import DEFAULT_MODEL
    from tiermoe.sim.model_shape import load_shape

    llm = LLM(model or DEFAULT_MODEL)
    for layer, e in llm.index.experts():  # all resident: no read is timed
        list(llm.store.fetch(layer, [e]))
    shape = load_shape(llm.config.model).with_dtype(str(llm.config.torch_dtype).removeprefix("torch."))
    timer = _Timer()
    for block in llm.model.moe_blocks:
        block.routed = timer.wrap("routed", block.routed)
    for layer in llm.model.model.layers:
        layer.forward = timer.wrap("layer", layer.forward)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    best = None
    for _ in range(4):  # the first warms up
        timer.seconds.clear()
        start = time.perf_counter()
        llm.generate([[llm.model.shape.vocab_size // 2]], params, use_tqdm=False)
        run = (time.perf_counter() - start, dict(timer.seconds))
        best = run if best is None or run[0] < best[0] else best
    llm.store.close()
    total, seconds = best
    forwards = tokens  # the prompt's token, then every generated token but the last
    moe = len(llm.model.moe_blocks)
    routed = forwards * moe * shape.top_k  # one token routes to top_k distinct experts per MoE layer
    dense = seconds["layer"] - seconds["routed"]  # every decoder layer, its routed experts aside
    stream = 1e6 / gemv_bytes_per_s  # microseconds per byte streamed
    layer_bytes = shape.num_layers * shape.layer_params + shape.extra_layer_params
    layer_us = (dense * 1e6 / forwards - layer_bytes * shape.dtype_bytes * stream) / moe
    expert_us = seconds["routed"] * 1e6 / routed - shape.expert_bytes * stream
    head_bytes = shape.vocab * shape.hidden * shape.dtype_bytes
    step_us = (total - seconds["layer"]) * 1e6 / forwards - head_bytes * stream
    return Overheads(round(max(layer_us, 0.0), 2), round(max(expert_us, 0.0), 2), round(max(step_us, 0.0), 2))
