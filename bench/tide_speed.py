"""Block-diffusion decode speed under expert budgets: TIDE (interval refresh, tau solved) against per-step LRU
caching and against all experts resident, plus the tau the solver picked against the best tau of a sweep.

    python -m bench.tide_speed [--model DIR] [--budgets 50% 25%] [--sweep 1 2 4 8 16 32] [--reps 3]
        [--prompts 2 --prompt-len 32 --max-tokens 96] [--out bench/results]

Greedy, block 32, 32 steps per block, threshold 0.95, EOS ignored. Each run loads a fresh engine (cold RAM tier;
experts read with O_DIRECT, so the page cache does not help) and times `generate` over all prompts. Every
repetition runs every configuration, in a new shuffled order; each configuration's median over `--reps` runs is
reported. Every run's tokens are checked against the all-resident run's. The all-resident baseline reads every
expert before timing starts. The cost profile tau="auto" uses is measured (or read from
~/.cache/tiermoe/costs.json) before any timing.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from bench.llada2_model import Scale, add_model_args, prompts, resolve
from bench.report import machine, markdown_table, write
from tiermoe import LLM, SamplingParams


def configs(budgets: list[str], sweep: list[int]) -> list[tuple[str, dict]]:
    """(name, engine options) of every configuration measured."""
    out = [("all-resident", {})]
    for b in budgets:
        out += [(f"{b} lru", {"expert_cache": b, "cache_policy": "lru"}), (f"{b} tide auto", {"expert_cache": b,
                                                                                              "tau": "auto"})]
        out += [(f"{b} tide tau={t}", {"expert_cache": b, "tau": t}) for t in sweep]
    return out


def run_once(folder: Path, ids: list[list[int]], params: SamplingParams, options: dict) -> dict:
    """One timed generate on a fresh engine."""
    llm = LLM(folder, **options)
    if not options:  # all-resident: read every expert first
        for layer, e in llm.index.experts():
            list(llm.store.fetch(layer, [e]))
    start = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    total = outs[0].stats["total"]
    choice = getattr(llm.store, "choice", None)
    llm.store.close()
    return {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "token_ids": [o.outputs[0].token_ids for o in outs], "hit_rate": total["hit_rate"],
            "mib_read": total["bytes_read"] / 2**20, "taus": [o.stats["diffusion"]["tau"] for o in outs],
            "refresh": outs[0].stats.get("refresh"), "predicted": choice.to_dict() if choice else None,
            "nfe": sum(o.stats["diffusion"]["nfe"] for o in outs),
            "steps_per_block": outs[0].stats["diffusion"]["nfe"] / max(outs[0].stats["diffusion"]["blocks"], 1)}


def summarise(name: str, runs: list[dict]) -> dict:
    """Median time over repetitions; the I/O of a configuration is the same every run."""
    mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {"config": name, "tok_s": mid["tokens"] / mid["seconds"], "seconds": [r["seconds"] for r in runs],
            "tokens": mid["tokens"], "hit_rate": mid["hit_rate"], "mib_read": mid["mib_read"],
            "taus": dict(Counter(t for r in runs for t in r["taus"])), "refresh": mid["refresh"],
            "predicted": mid["predicted"], "steps_per_block": mid["steps_per_block"], "nfe": mid["nfe"],
            "tokens_per_forward": mid["tokens"] / mid["nfe"]}


def measure(folder: Path, args) -> tuple[list[dict], bool]:
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, block_length=32, steps=32,
                            threshold=args.threshold, ignore_eos=True)
    probe = LLM(folder)
    ids = prompts(probe, args.prompts, args.prompt_len)
    del probe
    todo = configs(args.budgets, args.sweep)
    runs: dict[str, list[dict]] = {name: [] for name, _ in todo}
    for rep in range(args.reps):
        # A new order every repetition: a run must not always follow the same one (a heavy reader before it can
        # leave the disk throttled or memory still being returned).
        for name, options in random.Random(rep).sample(todo, len(todo)):
            gc.collect()
            runs[name].append(run_once(folder, ids, params, options))
            print(f"rep {rep} {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
    expected = runs["all-resident"][0]["token_ids"]
    same = all(r["token_ids"] == expected for rs in runs.values() for r in rs)
    return [summarise(name, runs[name]) for name, _ in todo], same


def compare(results: list[dict], budgets: list[str], sweep: list[int]) -> list[dict]:
    """Per budget: TIDE auto against LRU and all-resident, and the solver's tau against the sweep's best."""
    by = {r["config"]: r for r in results}
    resident = by["all-resident"]["tok_s"]
    rows = []
    for b in budgets:
        tide, lru = by[f"{b} tide auto"], by[f"{b} lru"]
        best = max(sweep, key=lambda t: by[f"{b} tide tau={t}"]["tok_s"])
        rows.append({"budget": b, "tide_auto_tok_s": tide["tok_s"], "lru_tok_s": lru["tok_s"],
                     "resident_tok_s": resident, "tide_over_lru": tide["tok_s"] / lru["tok_s"],
                     "tide_over_resident": tide["tok_s"] / resident, "lru_over_resident": lru["tok_s"] / resident,
                     "solver_taus": tide["taus"], "sweep_best_tau": best,
                     "sweep_best_tok_s": by[f"{b} tide tau={best}"]["tok_s"],
                     "auto_over_sweep_best": tide["tok_s"] / by[f"{b} tide tau={best}"]["tok_s"]})
    return rows


def report(results: list[dict], rows: list[dict], same: bool, what: str, args) -> str:
    table = markdown_table(["config", "tok/s", "NFE", "tokens/forward", "hit rate", "MiB read", "taus used"],
                           [[r["config"], r["tok_s"], r["nfe"], r["tokens_per_forward"], r["hit_rate"], r["mib_read"],
                             ", ".join(f"{t}x{n}" for t, n in r["taus"].items() if t is not None) or "-"]
                            for r in results])
    table += "\n\n" + markdown_table(
        ["budget", "TIDE auto tok/s", "LRU tok/s", "resident tok/s", "TIDE/LRU", "TIDE/resident", "LRU/resident",
         "solver's tau (x requests)", "sweep's best tau", "auto / sweep best"],
        [[r["budget"], r["tide_auto_tok_s"], r["lru_tok_s"], r["resident_tok_s"], r["tide_over_lru"],
          r["tide_over_resident"], r["lru_over_resident"],
          ", ".join(f"{t}x{n}" for t, n in r["solver_taus"].items()), r["sweep_best_tau"],
          r["auto_over_sweep_best"]] for r in rows])
    steps = statistics.mean(r["steps_per_block"] for r in results)
    return table + (f"\n\nModel: {what}. {args.prompts} prompts of {args.prompt_len} tokens, {args.max_tokens} new "
                    f"tokens each (block 32, {steps:.1f} steps per block on average, threshold {args.threshold}); "
                    f"medians of {args.reps} runs. Outputs identical to all-resident in every run: {same}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--budgets", nargs="+", default=["50%", "25%"])
    ap.add_argument("--sweep", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_model = resolve(args, Scale(experts=args.experts, layers=args.layers))
    warm_costs(bench_model.folder, args.budgets[0])
    results, same = measure(bench_model.folder, args)
    rows = compare(results, args.budgets, args.sweep)
    write(args.out, "tide_speed" + bench_model.suffix,
          {"machine": machine(), "model": bench_model.what, "same_outputs": same,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "comparison": rows, "runs": results},
          report(results, rows, same, bench_model.what, args))


def warm_costs(folder: Path, budget: str) -> None:
    """Profile (or load) the cost model once, outside every timed run."""
    llm = LLM(folder, expert_cache=budget, tau="auto")
    print(f"cost model: {llm.store.tier_costs}", flush=True)
    llm.store.close()


if __name__ == "__main__":
    main()
