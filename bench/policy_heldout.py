"""Held-out evaluation of the learned (FlashMoE-style) and DALI cache policies on the shared routing traces.

    python -m bench.policy_heldout [--traces ../shared/traces] [--out bench/results] [--seeds 3] [--quick]

The learned policy is trained on part of the OLMoE trace and evaluated where it was not trained:
- `prompts`: a seeded random half of the 200 prompts trains, the other half is replayed (cache kept across prompts,
  as in a serving process); repeated for `--seeds` splits;
- `prompts, cold`: the same held-out prompts, each replayed alone from an empty cache (short requests);
- `domain`: trains on the wikitext prompts (`seq_domain` 0), replays the MBPP ones (1);
- `prompts, top-4` and `prompts, top-2`: the held-out prompts with each token's routing cut to its router's top 4
  or top 2 experts: the same model routing more sparsely (k / E of 1/16 and 1/32, against 1/8 trained on), a shape
  shift built from the training model's data, between it and the other models;
- `qwen3-30b` and `gpt-oss-120b`: the weights of the first `prompts` split on the other models' single requests
  (pooled MLP: their layer counts differ), decode tokens only, from an empty cache;
- `..., prefill-warmed`: the same requests as the engine serves them: the prompt's prefill tokens go through the
  cache (and the policies' histories) first, hits are counted on the decode tokens only.
Policies: LRU, LFU, DALI (window 32, 2 swaps), learned, Belady, at 25% and 50% of each layer's experts. The gap
closed is (policy - LRU) / (Belady - LRU) of the mean-over-layers hit rate. DALI's prefetches are loads the hit
rate does not show: loads/request = (misses + prefetches) / requested experts.
Also: an ablation of the MLP's inputs (trained on the first `prompts` split, evaluated on its held-out half and on
the other models), the per-eviction inference cost, and the shipped weights' size. Nothing here is tuned to these
numbers: the policy's inputs and settings were chosen on a validation split inside the training half.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.report import machine, markdown_table, write
from tiermoe.offload.cache import ExpertCache
from tiermoe.offload.learned import DEFAULT_FEATURES, FEATURES, SHIPPED_WEIGHTS, LearnedConfig, LearnedPolicy
from tiermoe.offload.learned_train import Rows, TrainConfig, fit_weights, mine_trace, split_sequences, train
from tiermoe.sim.cache_sim import Capacity, simulate
from tiermoe.sim.trace import Trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
OLMOE = "olmoe-1b-7b-0924_decode_wikitext-mbpp"
OTHERS = {"qwen3-30b": "qwen3-30b-a3b-q4km-top6_prefill-decode_bigmoeonedge",
          "gpt-oss-120b": "gpt-oss-120b-q4km-top2_prefill-decode_bigmoeonedge"}
POLICIES = ("lru", "lfu", "dali", "learned", "belady")
CAPACITIES = (Capacity.parse("25%"), Capacity.parse("50%"))
ABLATIONS = {
    "FlashMoE inputs (recency, frequency)": ("recency", "frequency"),
    "+ rank at last use": ("recency", "frequency", "rank"),
    "+ interval between last two uses": ("recency", "frequency", "interval"),
    "+ all-time frequency": ("recency", "frequency", "frequency_all"),
    "reuse only": ("reuse",),
    "default (recency, frequency, reuse)": DEFAULT_FEATURES,
    "scale-free (stack depth, frequency, reuse rank)": ("stack", "frequency", "reuse_rank"),
    "all eight": tuple(FEATURES),
}
EXPERT_READ_S = 1.5e6 / 1.5e9  # one 1.5 MB expert at ~1.5 GB/s direct reads (DESIGN.md: 1.0-1.9 GB/s)


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


def scenarios(olmoe: Trace, others: dict[str, Trace], seeds: int, quick: bool, log) -> tuple[list, list, object]:
    """The held-out table (one row per scenario) and the per-seed prompt splits; returns the first split's weights."""
    rows, per_seed, first = [], [], None
    for seed in range(seeds):
        train_part, test_part, _ = split_sequences(olmoe, 0.5, seed)
        weights = train([train_part], TrainConfig(seed=seed))
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
    res = evaluate(mbpp, train([wiki], TrainConfig()))
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


