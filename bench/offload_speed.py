"""Decode speed of every live cache policy under expert budgets, replaying a real routing trace on a model of its shape.

    python -m bench.offload_speed [--trace ../shared/traces/olmoe-1b-7b-0924_decode_wikitext-mbpp.npz]
        [--hidden 512 --expert-dim 256] [--sequences 3] [--reps 3] [--policies lru,lfu,dali,learned]
        [--budgets 25%,50%] [--max-tokens N] [--out bench/results]
    smoke check (under a minute): --hidden 64 --expert-dim 32 --sequences 1 --reps 1 --max-tokens 16 --threads 1

The model is OLMoE-1B-7B's shape (16 MoE layers, 64 experts, top-8) with the width scaled down and random weights,
written with transformers and converted to the aligned layout; its router's choices come from the trace
(`LLM.replay`), so it does exactly the expert I/O the real model did on those prompts. Every run starts from a cold
page cache; the configurations (all-resident, then each policy at each budget) run in turn within each repetition,
so they share the machine's moments alike. Reported per configuration: median decode tokens/s (batch 1), hit rate,
MiB read, I/O stall, whether every run produced the all-resident run's tokens, and the bound: the time the missed
bytes need at the disk's direct-read bandwidth measured in the same run, or the all-resident compute time if
larger; achieved/bound = bound time / measured time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.report import machine, markdown_table, write
from tiermoe import LLM
from tiermoe.convert import convert
from tiermoe.offload.direct_io import DirectReader, drop_page_cache
from tiermoe.sim.trace import Trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEFAULT_TRACE = SHARED / "olmoe-1b-7b-0924_decode_wikitext-mbpp.npz"


def build_model(folder: Path, trace: Trace, hidden: int, expert_dim: int) -> Path:
    """An OLMoE-architecture checkpoint with the trace's layers/experts/top-k, written by transformers."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=50304, hidden_size=hidden, intermediate_size=expert_dim,
                         num_hidden_layers=trace.num_layers, num_attention_heads=8, num_key_value_heads=8,
                         num_experts=trace.num_experts, num_experts_per_tok=trace.top_k,
                         max_position_embeddings=4096)
    src = folder / "hf"
    OlmoeForCausalLM(config).save_pretrained(src)
    dst = convert(src, folder / "aligned")
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


def disk_bandwidth(path: Path, chunk: int, threads: int, total: int = 512 << 20) -> float:
    """Cold direct-read bandwidth in bytes/s, expert-sized reads on `threads` threads."""
    drop_page_cache(path)
    size = min(total, path.stat().st_size)
    ranges = [(path, off, chunk) for off in range(0, size - chunk, chunk)]
    with DirectReader(max_workers=threads) as reader:
        start = time.perf_counter()
        for i in range(0, len(ranges), threads * 2):
            for seg in reader.read_many(ranges[i:i + threads * 2]):
                seg.release()
        return len(ranges) * chunk / (time.perf_counter() - start)


def decode_stats(folder: Path, trace_path: Path, sequences: list[int], budget, policy: str, io_threads: int,
                 max_tokens: int | None = None) -> dict:
    """Replay the sequences one after another (batch 1) from a cold page cache; decode-phase time, I/O and tokens.

    budget None is the all-resident baseline: every expert is loaded before timing starts.
    """
    drop_caches(folder)
    llm = LLM(folder, expert_cache=budget, cache_policy=policy if budget is not None else None, io_threads=io_threads)
    if budget is None:
        for layer, e in llm.index.experts():
            list(llm.store.fetch(layer, [e]))
    total = {"hits": 0, "misses": 0, "bytes_read": 0, "stall_time_s": 0.0, "decode_time_s": 0.0, "tokens": 0}
    token_ids = []
    for seq in sequences:
        out = _replay_decode_only(llm, trace_path, seq, max_tokens)
        token_ids.append(out.pop("token_ids"))
        for key in total:
            total[key] += out[key]
    llm.store.close()
    return {**total, "token_ids": token_ids}


