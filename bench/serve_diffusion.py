"""Diffusion scheduling policies over HTTP: `tiermoe serve --scheduler phase | fcfs | fcfs-request` side by side on
the shipped diffusion model and on a random LLaDA2.0-mini-shaped one, the same arrival traces (a burst of every
request at once, then Poisson arrivals at --load times what fcfs-request sustained) sent to each by `tiermoe bench
serve`; and in the same run the autoregressive model's continuous batching against one request at a time
(bench/serve_batching).

    python -m bench.serve_diffusion [--out bench/results] [--runs 3] [--num-prompts 16] [--input-len 160]
                                    [--output-len 32] [--max-num-batched-tokens 256] [--workdir runs/bench_serve]

Servers run one torch thread each, experts resident, the engine's default sampling for diffusion (block 32, 32
steps, threshold 0.95, greedy); runs alternate between them and each figure is the median over --runs. Target
(issue 14, after dLLM-Serve, arXiv 2512.17077): under the burst, phase reaches >= 1.8x the throughput of
fcfs-request and a 4x lower p99 end-to-end latency.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

from bench import serve_batching
from bench.llada2_model import Scale, build_random
from bench.report import machine, markdown_table, write
from tiermoe.engine.scheduler import DIFFUSION_POLICIES
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL

# LLaDA2.0-mini's routing (256 experts, top-8 in 4 of 8 groups, a shared expert, a dense first layer), narrower and
# shallower than bench/llada2_model's default so three servers of it run side by side in minutes; the shipped
# tokenizer's vocabulary, so that the server takes text prompts.
SCALE = Scale(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, moe_intermediate=64, intermediate=640,
              vocab=4096)
# Prompts of ~5 blocks: a request's first step (prompt and first block) is heavy against its light steps (one block),
# as dLLM-Serve's prompts are; with 32-token prompts the two phases cost about the same.
INPUT_LEN = 160
TARGET = {"throughput": 1.8, "e2e_p99": 4.0}  # phase against fcfs-request under the burst


def random_model(workdir: Path) -> Path:
    """The random LLaDA2.0-mini-shaped checkpoint with the shipped diffusion model's tokenizer."""
    folder = build_random(workdir / "llada2-mini-serve", SCALE)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEFAULT_DIFFUSION_MODEL / name, folder / name)
    return folder


def ratios(by: dict[str, dict], base: str) -> dict:
    """phase against `base`: how many times the output throughput, how many times lower the latencies."""
    phase, other = by["phase"], by[base]
    lat = {f"{m}_lower": other["latency_ms"][m] / phase["latency_ms"][m] for m in ("e2e_p50", "e2e_p99", "ttft_p99")}
    return {"throughput": phase["output_throughput"] / other["output_throughput"], **lat}


def measure_model(folder: Path, args: argparse.Namespace, logs: Path) -> dict:
    """The burst, then Poisson arrivals at --load times the rate fcfs-request sustained in the burst (a rate the
    machine can serve one request at a time, with queueing), on one server per policy."""
    settings = {name: ["--scheduler", name, "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
                for name in DIFFUSION_POLICIES}
    servers = serve_batching.start_servers(folder, settings, logs)
    bench = {"num_prompts": args.num_prompts, "output_len": args.output_len, "input_len": args.input_len}
    try:
        figures = serve_batching.compare(servers, {"burst": math.inf}, args.runs, **bench)
        rate = round(args.load * figures["burst"]["fcfs-request"]["request_throughput"], 2)
        figures |= serve_batching.compare(servers, {f"Poisson {rate:g}/s": rate}, args.runs, **bench)
    finally:
        for server in servers.values():
            server.stop()
    for by in figures.values():
        by["phase_vs"] = {base: ratios(by, base) for base in ("fcfs-request", "fcfs")}
    return figures


def verdict(model: str, figures: dict) -> str:
    r = figures["burst"]["phase_vs"]["fcfs-request"]
    met = r["throughput"] >= TARGET["throughput"] and r["e2e_p99_lower"] >= TARGET["e2e_p99"]
    f = figures["burst"]["phase_vs"]["fcfs"]
    return (f"{model}, burst: phase gives {r['throughput']:.2f}x the output throughput of fcfs-request and a "
            f"{r['e2e_p99_lower']:.2f}x lower p99 end-to-end latency (target {TARGET['throughput']}x and "
            f"{TARGET['e2e_p99']}x: {'met' if met else 'not met'}); against fcfs {f['throughput']:.2f}x and "
            f"{f['e2e_p99_lower']:.2f}x.")


def plot(figures: dict[str, dict], path: Path) -> None:
    """Output throughput and p99 end-to-end latency per scheduler, for each model and trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(model, trace) for model, by_trace in figures.items() for trace in by_trace]
    fig, axes = plt.subplots(2, len(cases), figsize=(3.2 * len(cases), 6), squeeze=False)
    for col, (model, trace) in enumerate(cases):
        by = {k: v for k, v in figures[model][trace].items() if k in DIFFUSION_POLICIES}
        names = list(by)
        axes[0][col].bar(names, [by[n]["output_throughput"] for n in names], color="tab:blue")
        axes[0][col].set(title=f"{model}\n{trace}", ylabel="output tok/s" if col == 0 else None)
        axes[1][col].bar(names, [by[n]["latency_ms"]["e2e_p99"] for n in names], color="tab:red")
        axes[1][col].set(ylabel="E2E p99 ms" if col == 0 else None)
        for ax in axes[:, col]:
            ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_serve"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=INPUT_LEN,
                        help="mean prompt tokens, spread +-50%% (results of another length get the suffix "
                             "_promptN)")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256,
                        help="the engines' token budget per step (the contention the policies share)")
    parser.add_argument("--load", type=float, default=0.8,
                        help="Poisson arrivals as a fraction of fcfs-request's burst throughput")
    parser.add_argument("--ar-rate", type=float, default=8.0, help="Poisson arrivals per second, AR model")
    parser.add_argument("--skip-ar", action="store_true", help="leave out the autoregressive comparison")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="serve_diffusion-"))
    models = {"shakespeare-dllm (shipped)": DEFAULT_DIFFUSION_MODEL, "random LLaDA2.0-mini-shaped":
              random_model(args.workdir)}
    figures = {model: measure_model(folder, args, logs) for model, folder in models.items()}
    table = markdown_table(["model", *serve_batching.HEADERS],
                           [[model, *row] for model, by in figures.items() for row in serve_batching.rows(by)])
    table += "\n\n" + "\n".join(verdict(model, by) for model, by in figures.items())
    result = {"machine": machine(), "models": {"random LLaDA2.0-mini-shaped": str(SCALE)}, "runs": args.runs,
              "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
              "load": args.load, "max_num_batched_tokens": args.max_num_batched_tokens, "target": TARGET,
              "figures": figures}
    if not args.skip_ar:
        ar = serve_batching.measure(args.runs, 32, 32, args.ar_rate)
        result["autoregressive"] = ar
        table += "\n\nAutoregressive (shakespeare-moe, 32 prompts of 32 tokens; bench/serve_batching):\n\n"
        table += markdown_table(serve_batching.HEADERS, serve_batching.rows(ar))
    name = "serve_diffusion" + ("" if args.input_len == INPUT_LEN else f"_prompt{args.input_len}")
    write(args.out, name, result, table)
    plot(figures, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
