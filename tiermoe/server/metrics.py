"""/metrics in Prometheus' text format: vLLM's metric names under a `tiermoe:` prefix, plus the expert store's.

Latencies are measured by the server per request (what a client sees, queueing included); engine-wide counts
(running and waiting requests, KV usage, token totals, expert-cache hits, misses, bytes read, I/O stall) are read
from `engine.stats()` when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# (engine.stats() key, "store." for the expert store's, metric name, help, kind)
ENGINE_METRICS = (
    ("num_running", "num_requests_running", "Requests being decoded.", "gauge"),
    ("num_waiting", "num_requests_waiting", "Requests waiting to be scheduled.", "gauge"),
    ("kv_usage", "kv_cache_usage_perc", "KV cache usage, 1 = full.", "gauge"),
    ("prompt_tokens", "prompt_tokens", "Prefill tokens processed.", "counter"),
    ("generation_tokens", "generation_tokens", "Generated tokens.", "counter"),
    ("store.hits", "expert_cache_hits", "Routed experts found in the expert cache.", "counter"),
    ("store.misses", "expert_cache_misses", "Routed experts read from the backing tier.", "counter"),
    ("store.bytes_read", "expert_bytes_read", "Bytes of expert weights read from the backing tier.", "counter"),
    ("store.stall_s", "expert_io_stall_seconds", "Seconds the model waited for expert reads.", "counter"),
)


class EngineCollector(Collector):
    """Engine-wide values, read from `stats()` at scrape time (nothing while the model loads)."""

    def __init__(self, stats: Callable[[], dict | None], labels: dict[str, str]):
        self.stats, self.labels = stats, labels

    def collect(self) -> Iterator[Metric]:
        stats = self.stats() or {}
        for key, name, doc, kind in ENGINE_METRICS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(f"tiermoe:{name}", doc, labels=list(self.labels))
            value = store_stats(stats).get(key[6:]) if key.startswith("store.") else stats.get(key)
            if value is not None:
                metric.add_metric(list(self.labels.values()), float(value))
            yield metric


def store_stats(stats: dict) -> dict:
    """The expert store's totals: hits, misses, bytes_read, stall_s."""
    store = stats.get("store") or {}
    store = store.get("total", store)
    return store | {"stall_s": store.get("stall_s", store.get("stall_time_s"))}


class Metrics:
    """The server's registry: request latencies and outcomes observed here, engine values collected at scrape."""

    def __init__(self, model_name: str, stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = list(self.labels)
        self.ttft = Histogram("tiermoe:time_to_first_token_seconds", "Time to first token.", names,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("tiermoe:time_per_output_token_seconds", "Time per output token after the first.",
                              names, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("tiermoe:e2e_request_latency_seconds", "End-to-end request latency.", names,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_len = Histogram("tiermoe:request_prompt_tokens", "Prompt tokens per request.", names,
                                    buckets=TOKEN_BUCKETS, registry=self.registry)
        self.gen_len = Histogram("tiermoe:request_generation_tokens", "Generated tokens per request.", names,
                                 buckets=TOKEN_BUCKETS, registry=self.registry)
        self.success = Counter("tiermoe:request_success", "Requests finished, by finish reason.",
                               [*names, "finished_reason"], registry=self.registry)
        self.failure = Counter("tiermoe:request_failure", "Requests that failed or were aborted, by cause.",
                               [*names, "cause"], registry=self.registry)
        self.registry.register(EngineCollector(stats, self.labels))

    def finished(self, ttft: float | None, e2e: float, prompt_tokens: int, tokens: int, reasons: list[str]) -> None:
        """Record one request that ran to its end."""
        model = self.labels["model_name"]
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
            if tokens > 1:
                self.tpot.labels(model).observe((e2e - ttft) / (tokens - 1))
        self.e2e.labels(model).observe(e2e)
        self.prompt_len.labels(model).observe(prompt_tokens)
        self.gen_len.labels(model).observe(tokens)
        for reason in reasons:
            self.success.labels(model, reason).inc()

    def failed(self, cause: str) -> None:
        self.failure.labels(self.labels["model_name"], cause).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