def _replay_decode_only(llm: LLM, trace_path: Path, seq: int, max_tokens: int | None) -> dict:
    """Replay one sequence; statistics are reset when its first token is out, so they cover decode only."""
    from tiermoe.decode import autoregressive
    from tiermoe.decode.routing import RoutingReplay
    from tiermoe.offload.stats import StoreStats
    from tiermoe.sampling_params import SamplingParams

    replay = RoutingReplay(llm.model, Trace.load(trace_path))
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
    t = llm.store.stats.total
    return {"hits": t.hits, "misses": t.misses, "bytes_read": t.bytes_read, "stall_time_s": t.stall_time,
            "decode_time_s": elapsed, "tokens": len(s.output_ids) - 1, "token_ids": list(s.output_ids)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--expert-dim", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=3, help="trace sequences replayed (batch 1, one after another)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--policies", default="lru,lfu,dali,learned", help="live cache policies (default: %(default)s)")
    ap.add_argument("--budgets", default="25%,50%", help="expert budgets (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=None, help="decode tokens per sequence (default: as traced)")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_offload"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    trace = Trace.load(args.trace)
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = build_model(Path(tmp), trace, args.hidden, args.expert_dim)
        results = measure_all(folder, args, trace)
    rows = [[r["policy"], r["budget"], r["tok_s"], r["ratio_vs_resident"], r["hit_rate"], r["mib_read"], r["stall_s"],
             r["bound_tok_s"], r["achieved_over_bound"], "yes" if r["same_tokens"] else "**NO**"]
            for r in results["runs"]]
    table = markdown_table(["policy", "budget", "decode tok/s", "vs resident", "hit rate", "MiB read", "I/O stall s",
                            "bound tok/s", "achieved/bound", "same tokens"], rows)
    table += (f"\n\nModel: {results['model']}. Trace: {args.trace.name}, sequences {results['sequences']}, "
              f"{results['decode_tokens']} decode tokens. Disk: {results['disk_gb_s']:.2f} GB/s cold direct reads. "
              f"Medians of {args.reps} repetitions, every configuration once per repetition in turn.")
    write(args.out, "offload_speed", {"machine": machine(), **results}, table)


def measure_all(folder: Path, args, trace: Trace) -> dict:
    llm = LLM(folder)
    expert_bytes = llm.index.expert(llm.model.moe_blocks[0].layer, 0).nbytes
    del llm
    bandwidth = disk_bandwidth(folder / "experts.bin", expert_bytes, args.io_threads)
    sequences = list(range(args.sequences))
    configs = [("all-resident", None, "lru")] + [(policy, budget, policy) for budget in _csv(args.budgets)
                                                 for policy in _csv(args.policies)]
    reps: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for _ in range(args.reps):  # interleaved: each configuration once per repetition
        for i, (_, budget, policy) in enumerate(configs):
            reps[i].append(decode_stats(folder, args.trace, sequences, budget, policy, args.io_threads,
                                        args.max_tokens))
    expected = reps[0][0]["token_ids"]
    runs = [summarise(name, budget, reps[i], expected) for i, (name, budget, _) in enumerate(configs)]
    compute_time = runs[0]["decode_time_s"]
    for r in runs:
        bound_time = max(r["bytes_read"] / bandwidth, compute_time)
        r["bound_tok_s"] = r["tokens"] / bound_time
        r["achieved_over_bound"] = bound_time / r["decode_time_s"]
        r["ratio_vs_resident"] = r["tok_s"] / runs[0]["tok_s"]
    return {"model": f"OLMoE shape {trace.num_layers}x{trace.num_experts} top-{trace.top_k}, hidden {args.hidden}, "
                     f"expert dim {args.expert_dim}, fp32, {expert_bytes / 2**20:.2f} MiB per expert",
            "sequences": sequences, "decode_tokens": runs[0]["tokens"], "disk_gb_s": bandwidth / 1e9, "runs": runs}


def summarise(policy: str, budget, reps: list[dict], expected: list[list[int]]) -> dict:
    """Median over repetitions of decode time; the I/O of the median run; whether every run gave `expected`."""
    mid = sorted(reps, key=lambda r: r["decode_time_s"])[len(reps) // 2]
    requested = mid["hits"] + mid["misses"]
    return {"policy": policy, "budget": "all" if budget is None else budget,
            "tok_s": mid["tokens"] / mid["decode_time_s"], "tokens": mid["tokens"],
            "decode_time_s": mid["decode_time_s"], "all_decode_times_s": [r["decode_time_s"] for r in reps],
            "hit_rate": mid["hits"] / requested if requested else 1.0, "bytes_read": mid["bytes_read"],
            "mib_read": mid["bytes_read"] / 2**20, "stall_s": mid["stall_time_s"],
            "same_tokens": all(r["token_ids"] == expected for r in reps)}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    main()
