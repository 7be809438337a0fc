"""Seconds of the engine's CPU work priced from its own measured costs (a profile `tiermoe profile` measured,
tiermoe.sim.engine_probe): what `Pricing` uses on the CPU when the profile has them.

A product is its kernel's fixed cost per call plus its weights' bytes at the kernel's rate for its row length and
number of activation rows (an expert: the fused kernel over gate|up, rows of length H, and down, rows of length I);
a routed expert adds the engine's fixed cost per expert; a layer its fixed cost (per layer and per row), its
products and its attention core per sequence (fixed + FLOPs at the measured rate); a forward the head's product,
the prediction's cost per logit and the fixed cost outside the model (per forward, or per request and diffusion
forward). Rates were measured at one thread; at more, kernel and attention rates scale as the profile's GEMV rate.
Fixed costs are taken between their hot and cold measurements (`CPUProfile.cold_share` of the model's expert
bytes): a model whose products stream MiBs through the caches pays its small ops cache-cold. Attention is taken
between its hot and cold measurements by the bytes a forward streams (`CPUProfile.kv_cold_share`): its keys and
values are read once per forward, after the model's weights went through the caches.
"""

from __future__ import annotations

import bisect
import math

from tiermoe.sim.hardware import GB, LONG_FROM, CPUProfile
from tiermoe.sim.model_shape import ModelShape

US = 1e-6


def _between(table: dict[int, float], x: float) -> tuple[int, int, float]:
    """The measured keys around x and x's fraction of the way between them (clamped to the measured range)."""
    keys = list(table)
    if x <= keys[0]:
        return keys[0], keys[0], 0.0
    if x >= keys[-1]:
        return keys[-1], keys[-1], 0.0
    i = bisect.bisect_left(keys, x)
    lo, hi = keys[i - 1], keys[i]
    return lo, hi, (x - lo) / (hi - lo)


def seconds_per_byte(by_rows: dict[int, float], rows: int) -> float:
    """1 / rate at `rows` activation rows: linear between measured row counts; beyond the most measured, the time
    grows with the rows (the kernel is compute-bound there)."""
    top = max(by_rows)
    if rows > top:
        return rows / top / (by_rows[top] * GB)
    lo, hi, f = _between(by_rows, rows)
    return (1 - f) / (by_rows[lo] * GB) + f / (by_rows[hi] * GB)


def between(hot: dict[str, float], cold: dict[str, float] | None, share: float) -> dict[str, float]:
    """`hot` moved `share` of the way to `cold` (per key; rates `*_gflops` / `*_gbs` as their time per unit)."""
    if not cold or not share:
        return hot
    out = dict(hot)
    for k, a in hot.items():
        if k in cold:
            b = cold[k]
            out[k] = 1 / ((1 - share) / a + share / b) if k.endswith(("_gflops", "_gbs")) else a + share * (b - a)
    return out


def fixed_at(by_rows: dict[int, float], rows: int) -> float:
    lo, hi, f = _between(by_rows, rows)
    return ((1 - f) * by_rows[lo] + f * by_rows[hi]) * US


