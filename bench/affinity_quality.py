"""How well inter-layer expert affinity predicts the next MoE layer's experts, on every shared routing trace.

    python -m bench.affinity_quality [--traces ../shared/traces] [--out bench/results]

Per trace: the affinity table (`tiermoe prefetch train`'s fit, smoothing and combine chosen on validation sequences)
is fitted on a seeded half of the sequences and judged on the other half, which no choice looked at: precision and
recall of its top-p prediction of the next layer's experts within a token, at p = 1, top_k / 2 and top_k, against
the popularity baseline (the next layer's p most used experts in the training half, whatever this layer picked).
Traces of one request are cut into pseudo-requests of --chunk tokens first (only the next-token pair, the last
layer -> the next token's first, loses a few pairs by it). No timing: runs on any machine state.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.report import machine, markdown_table, write
from tiermoe.offload.prefetch import AffinityTable
from tiermoe.offload.tools.affinity_fit import PairCounts, count, quality
from tiermoe.offload.tools.learned_train import split_sequences
from tiermoe.offload.tools.prefetch_cli import fit_affinity
from tiermoe.sim.trace import Trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"


def chunked(trace: Trace, tokens: int) -> Trace:
    """The trace with its requests cut into pseudo-requests of `tokens` rows (a split needs several requests)."""
    starts = sorted({r for start, end in trace.sequence_bounds() for r in range(start, end, tokens)})
    return Trace(trace.experts, trace.weights, starts, trace.is_prefill, trace.positions, trace.token_ids,
                 dict(trace.meta))


def popularity(counts: PairCounts) -> torch.Tensor:
    """Table rows that all hold the next layer's usage frequency: they predict its most used experts."""
    usage = counts.second / np.maximum(counts.tokens, 1)[:, None]  # [L, E]
    e = usage.shape[1]
    return torch.from_numpy(np.repeat(usage[:, None, :], e, axis=1)).float()  # [L, E, E]


def measure(trace: Trace, split: float, seed: int) -> dict:
    table, info = fit_affinity([trace], split, seed=seed, top_p=trace.top_k, min_prob=0.0)
    train, heldout, _ = split_sequences(trace, split, seed)
    base = popularity(count(train))
    out = {"trace": trace.name, "shape": info["shape"], "sequences": trace.num_sequences,
           "heldout_tokens": heldout.num_tokens, "settings": info["settings"], "by_top_p": {}}
    for p in sorted({1, max(1, trace.top_k // 2), trace.top_k}):
        a = quality(AffinityTable(table.probs, p, table.combine), [heldout])
        b = quality(AffinityTable(base, p, "mean"), [heldout])
        out["by_top_p"][p] = {"affinity": {k: a["within_token"][k] for k in ("precision", "recall")},
                              "affinity_next_token": {k: a["next_token"][k] for k in ("precision", "recall")},
                              "popularity": {k: b["within_token"][k] for k in ("precision", "recall")}}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, default=SHARED)
    ap.add_argument("--chunk", type=int, default=16, help="tokens per pseudo-request of one-request traces")
    ap.add_argument("--split", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    results = []
    for path in sorted(args.traces.glob("*.npz")):
        trace = Trace.load(path)
        if trace.num_sequences < 4:
            trace = chunked(trace, args.chunk)
        results.append(measure(trace, args.split, args.seed))
    rows = []
    for r in results:
        s = r["shape"]
        for p, q in r["by_top_p"].items():
            rows.append([r["trace"], f"{s['layers']}x{s['experts']} top-{s['top_k']}", p,
                         q["affinity"]["precision"], q["affinity"]["recall"], q["popularity"]["precision"],
                         q["affinity_next_token"]["precision"]])
    table = markdown_table(["trace", "shape", "top-p", "affinity precision", "affinity recall",
                            "popularity precision", "next-token precision"], rows)
    table += (f"\n\nHeld-out half of each trace's requests (seeded {args.split} split, seed {args.seed}; one-request "
              f"traces cut into {args.chunk}-token pseudo-requests), within-token layer pairs; recall = precision x "
              "p / top_k. Popularity: the next layer's p most used experts in the training half. Next-token: the "
              "last layer predicting the next token's first.")
    write(args.out, "affinity_quality", {"machine": machine(), "results": results}, table)


if __name__ == "__main__":
    main()
