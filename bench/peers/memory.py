"""Part (b): every engine under the same cgroup memory limit (page cache counted), from a cold page cache.

llama.cpp runs as users run it (mmap). tiermoe is given the limit (`memory_limit`) and sizes its expert cache
itself. transformers offloads to disk with accelerate: its CPU budget (and tiermoe's expert cache when a fixed
budget is asked for, or with a tiermoe that has no `memory_limit`) is sized to the limit from the engine's fixed
footprint, measured once in a first run at its smallest setting in a group without a limit; a run the OOM killer
ends is retried with a 25% smaller setting, so the setting that fits is approached from above.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bench.peers.process import run_engine
from bench.peers.resident import common_prefix
from bench.peers.runners import EngineRun, RunSpec
from tiermoe.offload.tiers.direct_io import drop_page_cache

SIZED = ("tiermoe", "transformers")  # engines with a memory setting to fit to the limit
SELF_SIZED = ("tiermoe",)  # engines given the limit itself, when they take one (tiermoe_sizes_itself)


def tiermoe_sizes_itself() -> bool:
    """Whether the installed tiermoe takes `memory_limit`."""
    from tiermoe.config import EngineConfig

    return "memory_limit" in EngineConfig.__dataclass_fields__


@dataclass
class LimitPlan:
    """What every limited run shares."""

    base: dict[str, RunSpec]  # per engine: the spec of a cold single run (budget filled in per limit)
    floors: dict[str, int]  # per sized engine: its smallest setting (tiermoe: the experts one token needs)
    evict: list[Path]  # files to drop from the page cache before each run
    headroom: int  # bytes left free under the limit besides the fixed footprint
    retries: int
    timeout: float
    drop_all_caches: bool = False


def cold_cache(files: list[Path], drop_all: bool) -> None:
    """Evict the model's files from the page cache; with drop_all (root), every clean cached page too."""
    for f in files:
        for path in ([f] if f.is_file() else sorted(p for p in f.rglob("*") if p.is_file())):
            drop_page_cache(path)
    if drop_all:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fixed_footprints(plan: LimitPlan) -> dict[str, dict]:
    """Per sized engine, a cold run at its smallest setting in a group without a limit: the group's peak, less the
    page cache still charged to it at the end (a limit reclaims that) and less the setting.

    The group's peak, not RSS: RSS counts shared libraries another process already cached, which are not charged
    to the group. The estimate errs low when page cache grew after the peak; the OOM retries correct that.
    """
    out = {}
    for engine, floor in plan.floors.items():
        cold_cache(plan.evict, plan.drop_all_caches)
        run = run_engine(replace(plan.base[engine], budget=floor), None, _group(engine, "footprint"), plan.timeout)
        if not run.decode_tok_s:
            raise RuntimeError(f"{engine} failed at its smallest setting ({floor} bytes): {run.error}")
        fixed = max(0, run.group_peak_bytes - run.group_cache_bytes - floor)
        out[engine] = {"setting_bytes": floor, "group_peak_bytes": run.group_peak_bytes,
                       "group_cache_bytes": run.group_cache_bytes, "peak_rss_bytes": run.peak_rss_bytes,
                       "load_peak_rss_bytes": run.load_peak_rss_bytes, "fixed_bytes": fixed}
        print(f"  {engine} fixed footprint {fixed / 2**20:.0f} MiB (group peak {run.group_peak_bytes / 2**20:.0f} "
              f"MiB, page cache {run.group_cache_bytes / 2**20:.0f} MiB, peak RSS {run.peak_rss_bytes / 2**20:.0f} "
              f"MiB ({run.load_peak_rss_bytes / 2**20:.0f} MiB once loaded), at setting {floor / 2**20:.1f} MiB)",
              flush=True)
    return out


