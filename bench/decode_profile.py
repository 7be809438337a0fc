"""Where a resident batch-1 decode step's time goes, against the memory-bandwidth bound.

    python -m bench.decode_profile --model DIR [--dtype float32] [--tokens 32] [--threads 2] [--out bench/results]

Times every call into tiermoe.kernels (grouped by what it computes: attention projections, attention, router,
experts, lm_head, norms) during greedy decode of --tokens tokens, and what is left of the step (Python, sampling,
small torch ops). Each product's weight bytes give its achieved GB/s; the bound is active weight bytes per token /
DRAM bandwidth (torch.sum over 1 GiB). The timers add a little per call; the step total is measured without them too.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.gemv_speed import roofline
from bench.report import machine, markdown_table, write
from tiermoe import LLM, SamplingParams, kernels

PROMPT = list(range(1, 33))


def _kind(weight: torch.Tensor, vocab: int) -> str:
    n = weight.shape[0]
    return "lm_head" if n == vocab else "router" if n <= 256 else "projection"


def instrument(vocab: int) -> tuple[dict, dict, callable]:
    """Wrap the kernels' entry points with timers; returns (seconds, bytes) per group and an undo function."""
    seconds, nbytes, saved = defaultdict(float), defaultdict(int), {}

    def wrap(name, group_of):
        fn = saved[name] = getattr(kernels, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            group, weight_bytes = group_of(*args)
            seconds[group] += time.perf_counter() - start
            nbytes[group] += weight_bytes
            return out

        setattr(kernels, name, timed)

    wrap("linear", lambda x, w, *a: (_kind(w, vocab), w.nbytes))
    wrap("swiglu", lambda x, gu, down, *a: ("experts (swiglu)", gu.nbytes + down.nbytes))
    wrap("decode_attention", lambda q, k, v, *a: ("attention (scores, softmax, values)", k.nbytes + v.nbytes))
    wrap("rmsnorm", lambda *a: ("rmsnorm", 0))
    wrap("rotary_", lambda *a: ("rotary", 0))
    return seconds, nbytes, lambda: [setattr(kernels, n, f) for n, f in saved.items()]


def decode_seconds(llm: LLM, tokens: int) -> float:
    """Seconds per decode step (after the first token)."""
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    m = out[0].metrics
    return (m.finish_time - m.first_token_time) / (tokens - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--name", default="decode_profile")
    args = p.parse_args()
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads)
    vocab = llm.engine.model.lm_head.weight.shape[0]
    decode_seconds(llm, 4)  # warm-up
    plain = min(decode_seconds(llm, args.tokens) for _ in range(3))
    seconds, nbytes, undo = instrument(vocab)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    prompt_pass = {g: (seconds[g], nbytes[g]) for g in seconds}  # subtracted: the timed run repeats this pass
    timed = decode_seconds(llm, args.tokens)
    undo()
    steps = args.tokens - 1
    bound_gbps = roofline()
    groups = {g: ((seconds[g] - 2 * prompt_pass.get(g, (0, 0))[0]) / steps,
                  (nbytes[g] - 2 * prompt_pass.get(g, (0, 0))[1]) / steps) for g in seconds}
    rows, total_bytes = [], sum(b for _, b in groups.values())
    for g, (s, b) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        rows.append([g, s * 1e3, s / timed, b / 1e6, b / s / 1e9 if b else None])
    rest = timed - sum(s for s, _ in groups.values())
    rows.append(["rest (Python, sampling, small torch ops)", rest * 1e3, rest / timed, 0, None])
    table = markdown_table(["part of a decode step", "ms", "share", "MB read", "GB/s"], rows)
    bound = total_bytes / (bound_gbps * 1e9)
    table += (f"\n\n{args.dtype}, {args.threads} threads, kernels {kernels.backend()}: step {plain * 1e3:.2f} ms "
              f"({1 / plain:.1f} tok/s) without timers, {timed * 1e3:.2f} ms with them; weights read per token "
              f"{total_bytes / 1e6:.0f} MB; DRAM {bound_gbps:.1f} GB/s (torch.sum over 1 GiB) -> bound "
              f"{bound * 1e3:.2f} ms ({1 / bound:.1f} tok/s).")
    print(table)
    write(args.out, args.name, {"machine": machine(), "args": vars(args) | {"out": str(args.out)},
                                "step_s": plain, "timed_step_s": timed, "bytes_per_token": total_bytes,
                                "dram_gbps": bound_gbps, "groups": groups}, table)


if __name__ == "__main__":
    main()
