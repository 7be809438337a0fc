"""`tiermoe bench serve` against the running server: every request completes, the figures are consistent, and
JSON, Markdown and plot are written."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.server.conftest import API_KEY


def test_bench_serve_reports_latencies_and_throughput(server, tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, "-m", "tiermoe.cli", "bench", "serve", "--url", server.url, "--api-key",
                          API_KEY, "--num-prompts", "8", "--request-rate", "50", "--burstiness", "0.5",
                          "--input-len", "16", "--range-ratio", "0.5", "--output-len", "6",
                          "--result-json", f"{out}.json", "--result-md", f"{out}.md", "--plot", f"{out}.png"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 8 and result["failed"] == 0 and result["total_output_tokens"] == 8 * 6
    assert result["model"] == server.model and result["output_throughput"] > 0
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = result["latency_ms"][name]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"], name
    assert all(r["ttft"] < r["e2e"] for r in result["requests"])
    assert all(8 <= r["prompt_tokens"] <= 24 for r in result["requests"])
    assert "| TTFT |" in (tmp_path / "bench.md").read_text() and "8/8 requests completed" in run.stdout
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