def ablation(olmoe: Trace, others: dict[str, Trace], log) -> list[dict]:
    """Each input set trained on the first prompts split (rows mined once with every feature, then columns picked),
    evaluated at 25% and 50% on its held-out half and on the other models (their prefill warming the cache); plus
    the pooled MLP alone and DALI with LRU demand evictions."""
    train_part, test_part, _ = split_sequences(olmoe, 0.5, 0)
    every = TrainConfig(LearnedConfig(features=tuple(FEATURES)))
    mined = mine_trace(train_part, every.policy, every.rows_per_layer, every.seed)
    out = []
    for name, features in ABLATIONS.items():
        cols = [list(FEATURES).index(f) for f in features]
        picked = [[Rows(r.x[:, cols], r.y) for r in mined]]
        weights = fit_weights(picked, olmoe.num_layers, TrainConfig(LearnedConfig(features=features)))
        out.append(_ablation_row(name, weights, test_part, others, ("lru", "learned", "belady")))
        log(f"ablation {name}: {out[-1]['gap_closed']}")
        if features == DEFAULT_FEATURES:
            weights.layers = []  # no per-layer MLP: every layer uses the pooled one
            out.append(_ablation_row("default, pooled MLP for every layer", weights, test_part, others,
                                     ("lru", "learned", "belady")))
            log(f"ablation pooled: {out[-1]['gap_closed']}")
    out.append(_dali_lru_row(test_part, others))
    return out


def _ablation_traces(test_part: Trace, others: dict[str, Trace]) -> dict[str, Trace]:
    """The ablation's columns: the held-out OLMoE prompts and each other model (named "warm" if its prefill is
    replayed before its decode tokens)."""
    return {"OLMoE held-out": test_part,
            **{f"{name} warm" if t.is_prefill.any() else name: t for name, t in others.items()}}


def _ablation_row(name: str, weights, test_part: Trace, others: dict[str, Trace], policies) -> dict:
    gap, hit, points = {}, {}, {}
    for label, trace in _ablation_traces(test_part, others).items():
        res = evaluate(trace, weights, policies, warmup_prefill=True)
        for cap, c in res["capacities"].items():
            gap[f"{label} {cap}"] = c["gap_closed"]["learned"]
            hit[f"{label} {cap}"] = c["hit_rate"]["learned"]
            points[f"{label} {cap}"] = 100 * (c["hit_rate"]["belady"] - c["hit_rate"]["lru"])
    return {"variant": name, "gap_closed": gap, "hit_rate": hit, "gap_points": points}


def _dali_lru_row(test_part: Trace, others: dict[str, Trace]) -> dict:
    gap, hit = {}, {}
    for label, trace in _ablation_traces(test_part, others).items():
        result = simulate(trace, ["lru", "dali", "belady"], CAPACITIES, policy_args={"dali": {"victim": "lru"}},
                          warmup_prefill=True)
        for cap in CAPACITIES:
            c = _summary(result, cap.label, ("lru", "dali", "belady"))
            gap[f"{label} {cap.label}"] = c["gap_closed"]["dali"]
            hit[f"{label} {cap.label}"] = c["hit_rate"]["dali"]
    return {"variant": "DALI with LRU demand evictions (swaps alone)", "gap_closed": gap, "hit_rate": hit}