class EngineCosts:
    """The engine's CPU costs for one model shape at `threads` threads."""

    def __init__(self, cpu: CPUProfile, shape: ModelShape, threads: int):
        self.cpu, self.shape = cpu, shape
        # the kernels as the engine runs them; older profiles: the weights' dtype, else the first measured
        dtype = next((d for d in (shape.kernel_dtype, shape.dtype) if d in cpu.kernel_gbs), next(iter(cpu.kernel_gbs)))
        self.rates, self.linear_us, self.swiglu_us = (cpu.kernel_gbs[dtype], cpu.linear_us[dtype],
                                                      cpu.swiglu_us[dtype])
        self.grouped_us = (cpu.grouped_us or {}).get(dtype, self.swiglu_us)  # older profiles: one call each
        self.long = (cpu.long_gbs or {}).get(dtype)
        self.speedup = cpu.gemv_bandwidth(threads) / cpu.gemv_bandwidth(1)
        share = cpu.cold_share(shape.expert_bytes)
        self.e = between(cpu.engine, cpu.engine_cold, share)
        self.attn = between(cpu.attention, cpu.attention_cold, cpu.kv_cold_share(shape.forward_bytes))

    def stream(self, nbytes: float, row_length: int, rows: int) -> float:
        """Seconds the kernels take to stream `nbytes` of weights with rows of `row_length` against `rows` rows:
        interpolated in log2 of the row length between the measured ones; a product's bytes beyond LONG_FROM at
        the long products' rate when the profile measured it."""
        short = min(nbytes, LONG_FROM) if self.long else nbytes
        t = short * self._per_byte(self.rates, row_length, rows)
        if nbytes > short:
            t += (nbytes - short) * self._per_byte(self.long, row_length, rows)
        return t / self.speedup

    @staticmethod
    def _per_byte(rates: dict[int, dict[int, float]], row_length: int, rows: int) -> float:
        lengths = {int(math.log2(k) * 1024): k for k in rates}  # sorted, as the profile keeps them
        lo, hi, f = _between(dict.fromkeys(lengths, 0.0), math.log2(max(row_length, 1)) * 1024)
        a, b = (seconds_per_byte(rates[lengths[k]], rows) for k in (lo, hi))
        return (1 - f) * a + f * b

    def linear(self, rows: int, nbytes: float, row_length: int, calls: int = 1) -> float:
        return calls * fixed_at(self.linear_us, rows) + self.stream(nbytes, row_length, rows)

    def swiglu(self, rows: int, hidden: int, inter: int, grouped: bool = False) -> float:
        """The fused expert kernel: gate|up [2I, H], down [H, I]; one call, or one expert of a grouped call."""
        b = self.shape.dtype_bytes
        return (fixed_at(self.grouped_us if grouped else self.swiglu_us, rows)
                + self.stream(2 * inter * hidden * b, hidden, rows) + self.stream(hidden * inter * b, inter, rows))

    def expert(self, rows: int, batched: bool) -> float:
        """A routed expert computed for `rows` rows, in a forward of one row (`batched` False: a kernel call of its
        own) or of several (the layer's experts grouped into one kernel call)."""
        fixed = self.e["batch_expert_us"] if batched else self.e["expert_us"]
        return fixed * US + self.swiglu(rows, self.shape.hidden, self.shape.expert_dim, grouped=batched)

    def extra_group(self, experts: int) -> float:
        """A group of `experts` computed beyond a batched layer's first (reads landing apart): a grouped call of its
        own, or a single expert's call (tiermoe.sim.group_probe; 0 in profiles that did not measure it)."""
        return self.e.get("single_us" if experts == 1 else "group_us", 0.0) * US

    def attention(self, rows: int, context: int, block: bool) -> float:
        """One sequence's attention core: `rows` queries over `context` keys each; a block of rows at once (block
        diffusion) or row by row as decode rows (the autoregressive engine, batch-invariant)."""
        a, s = self.attn, self.shape
        kind, calls = ("block", 1) if block else ("decode", rows)
        flops = 4.0 * rows * context * s.query_width
        kv = calls * context * s.kv_dim * s.dtype_bytes  # keys and values, read once per call
        return (calls * (a[f"{kind}_us"] + s.query_heads * a[f"{kind}_head_us"]) * US
                + (flops / (a[f"{kind}_gflops"] * GB) + kv / (a[f"{kind}_kv_gbs"] * GB)) / self.speedup)

    def layer_fixed(self, rows: int, block: bool) -> float:
        """A decoder layer's work besides its products and attention core (norms, rotary, router selection, K/V
        cache, residuals)."""
        e = self.e
        return (e["block_layer_us"] + rows * e["layer_row_us"] if block
                else e["layer_us"] + (rows - 1) * e["layer_row_us"]) * US

    def moe_layer(self, seqs: list[tuple[int, int]], block: bool) -> float:
        """An MoE layer but its routed experts: attention projections (qkv, o), router, shared experts, attention core
        per sequence, fixed costs. `seqs`: (rows, context) per sequence of the forward."""
        s, rows = self.shape, sum(n for n, _ in seqs)
        b = s.dtype_bytes
        t = self.layer_fixed(rows, block) + self.linear(rows, s.attn_params * b, s.hidden, calls=2)
        t += self.linear(rows, s.hidden * s.num_experts * b, s.hidden)
        if s.shared_params:
            t += self.swiglu(rows, s.hidden, s.shared_params // (3 * s.hidden))
        return t + sum(self.attention(n, c, block) for n, c in seqs)

    def dense_layers(self, seqs: list[tuple[int, int]], block: bool) -> float:
        """The layers with a dense MLP (their weights in `extra_layer_params`): the same fixed costs and attention as
        an MoE layer's, their weights through the kernels."""
        s, rows = self.shape, sum(n for n, _ in seqs)
        if not s.extra_layer_params:
            return 0.0
        per_layer = (self.layer_fixed(rows, block) + sum(self.attention(n, c, block) for n, c in seqs)
                     + 2 * fixed_at(self.linear_us, rows) + fixed_at(self.swiglu_us, rows))
        return s.dense_layers * per_layer + self.stream(s.extra_layer_params * s.dtype_bytes, s.hidden, rows)

    def head(self, logit_rows: int, requests: int, diffusion: bool) -> float:
        """lm_head on the rows that need logits, the prediction or sampling over them, and the work outside the
        model: per forward (autoregressive) or per request in the forward (diffusion)."""
        s, e = self.shape, self.e
        t = self.linear(logit_rows, s.vocab * s.hidden * s.dtype_bytes, s.hidden) if logit_rows else 0.0
        outside = requests * e["denoise_us"] if diffusion else e["step_us"]
        per_logit = e["logit_ns"] if diffusion else e.get("sample_ns", e["logit_ns"])  # older profiles: one cost
        return t + logit_rows * s.vocab * per_logit * 1e-9 + outside * US
