"""Held-out evaluation of the learned (FlashMoE-style) and DALI cache policies on the shared routing traces.

    python -m bench.policy_heldout [--traces ../shared/traces] [--out bench/results] [--seeds 3] [--quick]

Selection, on validation data only: a seeded random half of OLMoE's 200 prompts is the training half, the other
half the test half. Inside the training half, a seeded random half of its prompts fits candidate policies and the
other half validates them: first the MLP's input sets (at the settings the policy had before, `START`), then, for
the chosen inputs, one setting at a time (`HYPER`, in that order, each change kept if it wins), then one MLP per
layer against the pooled MLP for every layer. A candidate's validation score is its share of the LRU-to-Belady gap
closed, summed over 25% and 50% capacity and over the validation prompts as traced (top-8) and with each token's
routing cut to its router's top 4 and top 2 (the same model routing more sparsely, a stand-in for the other models'
shapes): hit-rate points gained over LRU / points between LRU and Belady. Within each stage the first-listed
candidate (the choice so far, or the simpler) within `MARGIN` of the best score is taken. The test half and the
other models are not looked at until the selected policy, trained on the whole training half, is evaluated on them:
- `prompts`: the test half replayed (cache kept across prompts, as in a serving process); repeated for `--seeds`
  splits (the selection ran on seed 0's training half, which overlaps the other seeds' test halves);
- `prompts, cold`: the same held-out prompts, each replayed alone from an empty cache (short requests);
- `domain`: trains on the wikitext prompts (`seq_domain` 0), replays the MBPP ones (1) (the selection's validation
  prompts include MBPP ones, so this row's configuration is not blind to that domain);
- `prompts, top-4` and `prompts, top-2`: the test half with each token's routing cut to its router's top 4 or 2;
- `qwen3-30b` and `gpt-oss-120b`: the weights of the seed-0 split on the other models' single requests (pooled MLP:
  their layer counts differ), decode tokens only, from an empty cache;
- `..., prefill-warmed`: the same requests as the engine serves them: the prompt's prefill tokens go through the
  cache (and the policies' histories) first, hits are counted on the decode tokens only.
Policies: LRU, LFU, DALI (window 32, 2 swaps), learned, Belady, at 25% and 50% of each layer's experts. The gap
closed is (policy - LRU) / (Belady - LRU) of the mean-over-layers hit rate. DALI's prefetches are loads the hit
rate does not show: loads/request = (misses + prefetches) / requested experts. The policies' decision cost per
step is measured by bench/policy_cost.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.report import machine, markdown_table, write
from tiermoe.offload.policies.learned import FEATURES, SHIPPED_WEIGHTS, LearnedConfig, LearnedWeights
from tiermoe.offload.tools.learned_train import Rows, TrainConfig, fit_weights, mine_trace, split_sequences, train
from tiermoe.sim.cache_sim import Capacity, simulate
from tiermoe.sim.trace import Trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
OLMOE = "olmoe-1b-7b-0924_decode_wikitext-mbpp"
OTHERS = {"qwen3-30b": "qwen3-30b-a3b-q4km-top6_prefill-decode_bigmoeonedge",
          "gpt-oss-120b": "gpt-oss-120b-q4km-top2_prefill-decode_bigmoeonedge"}
POLICIES = ("lru", "lfu", "dali", "learned", "belady")
CAPACITIES = (Capacity.parse("25%"), Capacity.parse("50%"))
CANDIDATE_FEATURES = {
    "FlashMoE inputs (recency, frequency)": ("recency", "frequency"),
    "+ rank at last use": ("recency", "frequency", "rank"),
    "+ interval between last two uses": ("recency", "frequency", "interval"),
    "+ all-time frequency": ("recency", "frequency", "frequency_all"),
    "reuse only": ("reuse",),
    "recency, frequency, reuse": ("recency", "frequency", "reuse"),
    "scale-free (stack depth, frequency, reuse rank)": ("stack", "frequency", "reuse_rank"),
    "all eight": tuple(FEATURES),
}
# The settings the inputs are compared at (the policy's before this selection); then the settings tried one at a
# time for the chosen inputs, in this order: (setting, values, the inputs it affects).
START = {"window": 32, "horizon": 16, "reuse_horizon": 4, "reuse_history": 4, "reuse_lr": 0.1, "hidden": 32}
HYPER = [("window", (16, 64), {"frequency"}), ("horizon", (8, 32), set(FEATURES)),
         ("reuse_horizon", (2, 8), {"reuse", "reuse_rank"}), ("reuse_history", (2, 8), {"reuse", "reuse_rank"}),
         ("hidden", (16, 64), set(FEATURES))]
MARGIN = 0.005  # share of the gap a change must gain on validation to be taken (noise between candidates)
SELECTION_SEED = 1  # seed of the fit/validation split inside the training half (the outer split uses seed 0)


def evaluate(trace: Trace, weights, policies=POLICIES, capacities=CAPACITIES, warmup_prefill: bool = False) -> dict:
    """Mean hit rates, gaps closed and loads per request of `policies` on `trace`, per capacity (`warmup_prefill`:
    see `simulate`)."""
    result = simulate(trace, policies, capacities, policy_args={"learned": {"weights": weights}},
                      warmup_prefill=warmup_prefill)
    return {"tokens": result.tokens, "capacities": {c.label: _summary(result, c.label, policies) for c in capacities}}


def _summary(result, label: str, policies) -> dict:
    runs = {p: result.run(p, label) for p in policies}
    return _rates({p: (r.hits, r.requests, r.prefetches, r.mean) for p, r in runs.items()})


def _rates(counts: dict[str, tuple]) -> dict:
    """From (hits, requests, prefetches, mean hit rate) per policy: hit rates, gaps closed, loads per request."""
    hit = {p: c[3] for p, c in counts.items()}
    gap = hit["belady"] - hit["lru"]
    closed = {p: (hit[p] - hit["lru"]) / gap if gap > 1e-9 else None for p in hit if p not in ("lru", "belady")}
    loads = {p: (c[1] - c[0] + c[2]) / c[1] for p, c in counts.items()}
    return {"hit_rate": hit, "gap_closed": closed, "loads_per_request": loads,
            "prefetches": {p: c[2] for p, c in counts.items()}}


def evaluate_cold(trace: Trace, weights, capacities=CAPACITIES) -> dict:
    """Every sequence replayed alone from an empty cache; hit rates pooled over sequences (hits / requests)."""
    totals: dict[str, dict[str, list[int]]] = {c.label: {p: [0, 0, 0] for p in POLICIES} for c in capacities}
    for i in range(trace.num_sequences):
        result = simulate(trace.select_sequences([i]), POLICIES, capacities,
                          policy_args={"learned": {"weights": weights}})
        for r in result.runs:
            t = totals[r.capacity][r.policy]
            t[0], t[1], t[2] = t[0] + r.hits, t[1] + r.requests, t[2] + r.prefetches
    return {"tokens": int((~trace.is_prefill).sum()),
            "capacities": {label: _rates({p: (h, n, f, h / n) for p, (h, n, f) in per.items()})
                           for label, per in totals.items()}}


def scenarios(olmoe: Trace, others: dict[str, Trace], chosen: TrainConfig, seeds: int, quick: bool,
              log) -> tuple[list, list, LearnedWeights]:
    """The held-out table (one row per scenario) and the per-seed prompt splits of the policy trained as `chosen`;
    returns the first split's weights."""

    def trained(part: Trace, seed: int = 0) -> LearnedWeights:
        return train([part], replace(chosen, seed=seed))

    rows, per_seed, first = [], [], None
    for seed in range(seeds):
        train_part, test_part, _ = split_sequences(olmoe, 0.5, seed)
        weights = trained(train_part, seed)
        policies = POLICIES if seed == 0 else ("lru", "learned", "belady")
        res = evaluate(test_part, weights, policies)
        per_seed.append({"seed": seed, **res})
        log(f"prompts seed {seed}: " + _brief(res))
        if seed == 0:
            first = weights
            rows.append({"scenario": "prompts", "train": "100 random OLMoE prompts (seed 0)",
                         "test": "the other 100, one warm cache", **res})
            if not quick:
                cold = evaluate_cold(test_part, weights)
                rows.append({"scenario": "prompts, cold", "train": "same", "test": "each held-out prompt alone, "
                             "cold cache", **cold})
                log("prompts cold: " + _brief(cold))
                for k in (4, 2):
                    res_k = evaluate(top_k(test_part, k), weights)
                    rows.append({"scenario": f"prompts, top-{k}", "train": "same (top-8)",
                                 "test": f"the held-out prompts, routing cut to top-{k}", **res_k})
                    log(f"prompts top-{k}: " + _brief(res_k))
    domain = olmoe.extras["seq_domain"]
    wiki, mbpp = olmoe.split_by_sequences(np.flatnonzero(domain == 0).tolist())
    res = evaluate(mbpp, trained(wiki))
    rows.append({"scenario": "domain", "train": "100 wikitext prompts", "test": "100 MBPP prompts", **res})
    log("domain: " + _brief(res))
    for name, trace in others.items():
        for warm in (False, True) if trace.is_prefill.any() else (False,):
            res = evaluate(trace, first, warmup_prefill=warm)
            label = f"{name}, prefill-warmed" if warm else name
            rows.append({"scenario": label, "train": "OLMoE prompts (seed 0)",
                         "test": f"{name}, 1 request" + (", its prefill warming the cache" if warm else ""), **res})
            log(f"{label}: " + _brief(res))
    return rows, per_seed, first


