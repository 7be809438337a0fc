"""What an expert read costs the engine besides the disk, measured for `tiermoe profile` (tiermoe.sim.engine_probe's
`engine_overheads` holds them in the profile's `engine`): how long a read the store issues waits for the model's
thread to let it start, the extra time per read of an offloaded decode, and how much the reads in flight slow the
model's own compute (`read_slowdown`, held per store kind with the store's costs, tiermoe.sim.store_probe)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def read_wait(compute_ms: float = 2.0, reps: int = 21, hidden: int = 512, inter: int = 256) -> float:
    """Share of a stretch of the model thread's compute (the engine's expert kernel called over and over for
    `compute_ms`, about a layer's resident experts) that a task submitted to an I/O thread at its start waits before
    it runs, the median of `reps`: near 1 when the kernels hold the interpreter lock (a read the store issues then
    starts only when the model's thread waits for it), near 0 when they let it go."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from tiermoe import kernels

    gate_up, down = torch.randn(2 * inter, hidden), torch.randn(hidden, inter)
    x, scale = torch.randn(1, hidden), torch.ones(1, 1)
    started, waits = [], []
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()  # the thread exists and waits for work, as the store's do
        for _ in range(reps):
            start = time.perf_counter()
            task = pool.submit(lambda: started.append(time.perf_counter()))
            while time.perf_counter() - start < compute_ms * 1e-3:
                kernels.swiglu(x, gate_up, down, scale, out_dtype=torch.float32)
            end = time.perf_counter()
            task.result()
            waits.append(min((started[-1] - start) / (end - start), 1.0))
    return round(statistics.median(waits), 3)


def read_cost_us(model_dir: Path | None = None, budget: str = "25%", tau: int = 4, reps: int = 3) -> float:
    """What one expert read costs the engine's decode besides the disk, in microseconds: the shipped diffusion model
    decodes one request (48 tokens in blocks of 16 from a 12-token prompt) with its experts under TIDE on the RAM
    tier at `budget` and all resident; the extra seconds per expert read (the best of `reps` runs each). Its reads
    are small and the disk keeps up with them, so the extra is the engine's own work around a read (the store's
    Python on the reader and model threads, which share the interpreter lock, the system calls), which the model's
    thread waits for."""
    from tiermoe import LLM, SamplingParams
    from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL

    params = SamplingParams(temperature=0, max_tokens=48, block_length=16, steps=16, threshold=0.95, ignore_eos=True)
    prompt = list(range(4, 16))
    out = {}
    for name, options in (("resident", {}), ("offloaded", {"expert_cache": budget, "tau": tau})):
        llm = LLM(model_dir or DEFAULT_DIFFUSION_MODEL, **options)
        if not options:
            for layer, e in llm.index.experts():
                list(llm.store.fetch(layer, [e]))
        runs = []
        for _ in range(reps + 1):  # the first warms up
            start = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            runs.append((time.perf_counter() - start, llm.store.stats.total.misses))
        llm.store.close()
        out[name] = min(runs[1:])
    (off, reads), (res, _) = out["offloaded"], out["resident"]
    return round(max(off - res, 0.0) / max(reads, 1) * 1e6, 1)


def read_slowdown(store, rounds: int = 48, reps: int = 5) -> float:
    """How much longer the model's thread computes while the engine's reads are in flight, as it computes a layer's
    resident experts while the layer's misses are read: per round, the model's thread submits about 2 MiB of reads
    of `store`'s experts (an engine's RAM tier: its own read path), computes 4 experts with the engine's expert
    kernel (one token, weights beyond the caches: a decode's memory-bound experts), then waits for the reads; the
    compute's seconds over the same rounds' without reads, the median of `reps` alternations, >= 1. The readers'
    system calls, their completions and the bytes they land share the cores and the memory bus with the model's
    thread."""
    import itertools
    import random

    import torch

    from tiermoe import kernels

    hidden, inter, per_round = 512, 256, 4
    experts = itertools.cycle([(torch.randn(2 * inter, hidden), torch.randn(hidden, inter)) for _ in range(128)])
    x, scale = torch.randn(1, hidden), torch.ones(1, 1)  # 128 experts of 1.5 MiB: beyond the caches
    keys, rng = list(store.index.experts()), random.Random(0)
    depth = min(max(2, -(-(2 << 20) // max(store.largest, 1))), len(keys))

    def computed(reads: bool) -> float:
        seconds = 0.0
        for _ in range(rounds):
            pending = [store._submit(key) for key in rng.sample(keys, depth)] if reads else []
            start = time.perf_counter()
            for _ in range(per_round):
                gate_up, down = next(experts)
                kernels.swiglu(x, gate_up, down, scale, out_dtype=torch.float32)
            seconds += time.perf_counter() - start
            for read in pending:
                read.result()  # dropped at once: the buffer goes back to the pool
            del pending
        return seconds

    computed(False)  # warm-up
    ratios = [computed(True) / computed(False) for _ in range(reps)]
    return round(max(statistics.median(ratios), 1.0), 3)
