"""The expert stores' own costs on this machine, measured for `tiermoe profile`: what a request to the live RAM tier
costs the model's thread besides the waits for its reads, and what a read costs the I/O thread that serves it.

The engine's fixed costs (tiermoe.sim.engine_probe) are measured all resident, where the store is a
`ResidentStore`. A tiered store's request does more on the model's thread: the cache policy's bookkeeping, the
evictions (their weights freed), the reads submitted and installed as they land, and under TIDE a refresh of the
layer's placement. Here the real store, built by the engine from a checkpoint with the real policy objects, serves
a stream of random requests (each layer in turn, 1 to 2 top-k experts each); between two requests, where the model
computes a layer, top-k experts' bytes stream through the caches (untimed), so the store's Python runs as cache-cold
as it does live (the engine probe's cold measurement). Per request, the model thread's CPU seconds inside the store
(its waits for reads are not CPU) are regressed on what it did (requests, experts asked, reads, evictions,
refreshes), and the resident store's per request and per expert for the same stream are taken off (the engine probe
counts those). A read on a Python I/O thread (`_load`: a checkpoint whose experts need a dtype converted on the way,
or any when the compiled readers are off) also costs that thread's CPU, which holds the interpreter lock the model's
thread needs (`load_us`); the compiled readers cost none, whether they read an expert in place or gather it (a small
expert's byte ranges copied into its slot on their own thread), and what they cost the model's thread (the slot made,
the read queued and collected) is in `read_us`.

Store kinds: a cache policy's name (a `TieredStore` with that policy) or "tide" (TIDE on the RAM tier,
`RefreshStore`). A store's costs depend on its experts' size (freeing or installing a MiB-sized expert costs more
than a small one's), so the simulator prices a model with the costs measured on its own checkpoint when given.

While a cache policy's store reads, the model's thread computes slower (`read_slowdown`, tiermoe.sim.read_probe:
the readers share the cores and the memory bus), measured on the same store.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tiermoe.sim.cache_cold import Stream
from tiermoe.sim.read_probe import read_slowdown

TERMS = ("request_us", "key_us", "read_us", "evict_us", "refresh_us")  # per request, expert, read, eviction, refresh


def store_costs(ar_model: Path | None = None, diffusion_model: Path | None = None, policies=("lru", "dali"),
                requests: int = 320, seed: int = 0) -> dict[str, dict[str, float]]:
    """{kind: {term: microseconds}} for each of `policies` on `ar_model`'s checkpoint (default: the shipped model)
    and "tide" on `diffusion_model`'s (default: the shipped diffusion model); terms as TERMS, plus `load_us`,
    `expert_bytes` (the size the store's experts had) and, for the policies, `read_slowdown`."""
    from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL

    out = {p: measure_store(ar_model or DEFAULT_MODEL, {"cache_policy": p}, requests, seed) for p in policies}
    out["tide"] = measure_store(diffusion_model or DEFAULT_DIFFUSION_MODEL, {"tau": 4}, requests, seed)
    return out


def measure_store(model: Path, options: dict, requests: int = 320, seed: int = 0,
                  budgets=("100%", "30%")) -> dict[str, float]:
    """One store kind, the engine's store for `options` (engine options: cache_policy, or tau for TIDE) on
    `model`'s checkpoint: the regression over such a store at each of `budgets` (all fit: reads without evictions;
    a third: evictions, and streamed reads without) less the resident store's for the same stream."""
    import numpy as np

    from tiermoe import LLM

    llm = LLM(model)
    layers = [b.layer for b in llm.model.moe_blocks]
    experts, top_k = llm.model.shape.num_experts, llm.model.shape.top_k
    stream = _stream(layers, experts, top_k, requests, seed)
    for layer, e in llm.index.experts():
        list(llm.store.fetch(layer, [e]))
    between = Stream(top_k * llm.store.expert_nbytes(*next(iter(llm.index.experts()))) / 2**20)
    resident = np.array(_serve(llm.store, stream, 0, between))
    llm.store.close()
    base = _fit(resident[:, 1:2], resident[:, 0])  # [per request, per expert]
    del llm
    rows, loads, slowdown = [], [], None
    for budget in budgets:
        llm = LLM(model, expert_cache=budget, **options)
        store = llm.store
        store._load = _timed_load(store._load, loads)
        size = store.cache.size(next(iter(llm.index.experts())))
        rows += _serve(store, stream, options.get("tau", 0), between)
        if "cache_policy" in options and budget == budgets[-1]:
            slowdown = read_slowdown(store)
        store.close()
        del llm, store
    rows = np.array(rows)
    coef = _fit(rows[:, 1:], rows[:, 0])
    terms = dict(zip(TERMS, coef, strict=True))
    terms["request_us"] -= base[0]
    terms["key_us"] -= base[1]
    out = {k: round(max(float(v), 0.0) * 1e6, 2) for k, v in terms.items()}
    out["load_us"] = round(float(np.median(loads)) * 1e6, 2) if loads else 0.0
    out["expert_bytes"] = size
    if slowdown is not None:
        out["read_slowdown"] = slowdown
    return out


def _timed_load(load, seconds: list[float]):
    """The store's `_load`, adding its I/O thread's own CPU seconds per read to `seconds`."""
    def timed(key):
        start = time.thread_time()
        try:
            return load(key)
        finally:
            seconds.append(time.thread_time() - start)
    return timed


def _stream(layers: list[int], experts: int, top_k: int, n: int, seed: int) -> list[tuple[int, list[int]]]:
    """n requests, the layers in turn, each 1 to 2 top_k distinct experts in ascending order."""
    rng = random.Random(seed)
    return [(layers[i % len(layers)], sorted(rng.sample(range(experts), rng.randint(1, min(2 * top_k, experts)))))
            for i in range(n)]


def _serve(store, stream, refresh_every: int, between) -> list[list[float]]:
    """Per request: [the model thread's CPU seconds in the store, experts, reads, evictions, refreshed], calling
    `between` after each (untimed). A pass over the layers is one denoising step; with `refresh_every`, every such
    step is a refresh step (TIDE)."""
    from tiermoe.offload.placement.refresh import DenoiseStep

    rows, layers = [], len({layer for layer, _ in stream})
    for i, (layer, experts) in enumerate(stream):
        step = i // layers
        refresh = bool(refresh_every) and step % refresh_every == 0
        if refresh_every and i % layers == 0:
            store.begin_step(DenoiseStep(0, step, refresh))
        before = (store.stats.total.misses, store.stats.evictions)
        start = time.thread_time()
        for group in store.fetch_groups(layer, experts, [1] * len(experts)):
            del group
        seconds = time.thread_time() - start
        rows.append([seconds, len(experts), store.stats.total.misses - before[0], store.stats.evictions - before[1],
                     float(refresh)])
        between()
    return rows[layers:]  # the first pass warms up


def _fit(x, y):
    """Least squares of y on [1, x], refitted without the requests more than 3 median deviations off the first fit
    (a collection or a page-cache pause in the middle of one request)."""
    import numpy as np

    a = np.hstack([np.ones((len(y), 1)), x])
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    residual = np.abs(y - a @ coef)
    keep = residual <= 3 * max(float(np.median(residual)), 1e-7)
    return np.linalg.lstsq(a[keep], y[keep], rcond=None)[0]