def top_k(trace: Trace, k: int) -> Trace:
    """The trace with each token keeping only its router's `k` best experts (rank order makes this a slice)."""
    return Trace(trace.experts[:, :, :k], trace.weights[:, :, :k], trace.seq_starts, trace.is_prefill,
                 trace.positions, trace.token_ids, {"num_experts": trace.num_experts}, trace.extras)


def _brief(res: dict) -> str:
    return "; ".join(f"{label}: " + " ".join(f"{p} {v:.4f}" for p, v in c["hit_rate"].items())
                     for label, c in res["capacities"].items())


def selection(train_half: Trace, log) -> dict:
    """Chooses the learned policy's inputs and settings on a validation split of the training half (see the module
    docstring); returns the candidates with their validation scores and the chosen config."""
    fit, val, _ = split_sequences(train_half, 0.5, SELECTION_SEED)
    sets = {"top-8": val, "top-4": top_k(val, 4), "top-2": top_k(val, 2)}
    base = {name: simulate(t, ["lru", "belady"], CAPACITIES) for name, t in sets.items()}
    rows = []

    def score(weights: LearnedWeights, stage: str, change: str) -> dict:
        gaps, gained, gap = {}, 0.0, 0.0
        for name, t in sets.items():
            res = simulate(t, ["learned"], CAPACITIES, policy_args={"learned": {"weights": weights}})
            for c in CAPACITIES:
                lru, belady = (base[name].run(p, c.label).mean for p in ("lru", "belady"))
                learned = res.run("learned", c.label).mean
                gaps[f"{name} {c.label}"] = (learned - lru) / (belady - lru)
                gained, gap = gained + learned - lru, gap + belady - lru
        rows.append({"stage": stage, "change": change, "config": weights.config.to_dict(),
                     "per_layer": bool(weights.layers), "gap_closed": gaps, "score": gained / gap})
        log(f"selection {stage} {change}: {rows[-1]['score']:.4f}")
        return rows[-1]

    def pick(stage_rows: list[dict]) -> LearnedConfig:
        """The best score; the first listed (the current choice, or the simpler) among those within MARGIN of it."""
        top = max(r["score"] for r in stage_rows)
        chosen = next(r for r in stage_rows if r["score"] >= top - MARGIN)
        chosen["chosen"] = True
        return LearnedConfig.from_dict(chosen["config"])

    def again(config: LearnedConfig, stage: str, change: str, per_layer: bool = True) -> dict:
        """The current choice's scores, listed again as a candidate of a later stage."""
        row = next(r for r in reversed(rows) if r["config"] == config.to_dict() and r["per_layer"] == per_layer)
        rows.append({**row, "stage": stage, "change": change, "chosen": False})
        return rows[-1]

    # Inputs: rows mined once with every feature; a subset's columns are the rows mining it alone would give.
    defaults = TrainConfig()
    mined = mine_trace(fit, LearnedConfig(features=tuple(FEATURES), **START), defaults.rows_per_layer, defaults.seed)
    stage = []
    for name, features in CANDIDATE_FEATURES.items():
        cols = [list(FEATURES).index(f) for f in features]
        picked = [[Rows(r.x[:, cols], r.y) for r in mined]]
        config = TrainConfig(LearnedConfig(features=features, **START), per_layer=True)
        stage.append(score(fit_weights(picked, fit.num_layers, config), "inputs", name))
    config = pick(stage)
    # Settings, one at a time, each from the choice so far.
    for name, values, affects in HYPER:
        if affects & set(config.features):
            stage = [again(config, "settings", f"{name} = {getattr(config, name)} (so far)")]
            for value in values:
                weights = train([fit], TrainConfig(replace(config, **{name: value}), per_layer=True))
                stage.append(score(weights, "settings", f"{name} = {value}"))
            config = pick(stage)
    # One MLP for every layer (what the live engine and other models use) against one per layer.
    pooled = train([fit], TrainConfig(config)).pooled  # the same MLP as beside per-layer ones (same rows, seed)
    listed = [score(LearnedWeights(config, [], pooled), "MLP", "pooled MLP, every layer"),
              again(config, "MLP", "one MLP per layer")]
    pick(listed)
    per_layer = listed[1]["chosen"]
    return {"fit_sequences": fit.num_sequences, "validation_sequences": val.num_sequences,
            "validation_tokens": int((~val.is_prefill).sum()), "candidates": rows, "config": config.to_dict(),
            "per_layer": per_layer}


