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

SETTINGS = {"continuous batching (32 seqs)": "32", "one request at a time": "1"}


def bench_args(url: str, args: argparse.Namespace, rate: float) -> argparse.Namespace:
    return argparse.Namespace(url=url, model=None, api_key="test-key-123", num_prompts=args.num_prompts,
                              request_rate=rate, burstiness=1.0, max_concurrency=None, input_len=32,
                              range_ratio=0.5, output_len=args.output_len, seed=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="serve_batching-"))
    servers = {name: start_server(DEFAULT_MODEL, logs / f"{seqs}.log", "--max-num-seqs", seqs)
               for name, seqs in SETTINGS.items()}
    traces = {"burst": math.inf, f"Poisson {args.rate:g}/s": args.rate}
    samples: dict[tuple[str, str], list[dict]] = {}
    try:
        for _ in range(args.runs):
            for trace, rate in traces.items():
                for name, server in servers.items():  # interleaved: both settings see the same machine state
                    result = run(bench_args(server.url, args, rate))
                    assert result["failed"] == 0, result["errors"]
                    samples.setdefault((trace, name), []).append(result)
    finally:
        for server in servers.values():
            server.stop()
    rows, figures = [], {}
    for (trace, name), results in samples.items():
        med = {key: statistics.median(r[key] for r in results) for key in ("request_throughput", "output_throughput")}
        lat = {f"{m}_{p}": statistics.median(r["latency_ms"][m][p] for r in results)
               for m in ("ttft", "tpot", "e2e") for p in ("p50", "p99")}
        figures.setdefault(trace, {})[name] = {**med, "latency_ms": lat}
        rows.append([trace, name, med["request_throughput"], med["output_throughput"], lat["ttft_p50"],
                     lat["ttft_p99"], lat["e2e_p50"], lat["e2e_p99"]])
    for by in figures.values():
        base, batched = by["one request at a time"], by["continuous batching (32 seqs)"]
        by["speedup_output_throughput"] = batched["output_throughput"] / base["output_throughput"]
    table = markdown_table(["trace", "server", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms",
                            "E2E p99 ms"], rows)
    table += "\n\n" + "\n".join(f"{t}: continuous batching gives {by['speedup_output_throughput']:.2f}x the output "
                                "throughput" for t, by in figures.items())
    result = {"machine": machine(), "model": "shakespeare-moe (shipped)", "runs": args.runs, "rate": args.rate,
              "num_prompts": args.num_prompts, "output_len": args.output_len, "figures": figures}
    write(args.out, "serve_batching", result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
