"""Decision cost of each cache policy per step, against the time of one expert read.

    python -m bench.policy_cost [--trace ../shared/traces/olmoe-1b-7b-0924_decode_wikitext-mbpp.npz]
        [--tokens 1000] [--capacity 25%] [--reps 3] [--expert-bytes 1572864] [--out bench/results]

A step is one MoE layer's forward of one token: the live store asks its cache for that layer's top-k experts
(`ExpertCache.request`: the policy's `on_access` per expert, `victim` per eviction) and admits what the policy
proposes (`ExpertCache.propose`). The replay here is the live store's: one cache over all layers, `(layer, expert)`
keys, capacity a share of all experts, fed the trace's decode tokens in order. No weights move, so the time is the
decision cost alone (the policy plus the cache's bookkeeping, which every policy shares). Policies run interleaved,
`--reps` rounds; medians over rounds. The expert read is measured in the same run: cold O_DIRECT reads of
`--expert-bytes` from a scratch file, one at a time (default: the OLMoE-shaped model of bench/offload_speed.py,
3 x 512 x 256 fp32 = 1.5 MiB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import machine, markdown_table, write
from tiermoe.offload.policies import make_policy
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.offload.tiers.direct_io import DirectReader, drop_page_cache
from tiermoe.sim.cache_sim import Capacity
from tiermoe.sim.trace import Trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEFAULT_TRACE = SHARED / "olmoe-1b-7b-0924_decode_wikitext-mbpp.npz"
LIVE_POLICIES = ("lru", "lfu", "dali", "learned")
EXPERT_BYTES = 3 * 512 * 256 * 4  # gate, up, down of the OLMoE-shaped replay model, fp32


def live_requests(trace: Trace, tokens: int) -> list[list[tuple[int, int]]]:
    """The first `tokens` decode tokens as the live store asks: one request per (token, layer), router rank order."""
    rows = trace.decode_rows()[:tokens]
    experts = trace.experts[rows]  # [T, L, K]
    return [[(layer, int(e)) for e in experts[t, layer] if e >= 0]
            for t in range(len(rows)) for layer in range(trace.num_layers)]


def time_policy(name: str, requests: list, capacity: int) -> dict:
    """Replays `requests` through a fresh cache with policy `name`; per-step and per-eviction times.

    Wall time and this process's CPU time are both taken: on a shared machine the wall time also counts the time
    other processes held the core, the CPU time does not.
    """
    policy = make_policy(name)
    victim, victim_cpu = policy.victim, [0.0]
    cpu = time.process_time

    def timed_victim(candidates, step):
        start = cpu()
        key = victim(candidates, step)
        victim_cpu[0] += cpu() - start
        return key

    policy.victim = timed_victim  # an instance attribute: the cache calls it in place of the method
    cache = ExpertCache(capacity, policy)
    wall, cpu_steps = np.empty(len(requests)), np.empty(len(requests))
    evictions = 0
    clock = time.perf_counter
    for step, keys in enumerate(requests):
        start, start_cpu = clock(), cpu()
        out = cache.request(keys, step)
        proposed = cache.propose(step, keys)
        cpu_steps[step], wall[step] = cpu() - start_cpu, clock() - start
        evictions += len(out.evicted) + len(proposed.evicted)
    return {"step_cpu_mean_s": float(cpu_steps.mean()), "step_wall_mean_s": float(wall.mean()),
            "step_wall_median_s": float(np.median(wall)), "step_wall_p99_s": float(np.percentile(wall, 99)),
            "victim_cpu_s": victim_cpu[0] / max(evictions, 1), "evictions_per_step": evictions / len(requests)}


def expert_read_time(nbytes: int, workdir: Path, reads: int = 32) -> float:
    """Median time of one cold O_DIRECT read of `nbytes` (page-rounded), one read at a time."""
    nbytes = -(-nbytes // 4096) * 4096
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "experts.bin"
        with open(path, "wb") as f:
            for _ in range(reads):
                f.write(os.urandom(nbytes))
            f.flush()
            os.fsync(f.fileno())
        drop_page_cache(path)
        times = []
        with DirectReader(max_workers=1) as reader:
            for i in range(reads):
                start = time.perf_counter()
                reader.read(path, i * nbytes, nbytes).release()
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--tokens", type=int, default=1000, help="decode tokens replayed (each is one step per layer)")
    ap.add_argument("--capacity", default="25%", help="share of all experts the cache holds (default: %(default)s)")
    ap.add_argument("--policies", default=",".join(LIVE_POLICIES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--expert-bytes", type=int, default=EXPERT_BYTES)
    ap.add_argument("--workdir", type=Path, default=Path("runs"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    trace = Trace.load(args.trace)
    requests = live_requests(trace, args.tokens)
    capacity = Capacity.parse(args.capacity).items_for(trace.num_layers * trace.num_experts)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    reps = {p: [] for p in policies}
    for _ in range(args.reps):  # interleaved: every policy once per round
        for p in policies:
            reps[p].append(time_policy(p, requests, capacity))
    args.workdir.mkdir(parents=True, exist_ok=True)
    read_s = expert_read_time(args.expert_bytes, args.workdir)
    runs = [{"policy": p, **{k: statistics.median(r[k] for r in reps[p]) for k in reps[p][0]}, "reps": reps[p]}
            for p in policies]
    result = {"machine": machine(), "trace": trace.name, "tokens": args.tokens, "steps": len(requests),
              "capacity": args.capacity, "capacity_experts": capacity, "expert_bytes": args.expert_bytes,
              "expert_read_s": read_s, "runs": runs}
    write(args.out, "policy_cost", result, table(result))
    return 0


def table(result: dict) -> str:
    read = result["expert_read_s"]
    rows = [[r["policy"], f"{r['step_cpu_mean_s'] * 1e6:.1f}", f"{r['step_wall_mean_s'] * 1e6:.1f}",
             f"{r['step_wall_median_s'] * 1e6:.1f}", f"{r['step_wall_p99_s'] * 1e6:.1f}",
             f"{r['victim_cpu_s'] * 1e6:.1f}", f"{r['evictions_per_step']:.2f}",
             f"{100 * r['step_cpu_mean_s'] / read:.1f}%"] for r in result["runs"]]
    head = ["policy", "CPU us/step (mean)", "wall us/step (mean)", "wall us/step (median)", "wall us/step (p99)",
            "CPU us/eviction", "evictions/step", "CPU per step / expert read"]
    rounds, mib = len(result["runs"][0]["reps"]), result["expert_bytes"] / 2**20
    return (markdown_table(head, rows) +
            f"\n\nOne step: one MoE layer's request of its top-k experts plus the policy's proposals, as the live "
            f"store makes it (one cache over all layers, {result['capacity_experts']} experts = {result['capacity']}"
            f"); {result['steps']} steps ({result['tokens']} decode tokens of {result['trace']}), medians of "
            f"{rounds} interleaved rounds. CPU time is the process's own (steadier than wall time on a shared "
            f"machine). One expert read ({mib:.2f} MiB, cold O_DIRECT, measured in the same run): {read * 1e6:.0f} us.")


if __name__ == "__main__":
    raise SystemExit(main())
