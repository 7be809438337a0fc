"""The hardware simulator against the engine on this machine: simulated vs measured decode tokens/s.

    python -m bench.sim_validation [--budgets 25%,50%,100%] [--policies lru,dali] [--sequences 1] [--max-tokens 96]
        [--reps 3] [--threads 1] [--out bench/results]

The live side is bench/offload_speed.py's (the same OLMoE-shaped model with its router replaying the OLMoE trace,
batch 1, cold page cache, prefetch off, medians of `--reps` interleaved runs; 100% is its all-resident baseline, every
expert read before timing). The simulated side measures this machine into a hardware profile first
(`tiermoe profile`'s `measure_this_machine`, the disk measured with reads of one expert where the checkpoint lives),
then runs `tiermoe sim run`'s simulation of the same trace rows with the model's config.json, the same budget and
policy, no GPU and the same thread count. Nothing is fitted to the measured speeds: the profile is the only input
measured here. Reported: both tokens/s, their ratio, and both RAM hit rates (the live run's prompt is routed by the
random router, the simulator's has none, so the hit counts differ slightly; test_machine_sim.py checks them equal
when both see the same routing).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.offload_speed import DEFAULT_TRACE, Config, build_model, decode_stats, summarise
from bench.report import machine, markdown_table, write
from tiermoe import LLM
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
    write(args.out, "sim_validation", {"machine": machine(), "profile": hw.to_dict(), "runs": runs}, table)


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
