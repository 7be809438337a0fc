"""What a batched forward's MoE layer pays for each group of experts beyond its first, measured for `tiermoe profile`
(tiermoe.sim.engine_probe's `engine_overheads` holds them in the profile's `engine`).

The engine computes a layer's experts in the groups its store hands over: all resident, one group (one grouped
kernel call, which the layer's measured fixed cost already holds); offloaded, the residents and then each set of
reads found landed, so a layer whose misses land one after another is computed in many groups. A group of several
experts costs its own gathering of rows, grouped call and scatter (`SparseMoE._group`); a group of one expert a
kernel call of its own. Both are measured here on the shipped diffusion model all resident, its store handing a
layer's experts over in groups of 2 and of 1 against all at once.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def group_costs(model_dir: Path | None = None, reps: int = 3) -> dict[str, float]:
    """{"group_us": one more group of several experts, "single_us": one more group of a single expert}, in
    microseconds per group: the decode's extra time over the extra groups (the median of `reps` runs each,
    interleaved, after a warm-up)."""
    from tiermoe import LLM, SamplingParams
    from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL

    llm = LLM(model_dir or DEFAULT_DIFFUSION_MODEL)
    for layer, e in llm.index.experts():
        list(llm.store.fetch(layer, [e]))
    params = SamplingParams(temperature=0, max_tokens=64, block_length=32, steps=32, threshold=0.95, ignore_eos=True)
    prompts = [list(range(4, 16)), list(range(5, 17))]
    runs: dict[int, list[tuple[float, int]]] = {0: [], 1: [], 2: []}  # group size (0: all at once) -> (s, groups)
    for i in range(reps + 1):
        for size in runs:
            groups = [0]
            llm.store.fetch_groups = _in_groups(llm.store, size, groups)
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            if i:
                runs[size].append((time.perf_counter() - start, groups[0]))
    llm.store.close()
    (base, n0), out = _median(runs[0]), {}
    for name, size in (("group_us", 2), ("single_us", 1)):
        seconds, n = _median(runs[size])
        out[name] = round(max(seconds - base, 0.0) / max(n - n0, 1) * 1e6, 2)
    return out


def _in_groups(store, size: int, groups: list[int]):
    """The store's `fetch_groups`, handing the experts over `size` at a time (0: all at once), counting groups."""
    def fetch_groups(layer, experts, counts=None, prefetch=None):
        items = list(store.fetch(layer, experts, counts, prefetch))
        step = size or len(items)
        for i in range(0, len(items), step):
            groups[0] += 1
            yield items[i:i + step]
    return fetch_groups


def _median(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return statistics.median(s for s, _ in runs), runs[0][1]
