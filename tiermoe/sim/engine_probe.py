"""The engine's own costs on this machine, measured for `tiermoe profile` (one torch thread).

A CPU decode step of an eager engine is not only weights streamed at the GEMV rate: the engine's compiled kernels
(tiermoe.kernels) stream faster than torch's GEMV on one row and slow down per byte as rows are added; every call
and every routed expert costs a fixed time in Python; attention's cost grows with rows x context; and the work
outside the model (sampling, a diffusion step's prediction and commits) is paid per forward and per logit. Each is
measured here on micro-benchmarks of the engine's own functions, so the simulator prices them as the engine spends
them, for any model shape:

- `kernel_rates`: per dtype (of the weights and activations; "bfloat16-fp32": bf16 weights under fp32 compute, the
  engine's default for a bf16 checkpoint, slower than bf16 x bf16 beyond one row), row length K and number of x
  rows, the linear kernel's GB/s and fixed microseconds per call (two matrix sizes separate the two), and the rate of
  a long product's bytes beyond LONG_FROM (a third, larger size), weights beyond the caches; `swiglu_us`: the fused
  expert kernel's fixed cost per call (a tiny expert, its few bytes at the measured rate taken off); `grouped_us`:
  the fixed cost per expert of the grouped kernel, which computes a layer's experts in one call (a batched
  forward's residents). Measured in batch-invariant mode, as the engine runs them (products of any number of rows
  on the kernels).
- `attention_costs`: the engine's attention (`layers.attend`) over a grid of rows x context, as a fixed cost plus
  a FLOP rate, for one decode row (the kernel) and for a block of rows (block diffusion).
- `engine_overheads`: the shipped models run with timers on their layers, experts, kernels and attention; what
  remains after the timed kernels and attention is the engine's fixed cost per routed expert, per layer (and per
  extra row), per forward and per logit of the prediction.

The shipped models are tiny: their weights, K/V and the interpreter's own data stay in the caches, while a real
model's products stream MiBs of weights between the engine's small ops and evict them, which makes each op slower
(measured here: a layer's fixed cost nearly doubles). So the fixed costs are measured twice: as they come
(`cold_mib` 0) and with every kernel call first streaming `cache_cold.COLD_MIB` of a ring larger than the caches,
standing for a product of that many bytes; the stream's time is inside the timed kernels, so it is never counted
as overhead. The simulator takes a model's costs between the two in proportion to its experts' bytes. Attention is
measured hot and with each call's keys and values read from beyond the caches: a live decode reads a layer's cache
once per forward, after the whole model's weights streamed through the caches (a stream before each call does not
evict a cache read again and again: measured, the LLC keeps it); the simulator takes it between the two in
proportion to the bytes a forward streams.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from tiermoe.sim.cache_cold import KV_RING_MIB, KVRing, Stream, streaming
from tiermoe.sim.hardware import LONG_FROM, _best


def _typical(fn, reps: int = 3) -> float:
    """Median seconds of `reps` runs of `fn` after a warm-up: the benchmarks report medians, and on a shared machine
    the fastest run is a quiet moment's."""
    return _best(fn, reps, pick=statistics.median)


ROW_LENS = (64, 256, 1024, 4096)  # K of the products measured (an expert's hidden and intermediate sizes)
ROWS = (1, 2, 4, 8, 16, 32, 64)  # x rows per product: decode at batch 1 up to a diffusion block's rows per expert
DTYPES = ("float32", "bfloat16", "bfloat16-fp32")  # weights (and activations); bf16 weights under fp32 compute


def _dtypes(name: str):
    """(activations' dtype, weights' dtype) of a kernel table: "bfloat16-fp32" is bf16 weights under fp32 compute
    (the engine's default for a bf16 checkpoint: `kernels.weight_dtype`)."""
    import torch

    weights = getattr(torch, name.split("-")[0])
    return (torch.float32 if name.endswith("-fp32") else weights), weights


