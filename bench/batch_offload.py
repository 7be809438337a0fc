"""Batched decode under expert offloading: one expert read serves every request routed to it in a step.

    python -m bench.batch_offload [--trace ../shared/traces/olmoe-1b-7b-0924_decode_wikitext-mbpp.npz]
        [--hidden 256 --expert-dim 128] [--batches 1,2,4,8,16,32] [--budgets 25%,50%] [--decode-tokens 16]
        [--reps 1] [--out bench/results] [--name batch_offload]
        [--affinity 25%,50% --affinity-batches 1,8 --split 0.5 [--affinity-table FILE]]

Model and routing as bench/offload_speed.py: OLMoE-1B-7B's shape (16 MoE layers, 64 experts, top-8), width scaled
down, random weights, the router's choices replayed from a real trace, so the expert I/O is the real model's. For
each batch size B, B trace sequences run together through the engine (continuous batching); the first step
(prefill of every prompt and the first token) is excluded, then `--decode-tokens` steps are timed from a cold page
cache and a fresh engine: total tokens/s and bytes read per generated token, all-resident and at each budget
(configurations interleaved within each repetition; medians); rows "torch GEMM" turn batch invariance off (its
cost; "x batch 1" there is against resident batch 1), rows "warm" load every expert first (the compute alone).
Each repetition also measures the disk (cold direct reads of one expert each, at the engine's reads in flight); the
bound of a row is its bytes read at that bandwidth, or the warm compute time at its batch if longer. Also, when the
shipped diffusion model is there: 8
diffusion requests submitted together vs one at a time; and the resident engine at batch 32 against transformers'
`generate` on the same prompts (equal lengths, so no padding changes the result), tokens compared.

Prefetch is off under a budget: the replayed routing is not the random routers', so a router-based predictor can
only guess wrong here (bench/offload_speed.py's NOTE); a batch then reads each layer's misses once its router has run.
`--affinity BUDGETS` adds rows with the affinity prefetcher, which predicts from the (replayed) experts a layer chose:
its table is fitted on the trace's training prompts (`--split`), and then every row replays held-out prompts. At a
batch it reads ahead the union of each token's predicted next-layer experts; what the next layer does not use is
disk time spent for nothing, which the rows' bytes read per token show.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

from bench.offload_speed import DEFAULT_TRACE, affinity_table, build_model, disk_bandwidth, drop_caches, replayed
from bench.report import machine, markdown_table, write
from tiermoe.config import EngineConfig
from tiermoe.decode.routing import RoutingReplay
from tiermoe.engine import LLMEngine
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL
from tiermoe.offload.prefetch import AFFINITY_FILE
from tiermoe.offload.tiers.stats import StoreStats
from tiermoe.sampling_params import SamplingParams
from tiermoe.sim.trace import Trace

IO_THREADS = 4  # the engine's reads in flight (EngineConfig.io_threads' default): the depth the disk is measured at


def replay_run(folder: Path, trace_path: Path, sequences: list[int], budget: str | None, decode_tokens: int,
               invariant: bool = True, warm: bool = False, prefetch: str = "off") -> dict:
    """The replayed `sequences` decoded together; the prefill step and the decode steps are timed apart. `warm`:
    every expert loaded before the prefill, so decode reads nothing (its compute time)."""
    drop_caches(folder)
    # prefetch off unless asked: the replayed routing is not the random routers', so no router-based predictor can
    # foresee it (offload_speed); affinity predicts from the replayed choices
    offload = {} if budget is None else {"prefetch": prefetch}
    engine = LLMEngine(EngineConfig(model=folder, expert_cache=budget, threads=2, batch_invariant=invariant, **offload))
    if warm:
        for layer, e in engine.index.experts():
            deque(engine.store.fetch(layer, [e]), maxlen=0)
    replay = RoutingReplay(engine.model, Trace.load(trace_path))
    engine.runner.observer = replay
    specs = replay.prompts(engine.model.shape.vocab_size)
    for i, seq in enumerate(sequences):
        prompt, traced = specs[seq]
        replay.sequence_of[str(i)] = seq
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=min(traced, decode_tokens + 1),
                                                          ignore_eos=True))
    start = time.perf_counter()
    engine.step()  # every prompt's prefill and first token
    prefill_s = time.perf_counter() - start
    prompt_tokens = engine.stats()["prompt_tokens"]
    engine.store.stats = StoreStats()
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        generated += sum(1 for _ in engine.scheduler.running)
        engine.step()
    seconds = time.perf_counter() - start
    read = engine.store.stats.to_dict()["total"]["bytes_read"]
    close = getattr(engine.store, "close", None)
    if close is not None:
        close()
    return {"tokens_per_s": generated / seconds, "bytes_per_token": read / generated, "tokens": generated,
            "prefill_tokens_per_s": prompt_tokens / prefill_s}


def measure_replay(folder: Path, args) -> tuple[list[dict], list[float]]:
    """Every (budget, batch), plus resident without batch invariance (torch's GEMM) at the largest batches (its
    cost) and resident with every expert loaded first (the compute alone). Configurations interleaved within each
    repetition, each of which also measures the disk's bandwidth. Returns the rows and the bandwidths (bytes/s)."""
    configs = [(budget, batch, True, False, "off") for batch in args.batches for budget in [None] + args.budgets]
    configs += [(budget, batch, True, False, "affinity") for batch in args.affinity_batches for budget in args.affinity]
    configs += [(None, batch, True, True, "off") for batch in args.batches]
    configs += [(None, batch, False, False, "off") for batch in args.batches if batch >= 8]
    sequences = replayed(Trace.load(args.trace), argparse.Namespace(split=args.split, seed=args.seed,
                                                                   sequences=max(args.batches)))
    index = LLMEngine(EngineConfig(model=folder, expert_cache="50%")).index  # reads no expert yet
    spec = index.expert(*next(iter(index.experts())))
    runs: dict[tuple, list[dict]] = {}
    bandwidths = []
    for rep in range(args.reps):
        bandwidths.append(disk_bandwidth(spec.gate.file, spec.nbytes, IO_THREADS, seed=100 + rep))
        for budget, batch, invariant, warm, prefetch in configs:
            runs.setdefault((budget, batch, invariant, warm, prefetch), []).append(
                replay_run(folder, args.trace, sequences[:batch], budget, args.decode_tokens, invariant, warm,
                           prefetch))
    bandwidth = statistics.median(bandwidths)
    compute = {batch: statistics.median(r["tokens_per_s"] for r in reps)
               for (_, batch, _, warm, _), reps in runs.items() if warm}
    rows = []
    for (budget, batch, invariant, warm, prefetch), reps in runs.items():
        row = {"budget": (budget or "resident") + ("" if invariant else ", torch GEMM") + (", warm" if warm else "")
               + ("" if prefetch == "off" else f" + {prefetch}"),
               "batch": batch, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in reps),
               "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in reps),
               "mib_read_per_token": statistics.median(r["bytes_per_token"] for r in reps) / 2**20}
        # the bound: the bytes read at the disk's bandwidth, or the compute alone if longer (perfect overlap)
        row["bound_tokens_per_s"] = 1 / max(row["mib_read_per_token"] * 2**20 / bandwidth, 1 / compute[batch])
        rows.append(row)
    return rows, bandwidths


