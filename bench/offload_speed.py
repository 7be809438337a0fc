"""Decode speed of every live cache policy under expert budgets, replaying a real routing trace on a model of its shape.

    python -m bench.offload_speed [--trace ../shared/traces/olmoe-1b-7b-0924_decode_wikitext-mbpp.npz]
        [--hidden 512 --expert-dim 256] [--sequences 3] [--reps 3] [--policies lru,lfu,dali,learned]
        [--budgets 25%,50%] [--max-tokens N] [--perfect-prefetch lru] [--affinity dali --split 0.5]
        [--python-reads dali]
        [--out bench/results] [--name offload_speed]
    smoke check (under a minute): --hidden 64 --expert-dim 32 --sequences 1 --reps 1 --max-tokens 16 --threads 1

The model is OLMoE-1B-7B's shape (16 MoE layers, 64 experts, top-8) with the width scaled down and random weights,
written with transformers and converted to the aligned layout; its router's choices come from the trace
(`LLM.replay`), so it does exactly the expert I/O the real model did on those prompts. Every run starts from a cold
page cache; the configurations run in turn within each repetition (each repetition starting at another one), so they
share the machine's moments alike:
all-resident (the compute baseline), on-demand (the minimum budget: one token's top-k of one layer, so nearly every
expert is read on every use), then each policy at each budget. Reported per configuration: median decode tokens/s
(batch 1), hit rate, MiB read, I/O stall, whether every run produced the all-resident run's tokens, and the bound:
the time the bytes read need at the disk's bandwidth, or the all-resident compute time if larger;
achieved/bound = bound time / measured time. The bandwidth is that of cold direct reads of one expert each at random
experts of the checkpoint, `--io-threads` at a time (what decode does), measured in every repetition (the median is
used); the table of it at 1-16 reads in flight is in the JSON.

NOTE: the replayed routers are random, so no prefetcher that applies the next router (`residual`, `plain`) can
foresee the traced routing here, and without one a batch-1 decode must read a layer's misses after its router: no
read can overlap the attention before it or the lm_head. The `affinity` prefetcher predicts from the experts this
layer picked (the traced ones), so it works on a replay: `--affinity POLICY --split 0.5` adds rows with it, its table
fitted on the trace's training prompts (`tiermoe prefetch train`; pass its file with --affinity-table to skip the
fit) while every configuration replays held-out prompts. `--perfect-prefetch POLICY` adds rows where the store is
told each next layer's traced experts as the current layer starts (what a perfect predictor would say): an upper
bound on what prefetching within a token can add, not a setting a user can run. `--python-reads POLICY` adds rows
whose reads run on Python threads (the store's fallback when the native readers, tiers/native_reads.py, cannot
build): the baseline, in the same run, of what the native readers change.

    affinity rows (bench/results/offload_speed_prefetch.md):
    tiermoe prefetch train --trace TRACE --split 0.5 --seed 0 --out runs/affinity.safetensors
    python -m bench.offload_speed --sequences 2 --threads 1 --policies dali,learned --affinity dali,learned \
        --perfect-prefetch learned --split 0.5 --affinity-table runs/affinity.safetensors --name offload_speed_prefetch
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.report import machine, markdown_table, write
from tiermoe import LLM
from tiermoe.convert import convert
from tiermoe.decode.routing import RoutingReplay
from tiermoe.offload.placement.costs import read_rate
from tiermoe.offload.prefetch import AFFINITY_FILE, AffinityTable
from tiermoe.offload.tiers.direct_io import drop_page_cache
from tiermoe.offload.tiers.ram import min_budget
from tiermoe.offload.tools.learned_train import split_sequences
from tiermoe.offload.tools.prefetch_cli import fit_affinity
from tiermoe.sim.trace import Trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEFAULT_TRACE = SHARED / "olmoe-1b-7b-0924_decode_wikitext-mbpp.npz"
DEPTHS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Config:
    name: str
    budget: str | None  # None: all-resident; "min": the smallest budget the engine takes
    policy: str | None = None
    perfect_prefetch: bool = False
    prefetch: str = "off"  # the engine's prefetcher ("affinity": its table fitted on the trace's training prompts)
    python_reads: bool = False  # reads on Python threads, not the native readers (TIERMOE_NATIVE_IO=off)


def build_model(folder: Path, trace: Trace, hidden: int, expert_dim: int, keep_source: bool = False) -> Path:
    """An OLMoE-architecture checkpoint with the trace's layers/experts/top-k, written by transformers and converted
    (the transformers checkpoint stays in folder/hf with `keep_source`)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=50304, hidden_size=hidden, intermediate_size=expert_dim,
                         num_hidden_layers=trace.num_layers, num_attention_heads=8, num_key_value_heads=8,
                         num_experts=trace.num_experts, num_experts_per_tok=trace.top_k,
                         max_position_embeddings=4096)
    src = folder / "hf"
    OlmoeForCausalLM(config).save_pretrained(src)
    dst = convert(src, folder / "aligned")
    if not keep_source:
        shutil.rmtree(src)
    return dst


