"""Block-diffusion decode speed under expert budgets: TIDE (interval refresh, tau solved) against per-step caches
(LRU, LFU, DALI's window policy), a static most-used set and all experts resident; and the tau solver's predicted
cost of every tau of a sweep against the sweep's measured times.

    python -m bench.tide_speed [--model DIR] [--budgets 50% 25%] [--sweep 1 2 4 8 16 32] [--reps 3]
        [--prompts 2 --prompt-len 32 --max-tokens 96] [--baselines lru lfu dali static] [--calib-prompts 8]
        [--out bench/results]

Greedy, block 32, 32 steps per block, threshold 0.95, EOS ignored. Each run loads a fresh engine (cold RAM tier;
experts read with O_DIRECT, so the page cache does not help) and times `generate` over all prompts. Every
repetition runs every configuration, in a new shuffled order; each configuration's median over `--reps` runs is
reported. Every run's tokens are checked against the all-resident run's. The all-resident baseline reads every
expert before timing starts. The cost profile tau="auto" uses is measured (or read from
~/.cache/tiermoe/costs.json) before any timing.

Static (cache_policy "static"): before any timing, the experts' usage is counted generating from `--calib-prompts`
prompts of calibration text that follows the benchmark's prompts in the file (seeded random ids other than the
benchmark's without a tokenizer), with the benchmark's sampling, and saved as `tiermoe calibrate` saves it (under
~/.cache/tiermoe/usage); the engine then pins the most used experts that fit and streams the rest.

Solver vs sweep: every tau="auto" request solves tau after its first block by replaying that block through its
placement for each candidate tau (tiermoe.offload.placement.tau_solver). Its prediction for a sweep tau, times the
request's later blocks and summed over requests, is set beside the measured run of that tau: Spearman's rank correlation
over the sweep (time and reads), and the measured time of the solver's best tau against the measured best.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from bench.llada2_model import Scale, add_model_args, prompts, resolve
from bench.report import machine, markdown_table, write
from tiermoe import LLM, SamplingParams
from tiermoe.offload.placement.usage import count_usage, save_usage

BASELINES = ("lru", "lfu", "dali", "static")  # per-step cache policies, and the calibrated static set


def configs(budgets: list[str], sweep: list[int], baselines: list[str] = BASELINES) -> list[tuple[str, dict]]:
    """(name, engine options) of every configuration measured."""
    out = [("all-resident", {})]
    for b in budgets:
        out += [(f"{b} {p}", {"expert_cache": b, "cache_policy": p}) for p in baselines]
        out += [(f"{b} tide auto", {"expert_cache": b, "tau": "auto"})]
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
    choice, solver = getattr(llm.store, "choice", None), solver_record(llm, outs)
    pinned = getattr(llm.store.placement, "pinned", None) if options.get("cache_policy") == "static" else None
    llm.store.close()
    return {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "token_ids": [o.outputs[0].token_ids for o in outs], "hit_rate": total["hit_rate"],
            "mib_read": total["bytes_read"] / 2**20, "reads": total["misses"],
            "taus": [o.stats["diffusion"]["tau"] for o in outs],
            "refresh": outs[0].stats.get("refresh"), "predicted": choice.to_dict() if choice else None,
            "solver": solver, "pinned": len(pinned) if pinned is not None else None,
            "nfe": sum(o.stats["diffusion"]["nfe"] for o in outs),
            "steps_per_block": outs[0].stats["diffusion"]["nfe"] / max(outs[0].stats["diffusion"]["blocks"], 1)}


def solver_record(llm, outs) -> list[dict] | None:
    """Each request's tau solution: the predicted seconds of one later block per candidate tau, split by kind, and
    how many later blocks it applied to; None when tau was not solved."""
    choices = getattr(llm.store, "choices", None)
    if not choices:
        return None
    solved = [o for o in outs if o.stats["diffusion"]["blocks"] > 1]  # requests decode in order; one-block ones
    # never solve. A predicted read is one expert's checkpoint bytes at the profiled bandwidth (one size here).
    move_s = next(iter(llm.index.experts().values())).nbytes / llm.store.tier_costs.io_bandwidth
    return [{"tau": c.tau, "later_blocks": o.stats["diffusion"]["blocks"] - 1, "move_s": move_s,
             "predicted": {t: {"io_s": p.io_s, "cpu_s": p.cpu_s, "device_s": p.device_s}
                           for t, p in c.predicted.items()}}
            for c, o in zip(choices, solved, strict=True)]


def summarise(name: str, runs: list[dict]) -> dict:
    """Median time over repetitions; the I/O of a configuration is the same every run."""
    mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {"config": name, "tok_s": mid["tokens"] / mid["seconds"], "seconds": [r["seconds"] for r in runs],
            "median_s": mid["seconds"], "tokens": mid["tokens"], "hit_rate": mid["hit_rate"],
            "mib_read": mid["mib_read"], "reads": mid["reads"],
            "taus": dict(Counter(t for r in runs for t in r["taus"] if t is not None)), "refresh": mid["refresh"],
            "predicted": mid["predicted"], "solver": mid["solver"], "pinned": mid["pinned"],
            "steps_per_block": mid["steps_per_block"], "nfe": mid["nfe"],
            "tokens_per_forward": mid["tokens"] / mid["nfe"],
            "same_tokens": len({str(r["token_ids"]) for r in runs}) == 1}


def calibrate_static(folder: Path, params: SamplingParams, bench_ids: list[list[int]], args) -> dict:
    """Count the experts' usage on calibration prompts that are not the benchmark's, and save it for the engine."""
    llm = LLM(folder)
    calib = prompts(llm, args.calib_prompts, args.prompt_len, seed=1, skip=sum(map(len, bench_ids)))
    if any(c == b for c in calib for b in bench_ids):
        raise ValueError("a calibration prompt is one of the benchmark's prompts")
    usage = count_usage(llm, calib, params)
    path = save_usage(llm.index, usage)
    print(f"static: usage of {len(usage.requests)} experts counted on {len(calib)} calibration prompts -> {path}",
          flush=True)
    return usage.info


def measure(folder: Path, args) -> tuple[list[dict], bool, dict | None]:
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, block_length=32, steps=32,
                            threshold=args.threshold, ignore_eos=True)
    probe = LLM(folder)
    ids = prompts(probe, args.prompts, args.prompt_len)
    del probe
    calibration = calibrate_static(folder, params, ids, args) if "static" in args.baselines else None
    todo = configs(args.budgets, args.sweep, args.baselines)
    runs: dict[str, list[dict]] = {name: [] for name, _ in todo}
    for rep in range(args.reps):
        # A new order every repetition: a run must not always follow the same one (a heavy reader before it can
        # leave the disk throttled or memory still being returned).
        for name, options in random.Random(rep).sample(todo, len(todo)):
            gc.collect()
            runs[name].append(run_once(folder, ids, params, options))
            print(f"rep {rep} {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
    expected = runs["all-resident"][0]["token_ids"]
    for rs in runs.values():
        for r in rs:
            r["same_as_resident"] = r["token_ids"] == expected
    same = all(r["same_as_resident"] for rs in runs.values() for r in rs)
    return [summarise(name, runs[name]) for name, _ in todo], same, calibration


def compare(results: list[dict], budgets: list[str], sweep: list[int],
            baselines: list[str] = BASELINES) -> list[dict]:
    """Per budget: TIDE auto against every baseline and all-resident, and the solver's tau against the sweep's best."""
    by = {r["config"]: r for r in results}
    resident = by["all-resident"]["tok_s"]
    rows = []
    for b in budgets:
        tide = by[f"{b} tide auto"]
        best = max(sweep, key=lambda t: by[f"{b} tide tau={t}"]["tok_s"])
        row = {"budget": b, "tide_auto_tok_s": tide["tok_s"], "resident_tok_s": resident,
               "tide_over_resident": tide["tok_s"] / resident, "solver_taus": tide["taus"], "sweep_best_tau": best,
               "sweep_best_tok_s": by[f"{b} tide tau={best}"]["tok_s"],
               "auto_over_sweep_best": tide["tok_s"] / by[f"{b} tide tau={best}"]["tok_s"]}
        for p in baselines:
            base = by[f"{b} {p}"]
            row |= {f"{p}_tok_s": base["tok_s"], f"tide_over_{p}": tide["tok_s"] / base["tok_s"],
                    f"{p}_over_resident": base["tok_s"] / resident}
        if baselines:
            strongest = max(baselines, key=lambda p: by[f"{b} {p}"]["tok_s"])
            row |= {"best_baseline": strongest, "tide_over_best_baseline": row[f"tide_over_{strongest}"]}
        rows.append(row)
    return rows


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks); None when either side is constant or too short."""
    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else None


