"""Which experts a prompt leaves resident for decode: the order a batched prefill asks for its experts.

    python -m bench.prefill_order [--out bench/results]

The engine computes a prompt in one forward pass; when a layer's distinct experts do not fit the cache together
the store serves them in turns, and what decode finds resident is what was served last. Replayed on the shared
traces that record a prompt (Qwen3-30B and gpt-oss-120b, one request each), decode hit rate (mean over layers) after:
- `per token`: one request per prompt token (the simulator's `--warmup-prefill`, the upper reference);
- `batched, ascending id`: one forward asking for the prompt's experts in ascending id order (the engine before);
- `batched, latest token`: the same in `fetch_order`, by the latest prompt token using each (the engine now).
LRU, the learned policy (shipped weights) and Belady at 25% and 50% of each layer's experts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.policy_heldout import OTHERS, SHARED
from bench.report import machine, markdown_table, write
from tiermoe.offload.tiers.fetch_order import fetch_order
from tiermoe.sim.cache_sim import Capacity, simulate
from tiermoe.sim.trace import Trace

CAPACITIES = (Capacity.parse("25%"), Capacity.parse("50%"))
POLICIES = ("lru", "learned", "belady")


def ascending(ids: np.ndarray) -> tuple[list[int], list[int]]:
    """The engine's former order: distinct experts by id."""
    unique, counts = np.unique(ids[ids >= 0], return_counts=True)
    return unique.tolist(), counts.tolist()


WARMUPS = {"per token": None, "batched, ascending id": ascending, "batched, latest token": fetch_order}


def hit_rates(trace: Trace) -> dict[str, dict[str, dict[str, float]]]:
    """warm-up -> capacity -> policy -> mean decode hit rate."""
    out = {}
    for label, order in WARMUPS.items():
        result = simulate(trace, POLICIES, CAPACITIES, warmup_prefill=True, prefill_order=order)
        out[label] = {c.label: {p: result.run(p, c.label).mean for p in POLICIES} for c in CAPACITIES}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    results, rows = {}, []
    for name, file in OTHERS.items():
        results[name] = rates = hit_rates(Trace.load(SHARED / f"{file}.npz"))
        print(name, rates, flush=True)
        for cap in (c.label for c in CAPACITIES):
            before, now = rates["batched, ascending id"][cap], rates["batched, latest token"][cap]
            gap = now["belady"] - now["lru"]
            closed = f"{(now['learned'] - now['lru']) / gap:.0%}" if gap > 1e-9 else "n/a"
            rows.append([name, cap, *(rates[w][cap]["lru"] for w in WARMUPS),
                         round(100 * (now["lru"] - before["lru"]), 2), now["learned"], now["belady"], closed])
    headers = ["trace", "capacity", *(f"LRU, {w}" for w in WARMUPS), "latest vs ascending (points)",
               "learned, latest token", "Belady, latest token", "gap closed: learned"]
    write(args.out, "prefill_order", {"machine": machine(), "hit_rates": results}, markdown_table(headers, rows))


if __name__ == "__main__":
    main()