def run_at_limit(plan: LimitPlan, engine: str, limit: int, fixed: int | None = None,
                 budget: int | None = None) -> list[EngineRun]:
    """Cold runs of `engine` under `limit`: one (llama.cpp, or a given budget), else for a sized engine from the
    budget its fixed footprint leaves, smaller after each OOM kill, until one run is not killed."""
    if budget is None and engine in SELF_SIZED and engine not in plan.floors:
        cold_cache(plan.evict, plan.drop_all_caches)
        return [run_engine(replace(plan.base[engine], memory_limit=limit), limit, _group(engine, limit),
                           plan.timeout)]
    fitting = budget is None and engine in plan.floors
    if fitting:
        floor = plan.floors[engine]
        budget = max(floor, limit - fixed - plan.headroom)
    attempts = []
    for _ in range(plan.retries + 1 if fitting else 1):
        cold_cache(plan.evict, plan.drop_all_caches)
        run = run_engine(replace(plan.base[engine], budget=budget), limit, _group(engine, limit), plan.timeout)
        attempts.append(run)
        if not fitting or not run.oom_killed or budget == floor:
            break
        budget = max(floor, budget * 3 // 4)
    return attempts


def disk_bandwidth(folder: Path, dtype: str, depths: tuple[int, ...] = (1, 2), reads: int = 32) -> dict[int, float]:
    """Bytes/s of cold expert reads as tiermoe makes them (direct I/O, its read plan), `depth` experts at once, in a
    random order: what bounds decode once the expert cache misses (missed bytes per token / this)."""
    import torch

    from tiermoe.checkpoint import CheckpointIndex
    from tiermoe.models.registry import family
    from tiermoe.offload.tiers.direct_io import DirectReader
    from tiermoe.offload.tiers.expert_reads import plan_read, read_expert

    index = CheckpointIndex(folder, family(json.loads((folder / "config.json").read_text())["model_type"]).sanitize)
    plans = [plan_read(spec, getattr(torch, dtype)) for spec in index.experts().values()]
    out = {}
    for depth in depths:
        chosen = random.Random(depth).choices(plans, k=reads)
        cold_cache([folder], False)
        with DirectReader(max_workers=1) as reader, ThreadPoolExecutor(depth) as pool:
            start = time.perf_counter()
            done = sum(n for _, n in pool.map(lambda p: read_expert(reader, p, getattr(torch, dtype)), chosen))
            out[depth] = done / (time.perf_counter() - start)
    return out


def disk_bound(row: dict, bandwidth: float) -> dict | None:
    """tiermoe's decode against the disk: missed bytes per token / bandwidth, as tokens/s, and the share reached."""
    decode = (row.get("extra") or {}).get("decode")
    if not decode or not decode["bytes_read_per_token"] or not row["decode_tok_s"]:
        return None
    bound = bandwidth / decode["bytes_read_per_token"]
    return {"bytes_per_token": decode["bytes_read_per_token"], "bandwidth": bandwidth, "tok_s": bound,
            "reached": row["decode_tok_s"] / bound}


def limit_row(pct: float, limit: int, attempts: list[EngineRun], reference: list[int] | None) -> dict:
    """The table row of an engine at a limit: its last attempt, checked against its resident tokens."""
    run = attempts[-1]
    tokens = run.token_ids[0] if run.token_ids else None
    same = None
    if tokens is not None and reference is not None:
        same = common_prefix(tokens, reference) >= len(tokens)
    return {"limit_pct": pct, "limit_bytes": limit, "engine": run.engine, "dtype": run.dtype,
            "setting": run.setting, "attempts": len(attempts),
            "decode_tok_s": run.decode_tok_s[0] if run.decode_tok_s else None,
            "prefill_tok_s": run.prefill_tok_s[0] if run.prefill_tok_s else None, "load_s": run.load_s or None,
            "group_peak_bytes": run.group_peak_bytes,
            "read_bytes": run.group_read_bytes if run.group_read_bytes is not None else run.proc_read_bytes,
            "oom_killed": run.oom_killed, "exit_code": run.exit_code, "error": run.error,
            "same_tokens_as_resident": same, "extra": run.extra}


def _group(engine: str, tag) -> str:
    return f"tiermoe-peers-{os.getpid()}-{engine.replace('.', '')}-{tag}"
