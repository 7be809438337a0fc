"""`tiermoe bench serve`: load an OpenAI-compatible server as `vllm bench serve` does and report its latencies.

Requests arrive as a gamma process (burstiness 1 = Poisson; lower is burstier) at --request-rate per second, or
all at once (rate inf, a burst), each a streamed completion whose prompt is a window of the text the package ships
(--input-len tokens, spread by --range-ratio) asking for exactly --output-len tokens (ignore_eos). Per request:
TTFT (time to the first streamed token), ITL (time between streamed chunks), TPOT ((e2e - TTFT) / (tokens - 1))
and end-to-end latency; overall: request and token throughput. Results as JSON, a Markdown table and a plot.
Only the standard library talks HTTP, one thread per request in flight.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tiermoe.models.registry import DEFAULT_MODEL

TEXT = DEFAULT_MODEL.parent / "calibration.txt"  # a held-out play the package ships
PERCENTILES = (50, 90, 99)


@dataclass
class Result:
    """One request as the client saw it."""

    prompt_tokens: int
    ok: bool = False
    output_tokens: int = 0
    ttft: float | None = None  # seconds to the first token
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)  # seconds between streamed chunks
    error: str | None = None
    start: float = 0.0  # seconds since the benchmark began

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class Client:
    """POSTs to one server over http.client (a connection per request: the threads share nothing)."""

    def __init__(self, url: str, api_key: str | None):
        parts = urlsplit(url)
        self.host, self.port, self.base = parts.hostname, parts.port or 80, parts.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            conn.request(method, self.base + path, json.dumps(body) if body is not None else None, self.headers)
            response = conn.getresponse()
            data = json.loads(response.read() or b"{}")
            if response.status != 200:
                raise RuntimeError(f"{method} {path}: {response.status} {data.get('error', data)}")
            return data
        finally:
            conn.close()

    def stream(self, body: dict, result: Result) -> Result:
        """Send a streamed completion and time its chunks into `result`."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        start = time.perf_counter()
        last = None
        try:
            conn.request("POST", self.base + "/v1/completions", json.dumps(body), self.headers)
            response = conn.getresponse()
            if response.status != 200:
                result.error = f"{response.status}: {response.read()[:200].decode(errors='replace')}"
                return result
            while line := response.readline():
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
            result.e2e = time.perf_counter() - start
            result.ok = result.ttft is not None and result.error is None
        except OSError as e:
            result.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        return result


def arrivals(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times in seconds: gamma-distributed gaps of mean 1/rate (shape = burstiness), or all 0 for rate inf."""
    if math.isinf(rate):
        return [0.0] * n
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, 1 / (rate * burstiness))
    return times


def prompts(client: Client, n: int, input_len: int, ratio: float, rng: random.Random) -> list[list[int]]:
    """n windows of the shipped text, as the server's token ids, of lengths uniform in input_len * [1-r, 1+r]."""
    ids = client.json("POST", "/tokenize", {"prompt": TEXT.read_text(), "add_special_tokens": False})["tokens"]
    out = []
    for _ in range(n):
        length = max(1, round(input_len * rng.uniform(1 - ratio, 1 + ratio)))
        start = rng.randrange(0, max(1, len(ids) - length))
        out.append(ids[start:start + length])
    return out


def run(args: argparse.Namespace) -> dict:
    client = Client(args.url, args.api_key)
    model = args.model or client.json("GET", "/v1/models")["data"][0]["id"]
    rng = random.Random(args.seed)
    batch = prompts(client, args.num_prompts, args.input_len, args.range_ratio, rng)
    send_at = arrivals(args.num_prompts, args.request_rate, args.burstiness, rng)
    results = [Result(len(p)) for p in batch]
    limit = threading.Semaphore(args.max_concurrency or args.num_prompts)

    def one(i: int) -> Result:
        with limit:
            body = {"model": model, "prompt": batch[i], "max_tokens": args.output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            return client.stream(body, results[i])

    begin = time.perf_counter()
    with ThreadPoolExecutor(args.num_prompts) as pool:
        futures = []
        for i, t in enumerate(send_at):
            time.sleep(max(0.0, t - (time.perf_counter() - begin)))
            results[i].start = time.perf_counter() - begin
            futures.append(pool.submit(one, i))
        for f in futures:
            f.result()
    duration = time.perf_counter() - begin
    return summary(args, model, results, duration)


def summary(args: argparse.Namespace, model: str, results: list[Result], duration: float) -> dict:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    metrics = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.tpot is not None],
               "itl": [x for r in done for x in r.itl], "e2e": [r.e2e for r in done]}
    return {
        "url": args.url, "model": model, "num_prompts": args.num_prompts, "request_rate": args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "input_len": args.input_len,
        "output_len": args.output_len, "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5], "duration_s": duration,
        "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in done)) / duration,
        "total_output_tokens": out_tokens,
        "latency_ms": {name: stats_ms(values) for name, values in metrics.items()},
        "requests": [asdict(r) for r in results],
    }


def stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ordered = sorted(values)
    return {"mean": 1000 * sum(ordered) / len(ordered), **{f"p{p}": 1000 * percentile(ordered, p)
                                                           for p in PERCENTILES}}


def percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def markdown(result: dict) -> str:
    head = (f"{result['completed']}/{result['num_prompts']} requests completed in {result['duration_s']:.2f} s "
            f"(rate {result['request_rate']}/s, burstiness {result['burstiness']}): "
            f"{result['request_throughput']:.2f} req/s, {result['output_throughput']:.1f} output tok/s, "
            f"{result['total_token_throughput']:.1f} total tok/s\n\n")
    rows = ["| metric (ms) | mean | " + " | ".join(f"p{p}" for p in PERCENTILES) + " |",
            "|---|---|" + "---|" * len(PERCENTILES)]
    for name, s in result["latency_ms"].items():
        cells = [s["mean"], *(s[f"p{p}"] for p in PERCENTILES)]
        rows.append(f"| {name.upper()} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(result: dict, path: Path) -> None:
    """Latency CDFs (TTFT, TPOT, ITL, end-to-end) and each request's span over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in result["requests"] if r["ok"]]
    fig, (cdf, spans) = plt.subplots(1, 2, figsize=(11, 4))
    series = {"TTFT": [r["ttft"] for r in done], "ITL": [x for r in done for x in r["itl"]],
              "E2E": [r["e2e"] for r in done]}
    for name, values in series.items():
        if values:
            ordered = sorted(1000 * v for v in values)
            cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    cdf.set(xscale="log", xlabel="ms", ylabel="fraction of samples", title="latency CDF")
    cdf.legend()
    for i, r in enumerate(done):
        spans.plot([r["start"], r["start"] + r["e2e"]], [i, i], color="tab:blue", lw=1)
        spans.plot([r["start"]], [i], "|", color="tab:red")
        spans.plot([r["start"] + r["ttft"]], [i], ".", color="tab:green", ms=3)
    spans.set(xlabel="s since start", ylabel="request", title="requests: sent (|), first token (.), end")
    fig.suptitle(f"{result['model']}: {result['completed']} requests, {result['output_throughput']:.1f} tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks against a running server")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    p = commands.add_parser("serve", help="load an OpenAI-compatible server with timed arrivals and report TTFT, "
                                          "TPOT, ITL, end-to-end latency and throughput (as `vllm bench serve`)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--num-prompts", type=int, default=32, help="requests to send (default: %(default)s)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean arrivals per second; inf sends all at once, a burst (default: %(default)s)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="shape of the gamma-distributed gaps: 1 = Poisson, < 1 burstier, > 1 more regular "
                        "(default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: all)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (default: %(default)s)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="prompt lengths uniform in input-len * [1 - r, 1 + r] (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default: %(default)s)")
    p.add_argument("--result-json", type=Path, default=None, help="write every figure and request here")
    p.add_argument("--result-md", type=Path, default=None, help="write the Markdown table here")
    p.add_argument("--plot", type=Path, default=None, help="write latency CDFs and request spans here (PNG)")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from tiermoe.errors import ConfigError

    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ConfigError("--num-prompts, --input-len and --output-len must be >= 1")
    if not (args.request_rate > 0 and args.burstiness > 0 and 0 <= args.range_ratio < 1):
        raise ConfigError("--request-rate and --burstiness must be > 0 and --range-ratio in [0, 1)")
    try:
        result = run(args)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"cannot benchmark {args.url}: {e}") from None
    table = markdown(result)
    print(table)
    if args.result_json:
        args.result_json.write_text(json.dumps(result, indent=1))
    if args.result_md:
        args.result_md.write_text(table)
    if args.plot:
        plot(result, args.plot)
    return 0 if result["failed"] == 0 else 1