def inference_cost(olmoe: Trace, weights, tokens: int = 1000) -> dict:
    """Time of the learned policy's calls while replaying OLMoE decode tokens at 25%.

    `sim`: one policy per layer (bare ids, 16 experts cached); `live`: one policy and one cache for all 16 layers
    with (layer, expert) keys, as the live store runs it (256 experts cached). The first victim call of a request
    scores the candidates of its layer (features + one MLP call) and also runs that layer's once-per-request
    update of the reuse predictor; further victims of the same request reuse the scores.
    """
    rows = olmoe.decode_rows()[:tokens]
    sim = [(step, keys) for step, keys in enumerate(olmoe.layer_requests(0, rows))]
    live = [(step, [(layer, e) for e in olmoe.experts[r, layer].tolist()])
            for step, (r, layer) in enumerate((r, layer) for r in rows for layer in range(olmoe.num_layers))]
    return {"sim": _time_policy(LearnedPolicy(weights, layer=0, num_layers=olmoe.num_layers), 16, sim),
            "live": _time_policy(LearnedPolicy(weights, num_layers=olmoe.num_layers), 256, live),
            "expert_read_s": EXPERT_READ_S}


def _time_policy(policy: LearnedPolicy, capacity: int, requests) -> dict:
    first, again, per_request = [], [], []
    victim = policy.victim
    current = {"step": None}

    def timed_victim(candidates, step):
        start = time.perf_counter()
        key = victim(candidates, step)
        (first if current["step"] != step else again).append((time.perf_counter() - start, len(candidates)))
        current["step"] = step
        return key

    policy.victim = timed_victim  # instance attribute: the cache calls it in place of the method
    cache = ExpertCache(capacity, policy)
    for step, keys in requests:
        start = time.perf_counter()
        cache.request(keys, step)
        per_request.append(time.perf_counter() - start)
    return {"first_victim_s": statistics.median(t for t, _ in first),
            "first_victim_p99_s": float(np.percentile([t for t, _ in first], 99)),
            "candidates": statistics.median(n for _, n in first),
            "further_victim_s": statistics.median(t for t, _ in again) if again else None,
            "request_s": statistics.median(per_request)}


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
    if result.get("ablation"):
        cols = list(result["ablation"][0]["gap_closed"])
        body = [[a["variant"], *(_pct(a["gap_closed"][c]) for c in cols)] for a in result["ablation"]]
        body.append(["(LRU-to-Belady gap, points)", *(f"{result['ablation'][0]['gap_points'][c]:.2f}" for c in cols)])
        out += ["## Ablation: share of the LRU-to-Belady gap closed", "",
                markdown_table(["variant", *cols], body), ""]
    cost = result["cost"]
    body = [[k, cost[k]["candidates"], _us(cost[k]["first_victim_s"]), _us(cost[k]["first_victim_p99_s"]),
             _us(cost[k]["further_victim_s"]), _us(cost[k]["request_s"])] for k in ("sim", "live")]
    out += [f"## Inference cost (one expert read of 1.5 MB is about {_us(cost['expert_read_s'])})", "",
            markdown_table(["setting", "candidates", "first victim (median)", "first victim (p99)",
                            "further victims", "whole request (policy + cache)"], body), ""]
    w = result["weights"]
    out += [f"Shipped weights: {w['params']} parameters ({w['per_layer_params']} per MLP), {w['bytes']} bytes."]
    return "\n".join(out)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _us(x) -> str:
    return "-" if x is None else f"{x * 1e6:.0f} us"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--seeds", type=int, default=3, help="prompt splits to train and evaluate")
    parser.add_argument("--quick", action="store_true", help="one split, no cold-cache replay, no ablation")
    args = parser.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    olmoe = Trace.load(args.traces / f"{OLMOE}.npz")
    others = {name: Trace.load(args.traces / f"{stem}.npz") for name, stem in OTHERS.items()}
    start = time.perf_counter()
    rows, per_seed, weights = scenarios(olmoe, others, 1 if args.quick else args.seeds, args.quick, log)
    result = {"machine": machine(), "scenarios": rows, "seeds": per_seed,
              "ablation": [] if args.quick else ablation(olmoe, others, log),
              "cost": inference_cost(olmoe, weights),
              "weights": {"params": weights.num_params, "per_layer_params": weights.pooled.num_params,
                          "bytes": SHIPPED_WEIGHTS.stat().st_size if SHIPPED_WEIGHTS.exists() else None},
              "config": TrainConfig().to_dict(), "seconds": round(time.perf_counter() - start)}
    write(args.out, "policy_heldout", result, tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
