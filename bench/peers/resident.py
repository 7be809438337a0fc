"""Part (a): resident decode, batch 1, greedy; engines interleaved, one process per engine per repetition."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from bench.peers.process import run_engine
from bench.peers.runners import EngineRun, RunSpec


def measure_resident(specs: list[RunSpec], processes: int, timeout: float) -> list[EngineRun]:
    """Run every spec once per repetition, in turn, each in a fresh process; all runs in order."""
    runs = []
    for rep in range(processes):
        for spec in specs:
            run = run_engine(spec, timeout=timeout)
            print(f"  rep {rep + 1}/{processes} {spec.engine:<12} {spec.dtype:<8} "
                  + (f"decode {_fmt(run.decode_tok_s)} tok/s" if run.decode_tok_s else f"FAILED: {run.error}"),
                  flush=True)
            runs.append(run)
    return runs


def summarize(runs: list[EngineRun]) -> list[dict]:
    """One row per (engine, dtype): medians and min/max over every run of every process, token checks."""
    rows = []
    for key in dict.fromkeys((r.engine, r.dtype) for r in runs):
        mine = [r for r in runs if (r.engine, r.dtype) == key]
        decode = [x for r in mine for x in r.decode_tok_s]
        prefill = [x for r in mine for x in r.prefill_tok_s]
        tokens = [t for r in mine for t in r.token_ids]
        rows.append({
            "engine": key[0], "dtype": key[1], "runs": len(decode), "failed_processes": sum(not r.decode_tok_s
                                                                                           for r in mine),
            "decode_tok_s": _stats(decode), "prefill_tok_s": _stats(prefill),
            "load_s": statistics.median(r.load_s for r in mine),
            "peak_rss_bytes": max(r.peak_rss_bytes for r in mine),
            "deterministic": all(t == tokens[0] for t in tokens),
            "tokens": tokens[0] if tokens else None,
        })
    return rows


def token_checks(rows: list[dict], reference: str = "transformers") -> list[dict]:
    """Each engine's tokens against the reference engine's in the same dtype: identical, and agreement %.

    Agreement is the share of generated tokens before the first difference (greedy decoding of a random model
    diverges for good after one different token, so later positions say little).
    """
    ref = {r["dtype"]: r["tokens"] for r in rows if r["engine"] == reference and r["tokens"]}
    checks = []
    for r in rows:
        if r["engine"] == reference or not r["tokens"] or r["dtype"] not in ref:
            continue
        a, b = r["tokens"], ref[r["dtype"]]
        checks.append({"engine": r["engine"], "dtype": r["dtype"], "against": reference, "identical": a == b,
                       "agreement_pct": 100 * common_prefix(a, b) / len(b),
                       "must_match": r["engine"] == "tiermoe" and r["dtype"] == "float32"})
    return checks


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _stats(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def runs_as_dicts(runs: list[EngineRun]) -> list[dict]:
    return [asdict(r) for r in runs]
