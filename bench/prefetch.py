"""Prefetch on the built-in model: next-layer prediction quality and decode speed with prefetch on and off.

    python -m bench.prefetch [--model DIR] [--budget 25%] [--reps 3] [--tokens 64] [--out bench/results]

Calibrates DALI's residuals on the held-out calibration text (a play the model was not trained on), reports
precision/recall of the next-layer prediction per layer with and without the residual, then decodes the same prompts
at the budget with prefetch off, plain and residual, from a cold page cache each time: median decode tokens/s, I/O
stall and hit rate. Outputs are checked identical across the three.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.offload_speed import drop_caches
from bench.report import machine, markdown_table, write
from tiermoe import LLM, SamplingParams
from tiermoe.cli import CALIBRATION_TEXT
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.offload.tools.calibrate import calibrate

PROMPTS = ["ROMEO:", "KING HENRY:\nWhat say you, lords?", "First Citizen:\nWe are accounted poor citizens"]


def decode(folder: Path, budget: str, prefetch: str | None, tokens: int) -> dict:
    drop_caches(folder)
    llm = LLM(folder, expert_cache=budget, prefetch=prefetch, io_threads=2)
    speeds, stall, hits, misses, ids = [], 0.0, 0, 0, []
    for prompt in PROMPTS:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))[0]
        m, t = out.metrics, out.stats["total"]
        speeds.append((tokens - 1) / (m.finish_time - m.first_token_time))
        stall += t["stall_time_s"]
        hits, misses = hits + t["hits"], misses + t["misses"]
        ids.append(out.outputs[0].token_ids)
    llm.store.close()
    return {"tok_s": statistics.median(speeds), "stall_s": stall, "hit_rate": hits / (hits + misses),
            "prefetched": out.stats["prefetched"], "ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="runs") as tmp:
        folder = Path(shutil.copytree(args.model, Path(tmp) / "model"))
        llm = LLM(folder)
        quality = calibrate(llm, llm.tokenizer.encode(CALIBRATION_TEXT.read_text()))
        runs = {}
        for kind in ("off", "plain", "residual"):
            reps = [decode(folder, args.budget, kind, args.tokens) for _ in range(args.reps)]
            best = sorted(reps, key=lambda r: r["tok_s"])[len(reps) // 2]
            runs[kind] = best
    same = runs["off"]["ids"] == runs["plain"]["ids"] == runs["residual"]["ids"]
    rows = [[kind, r["tok_s"], r["tok_s"] / runs["off"]["tok_s"], r["stall_s"], r["hit_rate"], r["prefetched"]]
            for kind, r in runs.items()]
    table = markdown_table(["prefetch", "decode tok/s", "vs off", "I/O stall s", "hit rate", "prefetched"], rows)
    k = max(int(key[3:]) for key in quality["residual"])
    qrows = [[layer, quality["residual"]["top1"][layer]["precision"], quality["plain"]["top1"][layer]["precision"],
              quality["residual"][f"top{k}"][layer]["recall"], quality["plain"][f"top{k}"][layer]["recall"]]
             for layer in quality["residual"]["top1"]]
    table += f"\n\nBudget {args.budget}, {len(PROMPTS)} prompts x {args.tokens} tokens, same tokens: {same}.\n\n"
    table += markdown_table(["layer", "top-1 precision (residual)", "top-1 precision (plain)",
                             f"recall@{k} (residual)", f"recall@{k} (plain)"], qrows)
    for r in runs.values():
        r.pop("ids")
    write(args.out, "prefetch", {"machine": machine(), "budget": args.budget, "same_tokens": same,
                                 "runs": runs, "prediction": quality}, table)


if __name__ == "__main__":
    main()
