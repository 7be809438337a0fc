"""The hardware simulator against the engine on this machine: simulated vs measured decode tokens/s, for
autoregressive offloading and for TIDE's block diffusion.

    python -m bench.sim_validation [--budgets 25%,50%,100%] [--policies lru,dali] [--sequences 1] [--max-tokens 96]
        [--tide-budgets 50%,25%] [--tide-taus 8] [--diffusion-model DIR] [--reps 3] [--threads 1]
        [--out bench/results]

The live side is bench/offload_speed.py's (the same OLMoE-shaped model with its router replaying the OLMoE trace,
batch 1, cold page cache, prefetch off, medians of `--reps` interleaved runs; 100% is its all-resident baseline, every
expert read before timing). The simulated side measures this machine into a hardware profile first
(`tiermoe profile`'s `measure_this_machine`, the disk measured with reads of one expert where the checkpoint lives,
the engine's own kernels and fixed costs on micro-benchmarks of its shipped models: tiermoe.sim.engine_probe),
then runs `tiermoe sim run`'s simulation of the same trace rows with the model's config.json, the same budget and
policy, no GPU and the same thread count. Nothing is fitted to the measured speeds: the profile is the only input
measured here. Reported: both tokens/s, their ratio, and both RAM hit rates (the live run's prompt is routed by the
random router, the simulator's has none, so the hit counts differ slightly; test_machine_sim.py checks them equal
when both see the same routing).

TIDE (diffusion): bench/tide_speed.py's configuration (the shipped diffusion model unless `--diffusion-model`, 2
prompts of 32 tokens, 96 new tokens, block 32, 32 steps, threshold 0.95, a fresh engine per run, the whole
`generate` timed) at each budget and fixed tau, and all experts resident. An untimed run of each configuration
records the engine's own routing (`generate(record_trace=...)`: every denoising forward's rows) and its store's
counts; the simulator replays that trace with strategy `tide` (TIDE on the RAM tier, the engine's RefreshStore) at
the same budget and tau, or all resident. Its hits, misses and streamed experts must equal the recorded run's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.llada2_model import default_trained, prompts
from bench.offload_speed import DEFAULT_TRACE, Config, build_model, decode_stats, summarise
from bench.report import machine, markdown_table, write
from tiermoe import LLM, SamplingParams
from tiermoe.offload.tiers.budget import parse_budget
from tiermoe.offload.tiers.ram import min_budget
from tiermoe.sim.hardware import measure_this_machine
from tiermoe.sim.machine_sim import SimConfig, simulate
from tiermoe.sim.model_shape import load_shape
from tiermoe.sim.trace import Trace


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--expert-dim", type=int, default=256)
    ap.add_argument("--budgets", default="25%,50%,100%")
    ap.add_argument("--policies", default="lru,dali")
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tide-budgets", default="50%,25%", help="TIDE: expert budgets ('' skips the TIDE part)")
    ap.add_argument("--tide-taus", default="8", help="TIDE: refresh intervals")
    ap.add_argument("--diffusion-model", type=Path, default=None, help="default: the shipped diffusion model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_sim_validation"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    trace = Trace.load(args.trace)
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = build_model(Path(tmp), trace, args.hidden, args.expert_dim)
        llm = LLM(folder)
        layers = [b.layer for b in llm.model.moe_blocks]
        expert_bytes = llm.index.expert(layers[0], 0).nbytes
        least = min_budget(llm.index, layers, llm.model.shape.top_k, llm.config.torch_dtype)
        del llm
        hw = measure_this_machine(Path(tmp), read_bytes=expert_bytes, file_mib=256)
        todo = configs(args)
        reps: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
        for _ in range(args.reps):
            for i, config in enumerate(todo):
                reps[i].append(decode_stats(folder, args.trace, list(range(args.sequences)), config,
                                            args.io_threads, args.max_tokens, least))
        shape = load_shape(folder).with_dtype("float32")
    expected = reps[0][0]["token_ids"]
    rows, runs = [], []
    for i, config in enumerate(todo):
        live = summarise(config, reps[i], expected)
        sim = simulate(trace.select_sequences(range(args.sequences)), shape, hw, sim_config(config, shape, args))
        n = sim.hits + sim.misses
        run = {"config": config.name, "budget": config.budget or "100%", "measured_tok_s": live["tok_s"],
               "simulated_tok_s": sim.tokens_per_s, "sim_over_measured": sim.tokens_per_s / live["tok_s"],
               "measured_hit_rate": live["hit_rate"], "simulated_hit_rate": sim.hits / n if n else 1.0,
               "measured_mib_read": live["mib_read"], "simulated_mib_read": sim.bytes_read / 2**20,
               "measured_times_s": live["all_decode_times_s"], "simulated": sim.to_dict()}
        runs.append(run)
        rows.append([run["config"], run["budget"], run["measured_tok_s"], run["simulated_tok_s"],
                     run["sim_over_measured"], run["measured_hit_rate"], run["simulated_hit_rate"],
                     run["measured_mib_read"], run["simulated_mib_read"],
                     "yes" if abs(run["sim_over_measured"] - 1) <= 0.15 else "**no**"])
    table = markdown_table(["configuration", "budget", "measured tok/s", "simulated tok/s", "sim / measured",
                            "measured hit rate", "simulated hit rate", "measured MiB read", "simulated MiB read",
                            "within 15%"], rows)
    table += (f"\n\nModel: OLMoE shape {trace.num_layers}x{trace.num_experts} top-{trace.top_k}, hidden {args.hidden}, "
              f"expert dim {args.expert_dim}, fp32; trace {args.trace.name}, sequences 0..{args.sequences - 1}, "
              f"{args.max_tokens} decode tokens each, batch 1, {args.threads} torch thread(s). Measured: medians of "
              f"{args.reps} interleaved runs. Simulated with the profile measured in the same run: CPU GEMV "
              f"{hw.cpu.gemv_gbs} GB/s, call {hw.cpu.call_us} us, disk {hw.ssd.rand_read_gbs} GB/s "
              f"(expert reads, 4 in flight), {hw.ssd.qd1_read_gbs} GB/s one at a time.")
    tide = tide_validation(args, hw) if _csv(args.tide_budgets) else []
    if tide:
        table += "\n\n" + tide_table(tide, args)
    write(args.out, "sim_validation", {"machine": machine(), "profile": hw.to_dict(), "runs": runs, "tide": tide},
          table)


def tide_configs(args) -> list[tuple[str, dict]]:
    """(name, engine options) of the TIDE part: all resident, then every budget at every tau."""
    return [("all-resident", {})] + [(f"{b} tide tau={t}", {"expert_cache": b, "tau": int(t)})
                                     for b in _csv(args.tide_budgets) for t in _csv(args.tide_taus)]


def tide_run(folder: Path, ids: list[list[int]], params: SamplingParams, options: dict,
             record: Path | None = None) -> dict:
    """One generate on a fresh engine (all-resident: every expert read first): seconds, tokens, the store's counts;
    with `record`, the routing trace written there (then untimed: recording costs time)."""
    llm = LLM(folder, **options)
    if not options:
        for layer, e in llm.index.experts():
            list(llm.store.fetch(layer, [e]))
    start = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=False, record_trace=record)
    seconds = time.perf_counter() - start
    stats = llm.store.stats
    out = {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "hits": stats.total.hits,
           "misses": stats.total.misses, "streamed": stats.streamed, "budget_bytes": getattr(llm.store, "budget", 0),
           "token_ids": [o.outputs[0].token_ids for o in outs], "dtype": str(llm.config.torch_dtype)}
    llm.store.close()
    return out


def tide_validation(args, hw) -> list[dict]:
    """Measured (medians of `--reps` interleaved runs) against simulated, per TIDE configuration."""
    folder = args.diffusion_model or default_trained()
    if folder is None:
        raise SystemExit("no diffusion model ships with this install: pass --diffusion-model DIR")
    params = SamplingParams(temperature=0, max_tokens=96, block_length=32, steps=32, threshold=0.95,
                            ignore_eos=True)
    probe = LLM(folder)
    ids = prompts(probe, 2, 32)
    del probe
    todo = tide_configs(args)
    recorded = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name, options in todo:  # untimed: the routing and the store's counts of each configuration
            path = Path(tmp) / name.replace(" ", "_").replace("%", "pct").replace("=", "")
            recorded[name] = (tide_run(folder, ids, params, options, path), Trace.load(path))
    timed: dict[str, list[dict]] = {name: [] for name, _ in todo}
    for _ in range(args.reps):
        for name, options in todo:
            timed[name].append(tide_run(folder, ids, params, options))
    expected = recorded["all-resident"][0]["token_ids"]
    out = []
    for name, options in todo:
        live, trace = recorded[name]
        mid = sorted(timed[name], key=lambda r: r["seconds"])[len(timed[name]) // 2]
        shape = load_shape(folder).with_dtype(live["dtype"].removeprefix("torch."))
        tau = options.get("tau", 8)
        cfg = (SimConfig("tide", gpu_memory=0, expert_cache=live["budget_bytes"], tau=tau, threads=args.threads)
               if options else SimConfig("tiermoe", gpu_memory=0, expert_cache=shape.total_expert_bytes,
                                         threads=args.threads, preload=True))
        sim = simulate(trace, shape, hw, cfg)
        measured = mid["tokens"] / mid["seconds"]
        out.append({"config": name, "budget": options.get("expert_cache", "100%"), "tau": options.get("tau"),
                    "measured_tok_s": measured, "simulated_tok_s": sim.tokens_per_s,
                    "sim_over_measured": sim.tokens_per_s / measured, "measured_times_s": [r["seconds"] for r in
                                                                                           timed[name]],
                    "live": {k: live[k] for k in ("hits", "misses", "streamed")},
                    "simulated_counts": {"hits": sim.hits, "misses": sim.misses, "streamed": sim.streamed},
                    "counts_equal": (sim.hits, sim.misses, sim.streamed) == (live["hits"], live["misses"],
                                                                               live["streamed"]),
                    "same_tokens": all(r["token_ids"] == expected for r in [live, *timed[name]]),
                    "model": str(Path(folder).name), "forwards": int(trace.meta.get("forwards", 0)),
                    "simulated": sim.to_dict()})
    return out


def tide_table(rows: list[dict], args) -> str:
    table = markdown_table(
        ["TIDE configuration", "measured tok/s", "simulated tok/s", "sim / measured", "live hits / misses / streamed",
         "simulated hits / misses / streamed", "counts equal", "same tokens", "within 15%"],
        [[r["config"], r["measured_tok_s"], r["simulated_tok_s"], r["sim_over_measured"],
          "{hits} / {misses} / {streamed}".format(**r["live"]),
          "{hits} / {misses} / {streamed}".format(**r["simulated_counts"]), "yes" if r["counts_equal"] else "**no**",
          "yes" if r["same_tokens"] else "**no**", "yes" if abs(r["sim_over_measured"] - 1) <= 0.15 else "**no**"]
         for r in rows])
    return table + (f"\n\nTIDE: model {rows[0]['model']}, bench/tide_speed.py's setting (2 prompts of 32 tokens, 96 "
                    f"new tokens, block 32, 32 steps, threshold 0.95; {rows[0]['forwards']} batched forwards), a fresh "
                    f"engine per run, the whole generate timed; medians of {args.reps} interleaved runs. Simulated: "
                    "the engine's own routing recorded in an untimed run of the same configuration, replayed with "
                    "strategy tide (the RAM tier placed by TIDE's refresh) at the same budget and tau, with the "
                    "profile above.")


def configs(args) -> list[Config]:
    out = []
    for budget in _csv(args.budgets):
        if budget == "100%":
            out.append(Config("all-resident", None))
        else:
            out += [Config(policy, budget, policy) for policy in _csv(args.policies)]
    return out


def sim_config(config: Config, shape, args) -> SimConfig:
    budget = shape.total_expert_bytes if config.budget is None else parse_budget(config.budget,
                                                                                 shape.total_expert_bytes)
    return SimConfig("tiermoe", gpu_memory=0, expert_cache=budget, cache_policy=config.policy or "lru",
                     threads=args.threads, max_tokens=args.max_tokens, preload=config.budget is None)


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


if __name__ == "__main__":
    main()
