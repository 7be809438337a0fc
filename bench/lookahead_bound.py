"""How much of the LRU-to-Belady gap could any online policy close? Belady with a bounded view of the future.

    python -m bench.lookahead_bound [--windows 1 2 4 8 16 32] [--out bench/results]

A policy that knew the exact routing of the next W tokens (and fell back on recency beyond them) is an upper bound
for every eviction policy driven by a predictor of the next W tokens' experts: the learned policy's reuse
predictor, prefetch-style next-layer predictions, router lookahead. Rows: the held-out OLMoE prompts (seed-0 split,
as in bench/policy_heldout.py) and the single-request Qwen3-30B and gpt-oss-120b traces with the cache warmed by
their prefill; the learned policy (shipped weights) for reference. Share of the gap closed = (policy - LRU) /
(Belady - LRU), mean hit rate over layers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.policy_heldout import OLMOE, OTHERS, SHARED
from bench.report import machine, markdown_table, write
from tiermoe.offload.learned_train import split_sequences
from tiermoe.sim.cache_sim import Capacity, simulate
from tiermoe.sim.trace import Trace

CAPACITIES = (Capacity.parse("25%"), Capacity.parse("50%"))


def hit_rates(trace: Trace, windows: list[int], warm: bool) -> dict[str, dict[str, float]]:
    """capacity -> policy label -> mean hit rate."""
    out: dict[str, dict[str, float]] = {c.label: {} for c in CAPACITIES}
    runs = [("lru", "lru", {}), ("learned", "learned", {}), ("belady", "belady", {})]
    runs += [(f"lookahead {w}", "belady", {"window": w}) for w in windows]
    for label, policy, kwargs in runs:
        result = simulate(trace, [policy], CAPACITIES, policy_args={policy: kwargs}, warmup_prefill=warm)
        for run in result.runs:
            out[run.capacity][label] = run.mean
    return out


def rows_of(name: str, rates: dict[str, dict[str, float]], windows: list[int]) -> list[list]:
    rows = []
    for capacity, hit in rates.items():
        gap = hit["belady"] - hit["lru"]
        closed = [f"{(hit[p] - hit['lru']) / gap:.0%}" if gap > 1e-9 else "n/a"
                  for p in ["learned", *(f"lookahead {w}" for w in windows)]]
        rows.append([name, capacity, hit["lru"], hit["belady"], round(100 * gap, 2), *closed])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    _, olmoe_test, _ = split_sequences(Trace.load(SHARED / f"{OLMOE}.npz"), 0.5, 0)
    sets = {"OLMoE, held-out prompts": (olmoe_test, False)}
    sets |= {f"{name}, prefill-warmed": (Trace.load(SHARED / f"{file}.npz"), True) for name, file in OTHERS.items()}
    results, rows = {}, []
    for name, (trace, warm) in sets.items():
        results[name] = hit_rates(trace, args.windows, warm)
        rows += rows_of(name, results[name], args.windows)
        print(name, results[name], flush=True)
    headers = ["trace", "capacity", "LRU", "Belady", "gap (points)", "learned",
               *(f"next {w} tokens known" for w in args.windows)]
    note = ("\n\nShare of the LRU-to-Belady gap closed. \"next W tokens known\": Belady seeing only the next W "
            "tokens' routing, least recently used first beyond them (an upper bound for any policy built on a "
            "predictor of those tokens' experts).")
    write(args.out, "lookahead_bound", {"machine": machine(), "windows": args.windows, "hit_rates": results},
          markdown_table(headers, rows) + note)


if __name__ == "__main__":
    main()
