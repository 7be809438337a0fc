"""Continuous batching against one request at a time, over HTTP: `tiermoe serve` on the shipped model with
--max-num-seqs 32 and with --max-num-seqs 1, the same arrival traces sent to both by `tiermoe bench serve`.

    python -m bench.serve_batching [--out bench/results] [--runs 3] [--num-prompts 32] [--output-len 32]

Both servers run side by side (one torch thread each, experts resident); runs alternate between them, and each
figure is the median over --runs. Traces: a burst (every request at once) and Poisson arrivals at --rate per second.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

from bench.report import machine, markdown_table, write
from tests.server.conftest import start_server
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.server.bench_client import run

SETTINGS = {"continuous batching (32 seqs)": ["--max-num-seqs", "32"],
            "one request at a time": ["--max-num-seqs", "1"]}


HEADERS = ["trace", "server", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms", "E2E p99 ms"]


def bench_args(url: str, rate: float, num_prompts: int, output_len: int, input_len: int = 32) -> argparse.Namespace:
    """`tiermoe bench serve`'s arguments: seeded, so every server gets the same prompts at the same times."""
    return argparse.Namespace(url=url, model=None, api_key="test-key-123", num_prompts=num_prompts,
                              request_rate=rate, burstiness=1.0, max_concurrency=None, input_len=input_len,
                              range_ratio=0.5, output_len=output_len, seed=0)


def compare(servers: dict, traces: dict[str, float], runs: int, **bench) -> dict[str, dict[str, dict]]:
    """Every trace (name -> arrivals per second, inf: a burst) sent to every server `runs` times, interleaved so
    that all see the same machine state; per trace and server the median throughputs and latency percentiles."""
    samples: dict[str, dict[str, list[dict]]] = {}
    for _ in range(runs):
        for trace, rate in traces.items():
            for name, server in servers.items():
                result = run(bench_args(server.url, rate, **bench))
                assert result["failed"] == 0, result["errors"]
                samples.setdefault(trace, {}).setdefault(name, []).append(result)
    return {trace: {name: medians(results) for name, results in by.items()} for trace, by in samples.items()}


def medians(results: list[dict]) -> dict:
    med = {key: statistics.median(r[key] for r in results) for key in ("request_throughput", "output_throughput")}
    lat = {f"{m}_{p}": statistics.median(r["latency_ms"][m][p] for r in results)
           for m in ("ttft", "tpot", "e2e") for p in ("p50", "p99")}
    return {**med, "latency_ms": lat}


def rows(figures: dict[str, dict[str, dict]]) -> list[list]:
    """Table rows (HEADERS) of compare's figures."""
    return [[trace, name, f["request_throughput"], f["output_throughput"], f["latency_ms"]["ttft_p50"],
             f["latency_ms"]["ttft_p99"], f["latency_ms"]["e2e_p50"], f["latency_ms"]["e2e_p99"]]
            for trace, by in figures.items() for name, f in by.items()
            if isinstance(f, dict) and "request_throughput" in f]  # not the ratios beside them


def start_servers(folder: Path, settings: dict[str, list[str]], logs: Path) -> dict:
    """One `tiermoe serve` on `folder` per setting (name -> extra flags), side by side."""
    return {name: start_server(folder, logs / f"{i}.log", *flags) for i, (name, flags) in enumerate(settings.items())}


def measure(runs: int, num_prompts: int, output_len: int, rate: float) -> dict[str, dict[str, dict]]:
    """Continuous batching against one request at a time on the shipped model, under a burst and Poisson load."""
    servers = start_servers(DEFAULT_MODEL, SETTINGS, Path(tempfile.mkdtemp(prefix="serve_batching-")))
    traces = {"burst": math.inf, f"Poisson {rate:g}/s": rate}
    try:
        figures = compare(servers, traces, runs, num_prompts=num_prompts, output_len=output_len)
    finally:
        for server in servers.values():
            server.stop()
    for by in figures.values():
        base, batched = by["one request at a time"], by["continuous batching (32 seqs)"]
        by["speedup_output_throughput"] = batched["output_throughput"] / base["output_throughput"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    args = parser.parse_args(argv)
    figures = measure(args.runs, args.num_prompts, args.output_len, args.rate)
    table = markdown_table(HEADERS, rows(figures))
    table += "\n\n" + "\n".join(f"{t}: continuous batching gives {by['speedup_output_throughput']:.2f}x the output "
                                "throughput" for t, by in figures.items())
    result = {"machine": machine(), "model": "shakespeare-moe (shipped)", "runs": args.runs, "rate": args.rate,
              "num_prompts": args.num_prompts, "output_len": args.output_len, "figures": figures}
    write(args.out, "serve_batching", result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