def predicted_run(solver: list[dict], tau: int) -> dict | None:
    """The solver's prediction of a tau over the run's later blocks (all requests); None if tau was no candidate.
    Every tau at least a block's steps behaves as once per block, the largest candidate."""
    out = {"io_s": 0.0, "cpu_s": 0.0, "device_s": 0.0, "reads": 0.0}
    for req in solver:
        pred = {int(t): p for t, p in req["predicted"].items()}
        t = tau if tau in pred else (max(pred) if tau >= max(pred) else None)
        if t is None:
            return None
        for kind in ("io_s", "cpu_s", "device_s"):
            out[kind] += pred[t][kind] * req["later_blocks"]
        out["reads"] += pred[t]["io_s"] / req["move_s"] * req["later_blocks"]
    out["total_s"] = out["io_s"] + out["cpu_s"] + out["device_s"]
    return out


def solver_vs_sweep(results: list[dict], budgets: list[str], sweep: list[int]) -> list[dict]:
    """Per budget: each sweep tau's predicted cost beside its measured time and reads, and how well they agree."""
    by = {r["config"]: r for r in results}
    out = []
    for b in budgets:
        solver = by[f"{b} tide auto"]["solver"]
        if not solver:
            out.append({"budget": b, "taus": [], "note": "no request had a second block: tau was never solved"})
            continue
        rows = []
        for t in sweep:
            run, pred = by[f"{b} tide tau={t}"], predicted_run(solver, t)
            if pred is not None:
                rows.append({"tau": t, **{f"predicted_{k}": v for k, v in pred.items()}, "measured_s": run["median_s"],
                             "measured_reps_s": run["seconds"], "tok_s": run["tok_s"], "reads": run["reads"],
                             "mib_read": run["mib_read"]})
        out.append({"budget": b, "taus": rows, **agreement(rows)})
    return out


