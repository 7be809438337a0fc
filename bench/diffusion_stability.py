"""Per-layer expert-set stability across the denoising steps of a block (TIDE's premise), measured on a diffusion
model's own routing.

    python -m bench.diffusion_stability [--model DIR] [--prompts 2 --prompt-len 32 --max-tokens 96]
        [--block 32 --steps 32 --threshold 0.95] [--lags 1 2 4 8] [--out bench/results]

Greedy block diffusion, all experts resident; every step's tokens-per-expert of every MoE layer is recorded
(RecordingStore). Between steps `lag` apart in the same block: mean Jaccard of the routed sets, cosine of the
tokens-per-expert vectors, and top overlap (share of the `--top` busiest experts still among the busiest; default a
quarter of the experts, the fast tier at a 25% budget). "excl. step 0" leaves out each block's first step, whose
forward also carries the previous block's (or the prompt's) rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.llada2_model import Scale, add_model_args, prompts, resolve
from bench.report import machine, markdown_table, write
from tiermoe import LLM, SamplingParams
from tiermoe.decode import diffusion
from tiermoe.decode.diffusion import DiffusionOptions
from tiermoe.offload.placement.routing_log import RecordingStore
from tiermoe.offload.placement.stability import layer_stability, overall


def record(llm: LLM, args) -> tuple[RecordingStore, list[dict]]:
    """Decode the prompts with a recording store in front of the resident one; (recorder, per-request stats)."""
    recorder = RecordingStore(llm.store)
    for block in llm.model.moe_blocks:
        block.store = recorder
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, block_length=args.block, steps=args.steps,
                            threshold=args.threshold, ignore_eos=True)
    seqs = [llm._make_sequence(p, params) for p in prompts(llm, args.prompts, args.prompt_len)]
    # tau=1: the decoder tells the store where every step (and block) begins; the resident store ignores it.
    stats = diffusion.generate(llm.model, seqs, llm.tokenizer, llm.diffusion, DiffusionOptions(tau=1),
                               store=recorder)
    return recorder, list(stats.values())


def measure(blocks, lags: list[int], top: int) -> dict:
    result = {"per_layer_lag1": {}, "by_lag": []}
    for skip in (False, True):
        per_layer = layer_stability(blocks, 1, top, skip)
        result["per_layer_lag1"]["excl_step0" if skip else "all"] = {k: v.to_dict() for k, v in per_layer.items()}
        for lag in lags:
            result["by_lag"].append({"lag": lag, "excl_step0": skip,
                                     **overall(layer_stability(blocks, lag, top, skip)).to_dict()})
    return result


def tables(result: dict) -> str:
    lag_rows = [[r["lag"], "yes" if r["excl_step0"] else "no", r["jaccard"], r["cosine"], r["top_overlap"], r["pairs"]]
                for r in result["by_lag"]]
    out = markdown_table(["lag (steps)", "excl. step 0", "Jaccard", "cosine", "top overlap", "pairs"], lag_rows)
    per_layer = result["per_layer_lag1"]["excl_step0"]
    rows = [[layer, s["jaccard"], s["cosine"], s["top_overlap"], s["pairs"]] for layer, s in per_layer.items()]
    return out + "\n\nPer layer, adjacent steps (excl. step 0):\n\n" + markdown_table(
        ["layer", "Jaccard", "cosine", "top overlap", "pairs"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--lags", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--top", type=int, default=None, help="busiest experts compared (default: a quarter of them)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench_model = resolve(args, Scale(experts=args.experts, layers=args.layers))
    llm = LLM(bench_model.folder)
    top = args.top or max(1, llm.model.shape.num_experts // 4)
    recorder, stats = record(llm, args)
    result = measure(recorder.log.blocks, args.lags, top)
    steps = [len(b) for b in recorder.log.blocks]
    note = (f"\n\nModel: {bench_model.what}. {len(stats)} prompts of {args.prompt_len} tokens, "
            f"{args.max_tokens} new tokens, "
            f"block {args.block}, steps {args.steps}, threshold {args.threshold}; {len(steps)} blocks of "
            f"{min(steps)}-{max(steps)} steps; top overlap over the {top} busiest of "
            f"{llm.model.shape.num_experts} experts.")
    write(args.out, "diffusion_stability" + bench_model.suffix, {"machine": machine(), "model": bench_model.what,
                                                               "top": top,
                                            "steps_per_block": steps, "decode": stats, **result}, tables(result) + note)


if __name__ == "__main__":
    main()
