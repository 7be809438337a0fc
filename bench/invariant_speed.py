"""What batch invariance costs: the kernels' products against torch's GEMM by row count, and the resident engine at
batch 32 with batch invariance on and off against transformers' `generate`.

    python -m bench.invariant_speed [--rows 1,8,32,128] [--reps 3] [--batch 32] [--trace NPZ] [--out bench/results]

(a) Products y = x W^T of the shapes one token reads in the 0.64B Mixtral-shaped peer model (bench/peers) and in
the OLMoE-shaped replay model (bench/batch_offload): tiermoe.kernels.linear in batch-invariant mode (one call, any
number of rows) against F.linear, fp32, medians of interleaved repetitions; weights cycle through 256 MiB so they
come from DRAM. (b) The OLMoE-shaped model (random weights, hidden 256, expert dim 128), --batch prompts of 16
tokens and 12 new tokens each, greedy, fp32: transformers `generate` (one padded batch; equal lengths, no padding)
and the tiermoe engine with batch_invariant on and off (each run once before, as transformers' weights are loaded
before its timing), interleaved; tokens compared with transformers'.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.offload_speed import DEFAULT_TRACE
from bench.report import machine, markdown_table, median, write
from tiermoe import kernels

SHAPES = {"mixtral-0.6b qkv": (1536, 1024), "mixtral-0.6b expert gate_up": (5632, 1024),
          "mixtral-0.6b expert down": (1024, 2816), "mixtral-0.6b lm_head": (32000, 1024),
          "olmoe-replay qkv": (768, 256), "olmoe-replay expert gate_up": (256, 256),
          "olmoe-replay lm_head": (50304, 256)}
WORKING_SET = 256 << 20


def product_seconds(fn, weights: list[torch.Tensor], x: torch.Tensor, budget_s: float = 0.3) -> float:
    """Seconds per call of fn(x, w), cycling through `weights` for about `budget_s`."""
    fn(x, weights[0])
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s or calls < 3:
        fn(x, weights[calls % len(weights)])
        calls += 1
    return (time.perf_counter() - start) / calls


def invariant_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    kernels.set_batch_invariant(True)
    try:
        return kernels.linear(x, w)
    finally:
        kernels.set_batch_invariant(False)


def products(rows: list[int], reps: int) -> list[dict]:
    records = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        weights = [w.clone() for _ in range(max(1, WORKING_SET // w.nbytes))]
        for m in rows:
            x = torch.randn(m, k)
            runs = {"kernel": [], "F.linear": []}
            for _ in range(reps):  # interleaved
                runs["kernel"].append(product_seconds(invariant_linear, weights, x))
                runs["F.linear"].append(product_seconds(F.linear, weights, x))
            rec = {"weight": name, "shape": [n, k], "rows": m, **{e: median(v) for e, v in runs.items()}}
            records.append(rec)
            print(name, m, f"kernel {rec['kernel'] * 1e3:.3f} ms, F.linear {rec['F.linear'] * 1e3:.3f} ms",
                  flush=True)
    return records


def engine_seconds(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, dict]:
    """Wall time of the engine generating for every prompt at once, and its tokens by request."""
    from tiermoe.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    ours = {}
    while engine.has_unfinished_requests():
        ours.update((int(o.request_id), o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return time.perf_counter() - start, ours


def warm_engine(folder: Path, prompts: list[list[int]], invariant: bool):
    """A resident engine that has run once (its experts read on first use, as transformers' are at load)."""
    from tiermoe.config import EngineConfig
    from tiermoe.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=folder, threads=2, batch_invariant=invariant))
    engine_seconds(engine, prompts, 2)
    return engine


def batched_engine(trace: Path, batch: int, reps: int, prompt_len: int = 16, max_tokens: int = 12) -> dict:
    from transformers import AutoModelForCausalLM

    from bench.offload_speed import build_model
    from tiermoe.sim.trace import Trace

    torch.manual_seed(1)
    prompts = torch.randint(0, 50304, (batch, prompt_len))
    times = {"transformers": [], "tiermoe invariant": [], "tiermoe torch GEMM": []}
    same = {}
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        folder = build_model(Path(tmp), Trace.load(trace), 256, 128, keep_source=True)
        ref = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        engines = {label: warm_engine(folder, prompts.tolist(), invariant)
                   for label, invariant in (("tiermoe invariant", True), ("tiermoe torch GEMM", False))}
        for _ in range(reps):
            start = time.perf_counter()
            with torch.inference_mode():
                out = ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_tokens,
                                   min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            times["transformers"].append(time.perf_counter() - start)
            theirs = out[:, prompt_len:].tolist()
            for label, engine in engines.items():
                kernels.set_batch_invariant(engine.config.batch_invariant)  # a process-wide mode: set per run
                seconds, ours = engine_seconds(engine, prompts.tolist(), max_tokens)
                times[label].append(seconds)
                same[label] = f"{sum(ours[i] == theirs[i] for i in range(batch))}/{batch}"
    tokens = batch * max_tokens
    return {"batch": batch, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "tokens_per_s": {k: tokens / median(v) for k, v in times.items()}, "seconds": times,
            "identical_to_transformers": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,32,128")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--parts", default="products,engine")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="routing trace the replay model's shape is from")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    torch.set_num_threads(2)
    parts = args.parts.split(",")
    records = products([int(r) for r in args.rows.split(",")], args.reps) if "products" in parts else []
    table = markdown_table(
        ["weight (fp32)", "N x K", "rows", "invariant kernel ms", "F.linear ms", "kernel / F.linear time",
         "kernel GFLOP/s"],
        [[r["weight"], "x".join(map(str, r["shape"])), r["rows"], r["kernel"] * 1e3, r["F.linear"] * 1e3,
          r["kernel"] / r["F.linear"], 2 * r["rows"] * r["shape"][0] * r["shape"][1] / r["kernel"] / 1e9]
         for r in records])
    engine = batched_engine(args.trace, args.batch, args.reps) if "engine" in parts else None
    if engine is not None:
        tps, same = engine["tokens_per_s"], engine["identical_to_transformers"]
        table += (f"\n\nResident batch {engine['batch']} ({engine['prompt_len']}-token prompts, {engine['max_tokens']} "
                  f"new tokens, OLMoE-shaped replay model, fp32, wall time incl. prefill, median of {args.reps}): "
                  f"transformers generate {tps['transformers']:.1f} tokens/s; tiermoe batch-invariant "
                  f"{tps['tiermoe invariant']:.1f} tokens/s ({same['tiermoe invariant']} identical), torch GEMM "
                  f"{tps['tiermoe torch GEMM']:.1f} tokens/s ({same['tiermoe torch GEMM']} identical).")
    table += f"\n\nKernel path: {kernels.backend()}, 2 threads."
    print(table)
    settings = vars(args) | {"out": str(args.out), "trace": args.trace.name}
    write(args.out, "invariant_speed", {"machine": machine(), "backend": kernels.backend(), "products": records,
                                        "engine": engine, "args": settings}, table)


if __name__ == "__main__":
    main()