def agreement(rows: list[dict]) -> dict:
    """Rank correlations over the sweep, and the measured cost of the solver's pick against the measured best."""
    if not rows:
        return {}
    best_pred = min(rows, key=lambda r: (r["predicted_total_s"], -r["tau"]))  # the solver prefers the longest tie
    best = min(rows, key=lambda r: r["measured_s"])
    spread = [(max(r["measured_reps_s"]) - min(r["measured_reps_s"])) / r["measured_s"] for r in rows
              if len(r["measured_reps_s"]) > 1]
    times = [r["measured_s"] for r in rows]
    return {"spearman_time": spearman([r["predicted_total_s"] for r in rows], times),
            "spearman_reads": spearman([r["predicted_reads"] for r in rows], [r["reads"] for r in rows]),
            "predicted_best_tau": best_pred["tau"], "measured_best_tau": best["tau"],
            "predicted_best_is_measured_best": best_pred["tau"] == best["tau"],
            "predicted_best_slower_than_best": best_pred["measured_s"] / best["measured_s"] - 1,
            "measured_spread_across_taus": (max(times) - min(times)) / min(times),
            "median_rep_spread": statistics.median(spread) if spread else None}


def report(results: list[dict], rows: list[dict], solver: list[dict], same: bool, what: str, args) -> str:
    table = markdown_table(["config", "tok/s", "NFE", "tokens/forward", "hit rate", "MiB read", "expert reads",
                            "taus used", "same tokens"],
                           [[r["config"], r["tok_s"], r["nfe"], r["tokens_per_forward"], r["hit_rate"], r["mib_read"],
                             r["reads"], ", ".join(f"{t}x{n}" for t, n in r["taus"].items()) or "-",
                             "yes" if r["same_tokens"] else "NO"] for r in results])
    names = [p for p in BASELINES if p in args.baselines]
    table += "\n\n" + markdown_table(
        ["budget", "TIDE auto tok/s", *[f"{p} tok/s" for p in names], "resident tok/s",
         *[f"TIDE/{p}" for p in names], "TIDE/resident", "solver's tau (x requests)", "sweep's best tau",
         "auto / sweep best"],
        [[r["budget"], r["tide_auto_tok_s"], *[r[f"{p}_tok_s"] for p in names], r["resident_tok_s"],
          *[r[f"tide_over_{p}"] for p in names], r["tide_over_resident"],
          ", ".join(f"{t}x{n}" for t, n in r["solver_taus"].items()), r["sweep_best_tau"],
          r["auto_over_sweep_best"]] for r in rows])
    for s in solver:
        table += f"\n\nSolver vs sweep at {s['budget']}"
        if not s["taus"]:
            table += f": {s['note']}."
            continue
        table += ":\n\n" + markdown_table(
            ["tau", "predicted I/O s", "predicted CPU s", "predicted total s", "predicted reads", "measured s",
             "tok/s", "measured reads", "MiB read"],
            [[r["tau"], r["predicted_io_s"], r["predicted_cpu_s"], r["predicted_total_s"], round(r["predicted_reads"]),
              r["measured_s"], r["tok_s"], r["reads"], r["mib_read"]] for r in s["taus"]])
        table += (f"\n\nSpearman (predicted total, measured time): {fmt(s['spearman_time'])}; (predicted reads, "
                  f"measured reads): {fmt(s['spearman_reads'])}. Solver's best tau {s['predicted_best_tau']}, "
                  f"measured best {s['measured_best_tau']}: the solver's pick ran "
                  f"{100 * s['predicted_best_slower_than_best']:.1f}% slower than the best. Measured times differ by "
                  f"{100 * s['measured_spread_across_taus']:.1f}% across the sweep; a tau's repetitions by "
                  f"{pct(s['median_rep_spread'])} (median).")
        cpu = [r["predicted_cpu_s"] for r in s["taus"]]
        if max(cpu) - min(cpu) <= 1e-9 * max(cpu) and not any(r["predicted_device_s"] for r in s["taus"]):
            table += (" On the RAM tier every routed expert is computed on the CPU whatever tau is, so the predicted "
                      "CPU time is the same for every tau and the solver ranks taus by its predicted reads alone.")
    steps = statistics.mean(r["steps_per_block"] for r in results)
    return table + (f"\n\nModel: {what}. {args.prompts} prompts of {args.prompt_len} tokens, {args.max_tokens} new "
                    f"tokens each (block 32, {steps:.1f} steps per block on average, threshold {args.threshold}); "
                    f"medians of {args.reps} runs. Outputs identical to all-resident in every run: {same}. "
                    "Predictions cover the blocks after each request's first (the solver's horizon); measured times "
                    "and reads the whole run. Static pins the experts most used generating from "
                    f"{args.calib_prompts} other calibration prompts.")


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def pct(x: float | None) -> str:
    return "n/a (one repetition)" if x is None else f"{100 * x:.1f}%"


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
    ap.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                    help="per-step cache policies and the calibrated static set to compare TIDE with")
    ap.add_argument("--calib-prompts", type=int, default=8, help="calibration prompts counting usage for static")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_model = resolve(args, Scale(experts=args.experts, layers=args.layers))
    warm_costs(bench_model.folder, args.budgets[0])
    load = [os.getloadavg()[0]]  # a shared machine's other work shows up here, not in the medians
    results, same, calibration = measure(bench_model.folder, args)
    load.append(os.getloadavg()[0])
    rows = compare(results, args.budgets, args.sweep, args.baselines)
    solver = solver_vs_sweep(results, args.budgets, args.sweep)
    write(args.out, "tide_speed" + bench_model.suffix,
          {"machine": machine(), "model": bench_model.what, "same_outputs": same,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "load_average_1min": {"start": load[0], "end": load[1]},
           "static_calibration": calibration, "comparison": rows, "solver_vs_sweep": solver, "runs": results},
          report(results, rows, solver, same, bench_model.what, args)
          + f" Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f}.")


def warm_costs(folder: Path, budget: str) -> None:
    """Profile (or load) the cost model once, outside every timed run."""
    llm = LLM(folder, expert_cache=budget, tau="auto")
    print(f"cost model: {llm.store.tier_costs}", flush=True)
    llm.store.close()


if __name__ == "__main__":
    main()