def tables(result: dict) -> str:
    heads = ["scenario", "capacity", "LRU", "LFU", "DALI", "learned", "Belady", "gap (points)",
             "gap closed: learned", "gap closed: DALI", "loads/req LRU", "loads/req DALI", "DALI prefetches"]
    body = []
    for row in result["scenarios"]:
        for label, c in row["capacities"].items():
            h, g, ld = c["hit_rate"], c["gap_closed"], c["loads_per_request"]
            body.append([row["scenario"], label, *(f"{h[p]:.4f}" for p in POLICIES),
                         f"{100 * (h['belady'] - h['lru']):.2f}", _pct(g["learned"]), _pct(g["dali"]),
                         f"{ld['lru']:.4f}", f"{ld['dali']:.4f}", c["prefetches"]["dali"]])
    out = ["## Held-out hit rates (mean over layers, decode tokens)", "", markdown_table(heads, body), ""]
    out += ["Scenarios: " + "; ".join(f"`{r['scenario']}`: train {r['train']}, test {r['test']} "
                                      f"({r['tokens']} tokens)" for r in result["scenarios"]), ""]
    seeds = result["seeds"]
    body = []
    for label in (c.label for c in CAPACITIES):
        closed = [s["capacities"][label]["gap_closed"]["learned"] for s in seeds]
        body.append([label, len(closed), " ".join(_pct(x) for x in closed), _pct(statistics.mean(closed)),
                     _pct(statistics.stdev(closed)) if len(closed) > 1 else "-"])
    out += ["## Learned policy over prompt splits (seeds)", "",
            markdown_table(["capacity", "splits", "gap closed per split", "mean", "sd"], body), ""]
    w = result["weights"]
    out += [f"Trained weights (seed 0): {w['params']} parameters ({w['per_mlp_params']} per MLP, "
            f"{w['mlps']} MLPs)."]
    return "\n".join(out)