def diffusion_concurrency(requests: int, max_tokens: int) -> dict:
    """The shipped diffusion model: `requests` requests submitted together vs one at a time."""
    engine = LLMEngine(EngineConfig(model=DEFAULT_DIFFUSION_MODEL, threads=2))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [f"Romeo {i}:" for i in range(requests)]

    def run(groups: list[list[int]]) -> tuple[float, dict]:
        tokens, start = {}, time.perf_counter()
        for group in groups:
            for i in group:
                engine.add_request(f"{len(tokens)}-{i}-{time.perf_counter()}", prompts[i], params)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        tokens[out.request_id.split("-")[1]] = out.outputs[0].token_ids
        return time.perf_counter() - start, tokens

    alone_s, alone = run([[i] for i in range(requests)])
    together_s, together = run([list(range(requests))])
    total = sum(len(t) for t in together.values())
    return {"requests": requests, "one_at_a_time_tokens_per_s": total / alone_s,
            "concurrent_tokens_per_s": total / together_s, "same_tokens": alone == together}


def versus_transformers(hf_folder: Path, aligned: Path, batch: int, prompt_len: int, max_tokens: int) -> dict:
    """Resident engine at batch `batch` vs transformers' generate on the same prompts (fp32, greedy)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    prompts = torch.randint(0, 50304, (batch, prompt_len))
    ref = AutoModelForCausalLM.from_pretrained(hf_folder, torch_dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        out = ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    ref_s = time.perf_counter() - start
    theirs = out[:, prompt_len:].tolist()
    del ref
    engine = LLMEngine(EngineConfig(model=aligned, threads=2))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts.tolist()):
        engine.add_request(str(i), p, params)
    ours = {}
    while engine.has_unfinished_requests():
        ours.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    our_s = time.perf_counter() - start
    same = sum(ours[str(i)] == theirs[i] for i in range(batch))
    return {"batch": batch, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "tiermoe_tokens_per_s": batch * max_tokens / our_s, "transformers_tokens_per_s": batch * max_tokens / ref_s,
            "requests_with_identical_tokens": f"{same}/{batch}"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-dim", type=int, default=128)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--budgets", type=lambda s: s.split(","), default=["25%", "50%"])
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--diffusion-requests", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="batch_offload", help="results file name")
    ap.add_argument("--affinity", type=lambda s: s.split(","), default=[],
                    help="budgets to run again with the affinity prefetcher (needs --split)")
    ap.add_argument("--affinity-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--split", type=float, default=None, help="share of the trace's prompts the affinity table is "
                    "fitted on; every row replays the others")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay-only", action="store_true", help="skip the diffusion and transformers comparisons")
    ap.add_argument("--affinity-table", type=Path, default=None, help="a table `tiermoe prefetch train` fitted on "
                    "this trace with this --split and --seed (fitting takes minutes)")
    args = ap.parse_args(argv)
    if args.affinity and args.split is None:
        ap.error("--affinity needs --split: the table is fitted on training prompts and held-out ones are replayed")
    torch.set_num_threads(2)
    trace = Trace.load(args.trace)
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        folder = build_model(Path(tmp), trace, args.hidden, args.expert_dim, keep_source=True)
        fitted = None
        if args.affinity:
            table, fitted = affinity_table(trace, args)
            table.save(folder / AFFINITY_FILE)  # where `prefetch="affinity"` finds it
        rows, bandwidths = measure_replay(folder, args)
        vs = None if args.replay_only else versus_transformers(Path(tmp) / "hf", folder, 32, 16, args.decode_tokens)
    diff = None if args.replay_only else diffusion_concurrency(args.diffusion_requests, 32)
    one = {r["budget"]: r["tokens_per_s"] for r in rows if r["batch"] == 1}
    table = markdown_table(["budget", "batch", "decode tokens/s", "x batch 1", "MiB read / token",
                            "bound tokens/s", "achieved / bound", "prefill tokens/s"],
                           [[r["budget"], r["batch"], r["tokens_per_s"],
                             r["tokens_per_s"] / one.get(r["budget"], one["resident"]), r["mib_read_per_token"],
                             r["bound_tokens_per_s"], r["tokens_per_s"] / r["bound_tokens_per_s"],
                             r["prefill_tokens_per_s"]] for r in rows])
    bandwidth = statistics.median(bandwidths)
    table += (f"\n\nBound: the bytes read at the disk's bandwidth ({bandwidth / 1e9:.2f} GB/s: cold direct reads of "
              f"one expert each, {IO_THREADS} in flight, median of one measurement per repetition), or the compute "
              "alone (the warm rows) if longer.")
    budgets = args.budgets + [f"{b} + affinity" for b in args.affinity]
    table += "".join(_batch_8_bound(rows, budget, bandwidth) for budget in budgets)
    if fitted is not None:
        table += (f"\n\nAffinity table fitted on {fitted['split']['fraction']:.0%} of the trace's prompts (seed "
                  f"{args.seed}), settings {fitted['settings']}; every row replays held-out prompts.")
    if diff is not None:
        table += ("\n\nDiffusion (shipped model, {requests} requests): one at a time "
                  "{one_at_a_time_tokens_per_s:.1f} tokens/s, submitted together {concurrent_tokens_per_s:.1f} "
                  "tokens/s, same tokens: {same_tokens}."
                  ).format(**diff)
    if vs is not None:
        table += ("\n\nResident batch {batch} ({prompt_len}-token prompts, {max_tokens} tokens): tiermoe "
                  "{tiermoe_tokens_per_s:.1f} tokens/s, transformers generate {transformers_tokens_per_s:.1f} "
                  "tokens/s; identical tokens: {requests_with_identical_tokens}.").format(**vs)
    table += (f"\n\nModel: OLMoE shape {trace.num_layers}x{trace.num_experts} top-{trace.top_k}, hidden "
              f"{args.hidden}, expert dim {args.expert_dim}; trace {args.trace.name}; {args.decode_tokens} decode "
              f"steps after the prefill step, cold page cache, 2 threads, prefetch off (but the + affinity rows), "
              f"medians of {args.reps}.")
    write(args.out, args.name, {"machine": machine(), "replay": rows, "disk_gb_s": bandwidth / 1e9,
                                      "disk_gb_s_each_rep": [b / 1e9 for b in bandwidths], "diffusion": diff,
                                      "versus_transformers": vs, "affinity": fitted}, table)


def _batch_8_bound(rows: list[dict], budget: str, bandwidth: float) -> str:
    """What 4x batch 1's throughput at batch 8 asks of the disk under `budget` (issue 13's goal), against the bound."""
    row = {r["batch"]: r for r in rows if r["budget"] == budget}
    if 1 not in row or 8 not in row:
        return ""
    one, eight = row[1]["tokens_per_s"], row[8]
    tok_s, bound, mib = eight["tokens_per_s"], eight["bound_tokens_per_s"], eight["mib_read_per_token"]
    return (f"\n\nAt {budget}, batch 8: {tok_s:.1f} tokens/s = {tok_s / one:.2f}x batch 1 ({one:.1f}); bound "
            f"{bound:.1f} tokens/s = {bound / one:.2f}x. 4x batch 1 at {mib:.1f} MiB read per token needs "
            f"{4 * one * mib * 2**20 / 1e9:.2f} GB/s of reads, the disk gives {bandwidth / 1e9:.2f}.")


if __name__ == "__main__":
    main()