def kernel_rates(dtypes=DTYPES, row_lens=ROW_LENS, rows=ROWS, total: int = 128 << 20):
    """({dtype: {K: {rows: GB/s}}}, {dtype: {rows: fixed us per linear call}}, {dtype: {rows: fixed us per swiglu
    call}}, {dtype: {K: {rows: GB/s of a product's bytes beyond LONG_FROM}}}, {dtype: {rows: fixed us per expert of
    a grouped call}}) of the engine's kernels (`tiermoe.kernels.linear` / `swiglu` / `grouped_swiglu`), over `total`
    bytes of weights per matrix size, in batch-invariant mode as the engine runs them."""
    from tiermoe import kernels

    before = kernels.batch_invariant()
    kernels.set_batch_invariant(True)
    try:
        return _kernel_rates(dtypes, row_lens, rows, total)
    finally:
        kernels.set_batch_invariant(before)


def _kernel_rates(dtypes, row_lens, rows, total: int):
    import torch

    from tiermoe import kernels

    gbs, call, swiglu, long, grouped = {}, {}, {}, {}, {}
    for name in dtypes:
        xtype, dtype = _dtypes(name)
        gbs[name], long[name], fixed = {}, {}, {r: [] for r in rows}
        for k in row_lens:
            gbs[name][k], long[name][k] = {}, {}
            # bytes per matrix: the first two separate the fixed cost from the rate, the third gives the rate of a
            # long product's bytes beyond the second (a head's, a large projection's: they stream faster)
            sizes = [256 << 10, LONG_FROM, 8 * LONG_FROM]
            mats = {s: [torch.randn(max(s // (k * dtype.itemsize), 1), k).to(dtype) for _ in range(max(total // s, 1))]
                    for s in sizes}
            for r in rows:
                x = torch.randn(r, k).to(xtype)
                per = [_typical(lambda ws=mats[s], x=x: [kernels.linear(x, w) for w in ws]) / len(mats[s])
                       for s in sizes]
                rate = (sizes[1] - sizes[0]) / max(per[1] - per[0], 1e-12)
                gbs[name][k][r] = round(rate / 1e9, 3)
                long[name][k][r] = round((sizes[2] - sizes[1]) / max(per[2] - per[1], 1e-12) / 1e9, 3)
                fixed[r].append(max(per[0] - sizes[0] / rate, 0.0) * 1e6)
        call[name] = {r: round(statistics.median(v), 2) for r, v in fixed.items()}
        swiglu[name] = _swiglu_fixed(name, rows, gbs[name])
        grouped[name] = _swiglu_fixed(name, rows, gbs[name], group=GROUP)
    return gbs, call, swiglu, long, grouped


GROUP = 16  # experts per grouped call measured: the ~28 resident experts of a 64-row layer, fewer under a budget


def _swiglu_fixed(name: str, rows, rates: dict[int, dict[int, float]], hidden: int = 64, inter: int = 16,
                  group: int = 0) -> dict:
    """Microseconds of the fused expert kernel besides its bytes, per call: a tiny expert, many of them; with
    `group`, per expert of grouped calls (`grouped_swiglu`) of that many experts, `rows` rows each."""
    import torch

    from tiermoe import kernels

    xtype, dtype = _dtypes(name)
    n = 2000 // max(group, 1) * max(group, 1)
    if group and kernels.grouped_swiglu(torch.ones(1, hidden).to(xtype), [torch.ones(2 * inter, hidden).to(dtype)],
                                        [torch.ones(hidden, inter).to(dtype)], [1]) is None:
        group = 0  # not served: the engine calls `swiglu` per expert
    gate_up = [torch.randn(2 * inter, hidden).to(dtype) for _ in range(n)]
    down = [torch.randn(hidden, inter).to(dtype) for _ in range(n)]
    out = {}
    for r in rows:
        x, scale = torch.randn(r * max(group, 1), hidden).to(xtype), torch.rand(r * max(group, 1), 1)
        if group:
            t = _typical(lambda x=x, scale=scale: [kernels.grouped_swiglu(
                x, gate_up[i:i + group], down[i:i + group], [x.shape[0] // group] * group, scale,
                out_dtype=torch.float32)
                for i in range(0, n, group)]) / n
        else:
            t = _typical(lambda x=x, scale=scale: [kernels.swiglu(x, g, d, scale, out_dtype=torch.float32)
                                                for g, d in zip(gate_up, down, strict=True)]) / n
        k0 = min(rates)  # the shortest rows measured stand for these
        streamed = 3 * hidden * inter * dtype.itemsize / (rates[k0][r] * 1e9)
        out[r] = round(max(t - streamed, 0.0) * 1e6, 2)
    return out


ATTN_SHAPES = ((8, 2, 64), (8, 8, 64), (16, 16, 32), (4, 4, 128))  # (heads, KV heads, head dim) measured


def attention_costs(shapes=ATTN_SHAPES, cold: bool = False) -> dict[str, float]:
    """The engine's attention core (`tiermoe.models.layers.attend`, fp32) for one query row (`decode_*`: the decode
    kernel) and for a block of rows over a cache (`block_*`: block diffusion's masked SDPA), each as microseconds
    per call and per query head, a FLOP rate (4 t S h d FLOPs) and a rate for the keys and values read (2 S g d
    floats), fitted by least squares over heads, KV heads, head dims and contexts. With `cold`, each call reads its
    own keys and values from a ring larger than the caches (`KVRing`), as a live forward reads each layer's cache
    after streaming the whole model's weights since that layer's last step."""
    import numpy as np
    import torch

    from tiermoe.models.layers import attend

    n = 30 if cold else 100
    ring = torch.randn(KV_RING_MIB << 18) if cold else None  # fp32: 2^18 per MiB
    out = {}
    for name, rows, block in (("decode", (1,), 1), ("block", (8, 32), 32)):
        x, y = [], []
        for h, g, d in shapes:
            for t in rows:
                for past in (64, 256, 1024):
                    q = torch.randn(t, h, d)
                    kv = KVRing(ring, past + t, g, d) if cold else itertools.repeat(
                        (torch.randn(past + t, g, d), torch.randn(past + t, g, d)))
                    y.append(_typical(lambda q=q, kv=kv, past=past, block=block:
                                      [attend(q, *next(kv), past, None, block) for _ in range(n)]) / n)
                    x.append([1.0, h, 4.0 * t * (past + t) * h * d, 2.0 * (past + t) * g * d * 4])
        x, y = np.array(x), np.array(y)
        w = 1 / y  # relative error
        coef = np.maximum(np.linalg.lstsq(x * w[:, None], y * w, rcond=None)[0], 0.0)
        out[f"{name}_us"], out[f"{name}_head_us"] = round(coef[0] * 1e6, 2), round(coef[1] * 1e6, 3)
        out[f"{name}_gflops"] = round(1 / coef[2] / 1e9, 3) if coef[2] > 0 else 1e6
        out[f"{name}_kv_gbs"] = round(1 / coef[3] / 1e9, 3) if coef[3] > 0 else 1e6
    return out


class _Timers:
    """Wraps callables to add up their seconds and calls, and which ran inside which (`nested`)."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()
        self.nested: Counter = Counter()  # (outer, inner) -> seconds of inner spent inside outer
        self.nested_calls: Counter = Counter()
        self._open: Counter = Counter()
        self.experts = 0  # experts the grouped kernel computed

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self._open[name] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - start
                self._open[name] -= 1
                self.seconds[name] += dt
                self.calls[name] += 1
                for outer, depth in self._open.items():
                    if depth:
                        self.nested[outer, name] += dt
                        self.nested_calls[outer, name] += 1
        return timed

    def counted(self, grouped):
        """The grouped experts kernel, counting the experts it computes (None: not served, `swiglu` computes them)."""
        def call(x, gate_ups, *args, **kwargs):
            y = grouped(x, gate_ups, *args, **kwargs)
            self.experts += len(gate_ups) if y is not None else 0
            return y
        return call


@contextmanager
def _patched(pairs):
    """Set (object, attribute, value) triples for the duration."""
    old = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in pairs]
    try:
        for obj, attr, value in pairs:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(old):
            setattr(obj, attr, value)


def _probe(model_dir: Path, params, prompts: list[list[int]], reps: int = 3, cold_mib: float = 0):
    """Generates from `prompts` (one batch) on `model_dir` all resident with the engine's layers, routed experts,
    kernels, attention, logits and prediction timed: the median of `reps` runs after a warm-up (seconds, timers, the
    requests' diffusion stats summed), as the benchmarks report medians. With `cold_mib`, every kernel call first
    streams that many MiB (see above)."""
    from tiermoe import LLM, kernels
    from tiermoe.decode.diffusion import Denoiser
    from tiermoe.models import attention
    from tiermoe.models.moe import SparseMoE
    from tiermoe.models.transformer import CausalLM, DecoderLayer

    llm = LLM(model_dir)
    for layer, e in llm.index.experts():  # all resident: no read is timed
        list(llm.store.fetch(layer, [e]))
    kern = {n: getattr(kernels, n) for n in ("linear", "swiglu", "grouped_swiglu")}
    if cold_mib:
        stream = Stream(cold_mib)
        kern = {n: streaming(f, stream) for n, f in kern.items()}
    runs = []
    for i in range(reps + 1):
        t = _Timers()
        pairs = [(kernels, "linear", t.wrap("linear", kern["linear"])),
                 (kernels, "swiglu", t.wrap("swiglu", kern["swiglu"])),
                 (kernels, "grouped_swiglu", t.counted(t.wrap("grouped", kern["grouped_swiglu"]))),
                 (attention, "attend", t.wrap("attend", attention.attend)),  # the core; the K/V cache is the layer's
                 (DecoderLayer, "forward", t.wrap("layer", DecoderLayer.forward)),
                 (CausalLM, "forward", t.wrap("model", CausalLM.forward)),  # counts forwards
                 (CausalLM, "logits", t.wrap("logits", CausalLM.logits)),
                 (Denoiser, "predict", t.wrap("predict", Denoiser.predict)),
                 (SparseMoE, "routed", t.wrap("routed", SparseMoE.routed))]
        with _patched(pairs):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
        if i:
            runs.append((seconds, t, _work(outs)))
    shape = llm.model.shape
    llm.store.close()
    return (*sorted(runs, key=lambda r: r[0])[len(runs) // 2], shape.vocab_size, len(llm.model.model.layers))


def _work(outs) -> Counter:
    """The requests' diffusion forwards, rows and logit rows summed (empty for autoregressive outputs)."""
    return sum((Counter({k: (o.stats.get("diffusion") or {}).get(k, 0) for k in ("nfe", "forward_rows", "logit_rows")})
                for o in outs), Counter())


def _layer_rest(t: _Timers, layers: int) -> float:
    """Seconds per decoder layer call besides its kernels, its routed experts and its attention core."""
    kernels_outside_routed = (t.nested["layer", "linear"] + t.nested["layer", "swiglu"] + t.nested["layer", "grouped"]
                              - t.nested["routed", "swiglu"] - t.nested["routed", "grouped"])
    return (t.seconds["layer"] - t.seconds["routed"] - kernels_outside_routed - t.seconds["attend"]) \
        / (t.calls["model"] * layers)


def _per_expert(t: _Timers) -> float:
    """Seconds per routed expert besides its kernel (one call each, or one grouped call for the layer's): the
    store's fetch, slicing, gathering, summing."""
    n = t.nested_calls["routed", "swiglu"] + t.experts
    return (t.seconds["routed"] - t.nested["routed", "swiglu"] - t.nested["routed", "grouped"]) / n if n else 0.0


def engine_overheads(ar_model: Path | None = None, diffusion_model: Path | None = None,
                     cold_mib: float = 0) -> dict[str, float]:
    """The engine's fixed costs beyond its timed kernels and attention core: `ar_overheads`, `diffusion_overheads`,
    per expert read besides the disk (`read_us`, see `read_cost_us`), the share of the model's compute a read
    issued meanwhile waits to start (`read_wait`), and each group of experts a batched layer computes beyond its first
    (`group_us`, `single_us`: tiermoe.sim.group_probe), on the shipped models (or those given) all resident at the
    current thread count. With `cold_mib`, every kernel call streams that many MiB first (see the module docstring),
    and the read and group costs are left out."""
    from tiermoe.sim.group_probe import group_costs
    from tiermoe.sim.read_probe import read_cost_us, read_wait

    out = {**ar_overheads(ar_model, cold_mib), **diffusion_overheads(diffusion_model, cold_mib)}
    return out if cold_mib else {**out, "read_us": read_cost_us(diffusion_model), "read_wait": read_wait(),
                                 **group_costs(diffusion_model)}


def ar_overheads(model: Path | None = None, cold_mib: float = 0) -> dict[str, float]:
    """An autoregressive decode's fixed costs: per routed expert (`expert_us`, one token's path), per decoder layer
    of a one-row forward (`layer_us`), per forward outside the model (`step_us`) and per logit the sampler reads
    (`sample_ns`). Decodes 48 tokens from a one-token prompt."""
    from tiermoe import SamplingParams
    from tiermoe.models.registry import DEFAULT_MODEL

    seconds, t, _, vocab, layers = _probe(model or DEFAULT_MODEL,
                                         SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), [[100]],
                                         cold_mib=cold_mib)
    # outside the layers: embedding, final norm, sampling, the scheduler (the head's product is priced apart)
    outside, sample_s = (seconds - t.seconds["layer"] - t.seconds["logits"]) / t.calls["model"], sample_cost()
    return {"expert_us": round(_per_expert(t) * 1e6, 2), "layer_us": round(_layer_rest(t, layers) * 1e6, 2),
            "step_us": round(max(outside - sample_s * vocab, 0.0) * 1e6, 2), "sample_ns": round(sample_s * 1e9, 3)}


def diffusion_overheads(model: Path | None = None, cold_mib: float = 0) -> dict[str, float]:
    """A block-diffusion decode's fixed costs: per routed expert of a batched forward (`batch_expert_us`), per
    decoder layer (`block_layer_us`) and per row of it (`layer_row_us`, the slope between two block lengths), per
    request and forward outside the model (`denoise_us`) and per logit the prediction reads (`logit_ns`). Decodes
    two requests of 64 tokens each in blocks of 16 and of 32 from 12-token prompts, batched (32 and 64 rows per
    forward: the batched diffusion forwards priced are measured, not extrapolated to from fewer rows)."""
    from tiermoe import SamplingParams
    from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL

    per_block = {}  # block length -> (seconds, timers, stats, vocab, layers)
    for block in (16, 32):
        params = SamplingParams(temperature=0, max_tokens=64, block_length=block, steps=block, threshold=0.95,
                                ignore_eos=True)
        per_block[block] = _probe(model or DEFAULT_DIFFUSION_MODEL, params, [list(range(4, 16)), list(range(5, 17))],
                                  cold_mib=cold_mib)
    rest = {}  # mean rows per forward -> layer rest seconds
    for _, t, stats, _, layers in per_block.values():
        rest[stats["forward_rows"] / t.calls["model"]] = _layer_rest(t, layers)
    (r0, s0), (r1, s1) = sorted(rest.items())
    seconds, t, stats, vocab, _ = per_block[32]
    # per request in a forward: the requests' forwards summed (a request may take a step the other skips)
    outside = (seconds - t.seconds["layer"] - t.seconds["predict"]) / max(stats["nfe"], t.calls["model"])
    logit_s = (t.seconds["predict"] - t.seconds["logits"]) / max(stats["logit_rows"] * vocab, 1)
    return {"batch_expert_us": round(_per_expert(t) * 1e6, 2),
            "layer_row_us": round(max(s1 - s0, 0.0) / (r1 - r0) * 1e6, 3),
            "block_layer_us": round(max(s0 - (s1 - s0) / (r1 - r0) * r0, 0.0) * 1e6, 2),
            "denoise_us": round(outside * 1e6, 2), "logit_ns": round(logit_s * 1e9, 3)}


def sample_cost(vocabs: tuple[int, int] = (4096, 131072), n: int = 200) -> float:
    """Seconds per logit of the engine's sampler (`decode.sampler.sample`, greedy as the probe's decode): the slope
    between two vocabulary sizes, its fixed cost per call being the scheduler's, counted in `step_us`. An
    autoregressive step samples a row of logits, much cheaper per logit than a diffusion step's prediction
    (`logit_ns`: probabilities, confidences, commits)."""
    import torch

    from tiermoe import SamplingParams
    from tiermoe.decode.sampler import SamplerState, sample

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    state = SamplerState.new(params, [100], [], [])
    per = []
    for v in vocabs:
        rows = [torch.randn(v) for _ in range(8)]
        per.append(_typical(lambda rows=rows: [sample(rows[i % 8], params, state) for i in range(n)]) / n)
    return max((per[1] - per[0]) / (vocabs[1] - vocabs[0]), 0.0)
