"""How much of the LRU-to-Belady gap could any online policy close? Belady with a bounded view of the future.

    python -m bench.lookahead_bound [--windows 1 2 4 8 16 32] [--out bench/results]

A policy that knew the exact routing of the next W tokens (and fell back on recency beyond them) is an upper bound
for every eviction policy driven by a predictor of the next W tokens' experts: the learned policy's reuse
predictor, prefetch-style next-layer predictions, router lookahead. Rows: the held-out OLMoE prompts (seed-0 split,
as in bench/policy_heldout.py) and the single-request Qwen3-30B and gpt-oss-120b traces with the cache warmed by
their prefill; the learned policy (shipped weights) for reference. Share of the gap closed = (policy - LRU) /
(Belady - LRU), mean hit rate over layers.

Two more oracles say what kind of knowledge Belady's advantage rests on:
- `uses left known`: evicts the candidate with the fewest uses in the rest of the replay (least recently used among
  equals): what a perfect estimate of each expert's remaining popularity would give, order aside;
- `Belady in prompt only` / `in decode only` (traces with a prompt): Belady's choice while the prompt is replayed,
  LRU after it, or the other way round: how much of the gap is decided before the first generated token.
"""

from __future__ import annotations

import argparse
import bisect
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.policy_heldout import OLMOE, OTHERS, SHARED
from bench.report import machine, markdown_table, write
from tiermoe.offload.policies import POLICIES, BeladyPolicy, Key
from tiermoe.offload.tools.learned_train import split_sequences
from tiermoe.sim.cache_sim import Capacity, simulate
from tiermoe.sim.trace import Trace

CAPACITIES = (Capacity.parse("25%"), Capacity.parse("50%"))


class UsesLeftPolicy(BeladyPolicy):
    """Oracle: evicts the candidate with the fewest requests in the rest of the future (then the least recent)."""

    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        def score(key: Key) -> tuple[int, int]:
            uses = self._uses.get(key, [])
            return bisect.bisect_right(uses, step) - len(uses), -self._tick[key]

        return max(candidates, key=score)


class PhaseBeladyPolicy(BeladyPolicy):
    """Belady's choice at steps whose `prefill[step]` equals `oracle_in_prefill`, least recently used at the others."""

    def __init__(self, future: Sequence[Iterable[Key]], prefill: Sequence[bool], oracle_in_prefill: bool):
        super().__init__(future)
        self.prefill, self.oracle_in_prefill = prefill, oracle_in_prefill

    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        if bool(self.prefill[step]) == self.oracle_in_prefill:
            return super().victim(candidates, step)
        return min(candidates, key=self._tick.__getitem__)


ORACLES = {"uses left": "uses left known", "belady in prompt only": "Belady in prompt only",
           "belady in decode only": "Belady in decode only"}  # label in hit_rates -> column header
POLICIES |= {"uses-left": UsesLeftPolicy, "phase-belady": PhaseBeladyPolicy}  # bench-only oracles


def hit_rates(trace: Trace, windows: list[int], warm: bool) -> dict[str, dict[str, float]]:
    """capacity -> policy label -> mean hit rate."""
    out: dict[str, dict[str, float]] = {c.label: {} for c in CAPACITIES}
    runs = [("lru", "lru", {}), ("learned", "learned", {}), ("belady", "belady", {})]
    runs += [(f"lookahead {w}", "belady", {"window": w}) for w in windows]
    runs += [("uses left", "uses-left", {})]
    if warm:
        runs += [(f"belady in {phase} only", "phase-belady", {"prefill": trace.is_prefill, "oracle_in_prefill": p})
                 for phase, p in (("prompt", True), ("decode", False))]
    for label, policy, kwargs in runs:
        result = simulate(trace, [policy], CAPACITIES, policy_args={policy: kwargs}, warmup_prefill=warm)
        for run in result.runs:
            out[run.capacity][label] = run.mean
    return out


def rows_of(name: str, rates: dict[str, dict[str, float]], windows: list[int]) -> list[list]:
    rows = []
    for capacity, hit in rates.items():
        gap = hit["belady"] - hit["lru"]
        closed = [f"{(hit[p] - hit['lru']) / gap:.0%}" if gap > 1e-9 and p in hit else "n/a"
                  for p in ["learned", *(f"lookahead {w}" for w in windows), *ORACLES]]
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
               *(f"next {w} tokens known" for w in args.windows), *(ORACLES.values())]
    note = ("\n\nShare of the LRU-to-Belady gap closed. \"next W tokens known\": Belady seeing only the next W "
            "tokens' routing, least recently used first beyond them (an upper bound for any policy built on a "
            "predictor of those tokens' experts). \"uses left known\": evicts the fewest remaining uses. "
            "\"Belady in prompt/decode only\": Belady while the prompt is replayed and LRU after, or the reverse.")
    write(args.out, "lookahead_bound", {"machine": machine(), "windows": args.windows, "hit_rates": results},
          markdown_table(headers, rows) + note)


if __name__ == "__main__":
    main()
