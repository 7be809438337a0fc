"""`sim cache` from the command line: table, JSON and plot."""

import argparse
import json

import numpy as np

from tiermoe.sim import cli
from tiermoe.sim.trace import Trace


def write_trace(tmp_path):
    rng = np.random.default_rng(1)
    experts = np.stack([rng.permutation(16)[:4] for _ in range(50 * 3)]).reshape(50, 3, 4)
    Trace(experts, np.ones(experts.shape), [0, 25], np.zeros(50, bool), np.arange(50)).save(
        tmp_path / "t", {"num_experts": 16})
    return str(tmp_path / "t.npz")


def test_json_output_is_only_json(tmp_path, capsys):
    path = write_trace(tmp_path)
    assert cli.main(["cache", "--trace", path, "--capacity", "25%,50%", "--policy", "lru,belady", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["policy"], r["capacity_items"]) for r in data["runs"]] == [("lru", 4), ("lru", 8), ("belady", 4),
                                                                          ("belady", 8)]


def test_table_and_plot(tmp_path, capsys):
    path = write_trace(tmp_path)
    png = tmp_path / "hit.png"
    assert cli.main(["cache", "--trace", path, "--capacity", "25%,50%,75%", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "mean hit" in out and "per-layer hit rate" in out and "belady@75%" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warmup_prefill_counts_decode_tokens_only(tmp_path, capsys):
    path = write_trace(tmp_path)
    trace = Trace.load(path)
    trace.is_prefill[:10] = True  # the first request's prompt
    trace.save(tmp_path / "p", {"num_experts": 16})
    assert cli.main(["cache", "--trace", str(tmp_path / "p.npz"), "--warmup-prefill", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["warmup_prefill"] and data["tokens"] == 40
    assert cli.main(["cache", "--trace", str(tmp_path / "p.npz"), "--warmup-prefill"]) == 0
    assert "40 decode (prefill-warmed) tokens" in capsys.readouterr().out
    assert cli.main(["cache", "--trace", str(tmp_path / "p.npz"), "--warmup-prefill", "batched", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prefill_order"] == "fetch_order" and data["tokens"] == 40


def test_errors_are_reported_not_raised(tmp_path, capsys):
    path = write_trace(tmp_path)
    assert cli.main(["cache", "--trace", path, "--capacity", "10%"]) == 2
    assert "minimum capacity is 4" in capsys.readouterr().err


def test_registers_on_the_main_cli():
    parser = argparse.ArgumentParser(prog="tiermoe")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sim", "cache", "--trace", "x.npz", "--policy", "lfu"])
    assert args.func is cli.run_cache and args.policy == ["lfu"] and args.capacity == ["25%", "50%"]