def drop_caches(folder: Path) -> None:
    """Cold start: evict the checkpoint from the page cache (all caches when root)."""
    for f in folder.iterdir():
        drop_page_cache(f)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def disk_bandwidth(path: Path, chunk: int, depth: int, reads: int = 128, seed: int = 0) -> float:
    """Cold direct-read bandwidth in bytes/s: `reads` reads of `chunk` bytes at random chunk-aligned offsets of
    `path` (one expert each in the converted layout), `depth` in flight."""
    drop_page_cache(path)
    return read_rate(path, random.Random(seed).sample(range(0, path.stat().st_size - chunk + 1, chunk), reads), chunk,
                     depth)


class PerfectPrefetch:
    """Bench only: "predicts" each next MoE layer's experts from the replayed trace (its exact routing)."""

    def __init__(self, replay: RoutingReplay, layers: list[int]):
        self.replay, self.next = replay, dict(zip(layers, layers[1:], strict=False))

    def predict(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> tuple[int, list[int]] | None:
        nxt = self.next.get(layer)
        if nxt is None or len(self.replay._sel) == 0:
            return None
        return nxt, torch.unique(self.replay._ids[:, self.replay.layer_index[nxt]]).tolist()


def decode_stats(folder: Path, trace_path: Path, sequences: list[int], config: Config, io_threads: int,
                 max_tokens: int | None = None, least: int | None = None) -> dict:
    """Replay the sequences one after another (batch 1) from a cold page cache; decode-phase time, I/O and tokens.

    The all-resident baseline loads every expert before timing starts; budget "min" is `least` bytes.
    """
    drop_caches(folder)
    budget = least if config.budget == "min" else config.budget
    os.environ["TIERMOE_NATIVE_IO"] = "off" if config.python_reads else "on"
    # residual/plain prefetch off: the replayed routing is not the random routers' (see the NOTE above)
    offload = {} if budget is None else {"prefetch": config.prefetch, "cache_policy": config.policy}
    llm = LLM(folder, expert_cache=budget, io_threads=io_threads, **offload)
    if budget is None:
        for layer, e in llm.index.experts():
            list(llm.store.fetch(layer, [e]))
    total = {"hits": 0, "misses": 0, "bytes_read": 0, "stall_time_s": 0.0, "decode_time_s": 0.0, "tokens": 0,
             "prefetched": 0, "streamed": 0}
    token_ids = []
    for seq in sequences:
        out = _replay_decode_only(llm, trace_path, seq, max_tokens, config.perfect_prefetch)
        token_ids.append(out.pop("token_ids"))
        for key in total:
            total[key] += out[key]
    llm.store.close()
    return {**total, "token_ids": token_ids}


def _replay_decode_only(llm: LLM, trace_path: Path, seq: int, max_tokens: int | None,
                        perfect_prefetch: bool = False) -> dict:
    """Replay one sequence; statistics are reset when its first token is out, so they cover decode only."""
    from tiermoe.engine import model_runner as autoregressive
    from tiermoe.offload.tiers.stats import StoreStats
    from tiermoe.sampling_params import SamplingParams

    replay = RoutingReplay(llm.model, Trace.load(trace_path))
    if perfect_prefetch:
        oracle = PerfectPrefetch(replay, [b.layer for b in llm.model.moe_blocks])
        for block in llm.model.moe_blocks:
            block.prefetcher = oracle
    prompt, traced = replay.prompts(llm.model.shape.vocab_size)[seq]
    params = SamplingParams(temperature=0, max_tokens=min(traced, max_tokens or traced), ignore_eos=True)
    s = llm._make_sequence(prompt, params)
    replay.sequence_of[s.request_id] = seq
    with torch.inference_mode():
        autoregressive.step(llm.model, [s], None, replay)  # prefill + first token
        llm.store.stats = StoreStats()
        start = time.perf_counter()
        while not s.finished:
            autoregressive.step(llm.model, [s], None, replay)
        elapsed = time.perf_counter() - start
    llm._detach_observer()
    stats = llm.store.stats
    t = stats.total
    return {"hits": t.hits, "misses": t.misses, "bytes_read": t.bytes_read, "stall_time_s": t.stall_time,
            "decode_time_s": elapsed, "tokens": len(s.output_ids) - 1, "token_ids": list(s.output_ids),
            "prefetched": stats.prefetched, "streamed": getattr(stats, "streamed", 0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--expert-dim", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=3, help="trace sequences replayed (batch 1, one after another)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--policies", default="lru,lfu,dali,learned", help="live cache policies (default: %(default)s)")
    ap.add_argument("--budgets", default="25%,50%", help="expert budgets (default: %(default)s)")
    ap.add_argument("--perfect-prefetch", default="", help="policies to run again with the trace's next-layer "
                                                           "routing as prefetch (an upper bound; default: none)")
    ap.add_argument("--python-reads", default="", help="policies to run again with their reads on Python threads "
                                                       "instead of the native readers (default: none)")
    ap.add_argument("--affinity", default="", help="policies to run again with the affinity prefetcher, its table "
                                                   "fitted on the training prompts of --split (default: none)")
    ap.add_argument("--split", type=float, default=None,
                    help="replay held-out prompts: the sequences outside a seeded (--seed) share SPLIT of the trace's, "
                         "the same choice as `tiermoe policy train --split` (the shipped learned weights: 0.5, seed 0)"
                         "; default: the trace's first sequences")
    ap.add_argument("--seed", type=int, default=0, help="seed of --split (default: %(default)s)")
    ap.add_argument("--affinity-table", type=Path, default=None,
                    help="the table `tiermoe prefetch train --trace TRACE --split SPLIT --seed SEED --out FILE` wrote "
                         "(default: fitted here, the same way)")
    ap.add_argument("--max-tokens", type=int, default=None, help="decode tokens per sequence (default: as traced)")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_offload"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="offload_speed", help="results file name (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.affinity and args.split is None:
        ap.error("--affinity needs --split: the table is fitted on training prompts and held-out ones are replayed")
    if args.threads:
        torch.set_num_threads(args.threads)
    trace = Trace.load(args.trace)
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = build_model(Path(tmp), trace, args.hidden, args.expert_dim)
        results = measure_all(folder, args, trace)
    rows = [[r["config"], r["budget"], r["tok_s"], r["ratio_vs_resident"], r["ratio_vs_on_demand"], r["hit_rate"],
             r["mib_read"], r["stall_s"], r["bound_tok_s"], r["achieved_over_bound"],
             "yes" if r["same_tokens"] else "**NO**"] for r in results["runs"]]
    table = markdown_table(["configuration", "budget", "decode tok/s", "vs resident", "vs on-demand", "hit rate",
                            "MiB read", "I/O stall s", "bound tok/s", "achieved/bound", "same tokens"], rows)
    depths = ", ".join(f"{d}: {gb:.2f}" for d, gb in results["disk_gb_s_by_depth"].items())
    table += (f"\n\nModel: {results['model']}. Trace: {args.trace.name}, sequences {results['sequences']}, "
              f"{results['decode_tokens']} decode tokens. Disk: {results['disk_gb_s']:.2f} GB/s cold direct reads of "
              f"one expert at random offsets, {args.io_threads} in flight (median of {args.reps}; GB/s by reads in "
              f"flight: {depths}). Medians of {args.reps} repetitions, every configuration once per repetition "
              f"in turn, each repetition starting at another configuration.")
    if results["affinity"]:
        a = results["affinity"]
        h = a["heldout"]
        table += (f" Affinity prefetch: table fitted on the training prompts of a {args.split} split (seed "
                  f"{args.seed}), top-{a['settings']['top_p']} scoring at least {a['settings']['min_prob']}, smoothing "
                  f"{a['settings']['smoothing']}, "
                  f"{a['settings']['combine']} (chosen on validation prompts); on the held-out prompts it predicts "
                  f"the next layer's experts with precision {h['precision']:.3f}, recall {h['recall']:.3f}.")
    write(args.out, args.name, {"machine": machine(), **results}, table)


def configs(args) -> list[Config]:
    out = [Config("all-resident", None), Config("on-demand", "min", "lru")]
    out += [Config(policy, budget, policy) for budget in _csv(args.budgets) for policy in _csv(args.policies)]
    out += [Config(f"{policy} + perfect prefetch", budget, policy, True) for budget in _csv(args.budgets)
            for policy in _csv(args.perfect_prefetch)]
    out += [Config(f"{policy} + affinity prefetch", budget, policy, prefetch="affinity")
            for budget in _csv(args.budgets) for policy in _csv(args.affinity)]
    out += [Config(f"{policy}, Python readers", budget, policy, python_reads=True)
            for budget in _csv(args.budgets) for policy in _csv(args.python_reads)]
    return out


def measure_all(folder: Path, args, trace: Trace) -> dict:
    llm = LLM(folder)
    layers = [b.layer for b in llm.model.moe_blocks]
    expert_bytes = llm.index.expert(layers[0], 0).nbytes
    least = min_budget(llm.index, layers, llm.model.shape.top_k, llm.config.torch_dtype)
    del llm
    experts_file = folder / "experts.bin"
    by_depth = {d: statistics.median(disk_bandwidth(experts_file, expert_bytes, d, seed=i) for i in range(3)) / 1e9
                for d in DEPTHS}
    sequences, affinity = replayed(trace, args), None
    todo = configs(args)
    if any(c.prefetch == "affinity" for c in todo):
        table, affinity = affinity_table(trace, args)
        table.save(folder / AFFINITY_FILE)  # where `prefetch="affinity"` finds it
    reps: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
    bandwidths = []
    for rep in range(args.reps):  # interleaved: each configuration once per repetition
        bandwidths.append(disk_bandwidth(experts_file, expert_bytes, args.io_threads, seed=100 + rep))
        # each repetition starts at another configuration: a disk whose speed drifts within a repetition (this
        # machine's does) favours none of them
        shift = rep * len(todo) // args.reps
        for i in [*range(shift, len(todo)), *range(shift)]:
            config = todo[i]
            reps[i].append(decode_stats(folder, args.trace, sequences, config, args.io_threads, args.max_tokens,
                                        least))
    bandwidth = statistics.median(bandwidths)
    expected = reps[0][0]["token_ids"]
    runs = [summarise(config, reps[i], expected) for i, config in enumerate(todo)]
    compute_time, on_demand = runs[0]["decode_time_s"], runs[1]["tok_s"]
    for r in runs:
        bound_time = max(r["bytes_read"] / bandwidth, compute_time)
        r["bound_tok_s"] = r["tokens"] / bound_time
        r["achieved_over_bound"] = bound_time / r["decode_time_s"]
        r["ratio_vs_resident"] = r["tok_s"] / runs[0]["tok_s"]
        r["ratio_vs_on_demand"] = r["tok_s"] / on_demand
    return {"model": f"OLMoE shape {trace.num_layers}x{trace.num_experts} top-{trace.top_k}, hidden {args.hidden}, "
                     f"expert dim {args.expert_dim}, fp32, {expert_bytes / 2**20:.2f} MiB per expert",
            "sequences": sequences, "decode_tokens": runs[0]["tokens"], "disk_gb_s": bandwidth / 1e9,
            "disk_gb_s_each_rep": [b / 1e9 for b in bandwidths], "disk_gb_s_by_depth": by_depth,
            "io_threads": args.io_threads, "split": args.split, "affinity": affinity, "runs": runs}


def affinity_table(trace: Trace, args) -> tuple[AffinityTable, dict]:
    """The affinity table fitted on the --split's training prompts (read from --affinity-table when given: fitting
    takes minutes), and its report."""
    if args.affinity_table is None:
        return fit_affinity([trace], args.split, seed=args.seed)
    table = AffinityTable.load(args.affinity_table)
    split = table.info.get("split", {})
    if (table.info.get("traces"), split.get("fraction"), split.get("seed")) != ([trace.name], args.split, args.seed):
        raise SystemExit(f"{args.affinity_table} was not fitted on {trace.name} with split {args.split}, seed "
                         f"{args.seed}: its held-out prompts are not the ones replayed")
    return table, table.info


def replayed(trace: Trace, args) -> list[int]:
    """The trace sequences to replay: the first ones, or the first held-out ones of a --split."""
    if args.split is None:
        return list(range(args.sequences))
    _, _, train = split_sequences(trace, args.split, args.seed)
    return [s for s in range(trace.num_sequences) if s not in set(train)][:args.sequences]


def summarise(config: Config, reps: list[dict], expected: list[list[int]]) -> dict:
    """Median over repetitions of decode time; the I/O of the median run; whether every run gave `expected`."""
    mid = sorted(reps, key=lambda r: r["decode_time_s"])[len(reps) // 2]
    requested = mid["hits"] + mid["misses"]
    return {"config": config.name, "policy": config.policy, "budget": config.budget or "all",
            "perfect_prefetch": config.perfect_prefetch, "prefetch": config.prefetch,
            "python_reads": config.python_reads,
            "tok_s": mid["tokens"] / mid["decode_time_s"], "tokens": mid["tokens"],
            "decode_time_s": mid["decode_time_s"], "all_decode_times_s": [r["decode_time_s"] for r in reps],
            "hit_rate": mid["hits"] / requested if requested else 1.0, "bytes_read": mid["bytes_read"],
            "mib_read": mid["bytes_read"] / 2**20, "stall_s": mid["stall_time_s"], "prefetched": mid["prefetched"],
            "streamed": mid["streamed"], "same_tokens": all(r["token_ids"] == expected for r in reps)}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    main()