def selection_table(sel: dict) -> str:
    """The candidates of the selection with their validation scores, in the order they were tried."""
    cols = list(sel["candidates"][0]["gap_closed"])
    body = [[r["stage"], r["change"], ", ".join(r["config"]["features"]), "yes" if r["per_layer"] else "no",
             *(_pct(r["gap_closed"][c]) for c in cols), _pct(r["score"]), "**chosen**" if r.get("chosen") else ""]
            for r in sel["candidates"]]
    config = ", ".join(f"{k} {v}" for k, v in sel["config"].items() if k != "features")
    return "\n".join([
        "## Selection of the learned policy (validation only)", "",
        f"Fit on {sel['fit_sequences']} prompts, validated on the other {sel['validation_sequences']} "
        f"({sel['validation_tokens']} decode tokens) of the seed-0 training half (inner split seed {SELECTION_SEED})"
        "; the test half and the other models were not used. Score: share of the LRU-to-Belady gap closed on the "
        "validation prompts, summed over top-8 (as traced), top-4 and top-2 routing at 25% and 50% capacity "
        "(hit-rate points gained over LRU / points between LRU and Belady, so each case weighs by its gap); the "
        f"first-listed candidate within {100 * MARGIN:g} points of the best score is taken.", "",
        markdown_table(["stage", "candidate", "inputs", "per-layer MLPs", *(f"val {c}" for c in cols), "score",
                        ""], body), "",
        f"Chosen: inputs {', '.join(sel['config']['features'])}; {config}; "
        f"{'one MLP per layer' if sel['per_layer'] else 'the pooled MLP for every layer'}. The held-out figures "
        "below are of this choice alone, trained on the whole training half.", ""])


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--seeds", type=int, default=3, help="prompt splits to train and evaluate")
    parser.add_argument("--quick", action="store_true",
                        help="no selection (the shipped weights' config), one split, no cold-cache replay")
    args = parser.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    olmoe = Trace.load(args.traces / f"{OLMOE}.npz")
    others = {name: Trace.load(args.traces / f"{stem}.npz") for name, stem in OTHERS.items()}
    start = time.perf_counter()
    if args.quick:
        shipped = LearnedWeights.load(SHIPPED_WEIGHTS)
        sel = {"config": shipped.config.to_dict(), "per_layer": bool(shipped.layers), "candidates": []}
    else:
        sel = selection(split_sequences(olmoe, 0.5, 0)[0], log)
    chosen = TrainConfig(LearnedConfig.from_dict(sel["config"]), per_layer=sel["per_layer"])
    rows, per_seed, weights = scenarios(olmoe, others, chosen, 1 if args.quick else args.seeds, args.quick, log)
    result = {"machine": machine(), "selection": sel, "scenarios": rows, "seeds": per_seed,
              "weights": {"params": weights.num_params, "per_mlp_params": weights.pooled.num_params,
                          "mlps": len(weights.layers) + 1},
              "config": chosen.to_dict(), "seconds": round(time.perf_counter() - start)}
    write(args.out, "policy_heldout", result, (selection_table(sel) + "\n" if sel["candidates"] else "")
          + tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
