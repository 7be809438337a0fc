"""Side-by-side benchmark: tiermoe against llama.cpp (llama-cpp-python) and transformers, same model, same memory.

    pip install -e ".[peers]"        # llama-cpp-python (builds from source, ~5+ min), accelerate, gguf
    python -m bench.peers [--shape mixtral-0.6b] [--parts resident,memory] [--limits 40,60,80,100]

The model is built here (random weights of the chosen shape, a tokenizer trained offline, GGUF files from
llama.cpp's own converter) and cached in --work-dir. (a) resident decode: batch 1, greedy, every engine in its own
process, engines interleaved per repetition; (b) equal memory: each engine in its own process under a cgroup
memory limit (page cache counted) at each --limits percentage of the model's bytes, cold page cache.
Writes bench/results/peers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import asdict, replace
from pathlib import Path

from bench.peers import cgroup
from bench.peers.memory import (
    SIZED,
    LimitPlan,
    disk_bandwidth,
    disk_bound,
    fixed_footprints,
    limit_row,
    run_at_limit,
    tiermoe_sizes_itself,
)
from bench.peers.model import SHAPES, build_model, model_bytes, prompt_ids
from bench.peers.report import describe_environment, environment, loadavg, save
from bench.peers.resident import measure_resident, runs_as_dicts, summarize, token_checks
from bench.peers.runners import TORCH_DTYPES, RunSpec
from tiermoe.offload.tiers.budget import parse_budget

ENGINES = ("tiermoe", "llama.cpp", "transformers")
NEEDS = {"llama.cpp": "llama_cpp", "transformers": "transformers"}  # module each peer needs
NEEDS_LIMITED = {"transformers": "accelerate"}  # ... and for disk offload under a limit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-0.6b", help="model shape to build")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "tiermoe" / "peers",
                    help="where the built model, GGUF files and converter are cached")
    ap.add_argument("--parts", default="resident,memory", help="resident (a), memory (b), or both")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    ap.add_argument("--dtypes", default="bfloat16,float32", help="dtypes of the resident part")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per resident run")
    ap.add_argument("--processes", type=int, default=3, help="resident: processes per engine (interleaved)")
    ap.add_argument("--runs", type=int, default=3, help="resident: timed runs per process (after one warm-up)")
    ap.add_argument("--limits", default="40,60,80,100",
                    help="memory limits: %% of the model's safetensors bytes, or sizes like 600MiB")
    ap.add_argument("--limit-tokens", type=int, default=16, help="new tokens per memory-limited run")
    ap.add_argument("--limit-dtype", choices=TORCH_DTYPES, default="bfloat16")
    ap.add_argument("--tiermoe-budget", default=None,
                    help="expert cache per limit (comma list, or one for all) instead of fitting it")
    ap.add_argument("--tiermoe-prefetch", choices=["plain", "residual"], default=None,
                    help="tiermoe's --prefetch in the memory-limited runs")
    ap.add_argument("--headroom", default="32MiB", help="memory left free under a limit when sizing an engine")
    ap.add_argument("--fit-retries", type=int, default=3, help="smaller settings tried after an OOM kill")
    ap.add_argument("--drop-caches", action="store_true",
                    help="also drop every cached page (root) before limited runs, not only the model's")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a process is killed")
    ap.add_argument("--label", default=None, help="printed above the tables, e.g. 'shared machine'")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="peers", help="output file stem")
    return ap.parse_args(argv)


def available(engines: list[str], modules: dict[str, str], notes: list[str], why: str) -> list[str]:
    """The engines whose packages are installed; a note for each skipped one."""
    keep = []
    for e in engines:
        module = modules.get(e)
        if module and importlib.util.find_spec(module) is None:
            notes.append(f"{e} skipped{why}: `{module}` is not installed (pip install -e \".[peers]\")")
        else:
            keep.append(e)
    return keep


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env = environment(argv)
    print(describe_environment(env), flush=True)
    notes: list[str] = []
    engines = available(args.engines.split(","), NEEDS, notes, "")
    parts = args.parts.split(",")
    shape = SHAPES[args.shape]
    print(f"building {args.shape} in {args.work_dir} (cached)", flush=True)
    folder = build_model(shape, args.work_dir / args.shape / "hf")
    prompt = prompt_ids(folder, args.prompt_tokens)
    dtypes = args.dtypes.split(",")
    ggufs = _ggufs(folder, set(dtypes) | {args.limit_dtype}, args) if "llama.cpp" in engines else {}
    result = {"environment": env, "label": args.label, "notes": notes,
              "model": {"shape": args.shape, **asdict(shape), "params": shape.params(), "bytes": model_bytes(folder),
                        "prompt_tokens": len(prompt), "threads": args.threads,
                        "gguf": {d: {"bytes": Path(p).stat().st_size} for d, p in ggufs.items()}}}

    def spec(engine: str, dtype: str, **kw) -> RunSpec:
        return RunSpec(engine=engine, model=str(folder), gguf=ggufs.get(dtype), dtype=dtype, prompt=prompt,
                       threads=args.threads, **kw)

    if "tiermoe" in engines:  # its kernels are compiled once per machine, here: never inside a timed or limited run
        from tiermoe import kernels

        result["environment"]["tiermoe_kernels"] = kernels.backend()
    if "resident" in parts:
        print("(a) resident decode", flush=True)
        specs = [spec(e, d, new_tokens=args.tokens, runs=args.runs) for d in dtypes for e in engines]
        runs = measure_resident(specs, args.processes, args.timeout)
        rows = summarize(runs)
        result["resident"] = {"rows": rows, "checks": token_checks(rows), "runs": runs_as_dicts(runs),
                              "new_tokens": args.tokens, "processes": args.processes, "runs_per_process": args.runs,
                              "loadavg_after": loadavg()}
    if "memory" in parts:
        reason = cgroup.unavailable()
        if reason:
            notes.append(f"(b) equal memory skipped: {reason}")
            print(notes[-1], flush=True)
        else:
            limited = available(engines, NEEDS_LIMITED, notes, " under a limit")
            result["memory"] = equal_memory(args, limited, folder, shape, ggufs, spec, result.get("resident"))
            result["memory"]["loadavg_after"] = loadavg()
    _check_tiermoe_identical(result)
    save(args.out, args.name, result, args.label)
    return result


def equal_memory(args, engines: list[str], folder: Path, shape, ggufs: dict, spec, resident: dict | None) -> dict:
    """Part (b): fixed footprints, then every limit with every engine in turn."""
    dtype, n = args.limit_dtype, args.limit_tokens
    offload = args.work_dir / args.shape / f"offload-{dtype}"
    base = {e: spec(e, dtype, new_tokens=n, runs=1, warmup=False, offload_dir=str(offload)) for e in engines}
    if "tiermoe" in base:
        base["tiermoe"] = replace(base["tiermoe"], prefetch=args.tiermoe_prefetch)
    per_param = 2 if dtype == "bfloat16" else 4
    expert_bytes = 3 * shape.hidden_size * shape.intermediate_size * per_param
    floors = {"tiermoe": shape.num_experts_per_tok * expert_bytes, "transformers": 0}  # tiermoe: one token's experts
    total = model_bytes(folder)
    limits = parse_limits(args.limits, total)
    budgets = _fixed_budgets(args.tiermoe_budget, len(limits), shape.expert_params() * per_param)
    sized = [e for e in engines if e in SIZED and not (e == "tiermoe" and (budgets or tiermoe_sizes_itself()))]
    plan = LimitPlan(base, {e: floors[e] for e in sized}, [folder, *map(Path, ggufs.values()), offload],
                     parse_budget(args.headroom, 0), args.fit_retries, args.timeout, args.drop_caches)
    print("(b) equal memory: fixed footprints", flush=True)
    footprints = fixed_footprints(plan)
    disk = [disk_bandwidth(folder, dtype)]
    print("  disk, cold expert reads: " + ", ".join(f"{d} at once {b / 1e6:.0f} MB/s" for d, b in disk[0].items()),
          flush=True)
    references = _resident_tokens(resident, engines, dtype, n, spec, args.timeout)
    rows, attempts = [], []
    for i, limit in enumerate(limits):
        pct = 100 * limit / total
        for engine in engines:
            given = budgets[i] if budgets and engine == "tiermoe" else None
            tries = run_at_limit(plan, engine, limit, footprints.get(engine, {}).get("fixed_bytes"), given)
            row = limit_row(pct, limit, tries, references.get(engine))
            print(f"  {pct:.0f}% {engine:<12} {row['setting']:<28} "
                  + (f"{row['decode_tok_s']:.2f} tok/s" if row["decode_tok_s"] else "OOM" if row["oom_killed"]
                     else f"failed: {row['error']}"), flush=True)
            rows.append(row)
            attempts.append([asdict(t) for t in tries])
    disk.append(disk_bandwidth(folder, dtype))  # again after the runs: the disk's own drift
    best = max(b for d in disk for b in d.values())
    for row in rows:
        if row["engine"] == "tiermoe":
            row["disk_bound"] = disk_bound(row, best)
    return {"rows": rows, "attempts": attempts, "new_tokens": n, "dtype": dtype, "model_bytes": total,
            "headroom_bytes": plan.headroom, "footprints": footprints,
            "disk_bandwidth": [{str(k): v for k, v in d.items()} for d in disk]}


def parse_limits(text: str, total: int) -> list[int]:
    """Limits in bytes: a plain number is a percentage of `total`, else a size (600MiB) or NN%."""
    return [parse_budget(p + "%" if p.replace(".", "", 1).isdigit() else p, total) for p in text.split(",")]


def _fixed_budgets(value: str | None, n: int, all_experts: int) -> list[int] | None:
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) not in (1, n):
        raise SystemExit(f"--tiermoe-budget: give one value or one per limit ({n}), got {len(parts)}")
    return [parse_budget(p, all_experts) for p in (parts * n if len(parts) == 1 else parts)]


def _resident_tokens(resident: dict | None, engines: list[str], dtype: str, n: int, spec, timeout) -> dict:
    """Each engine's resident tokens in `dtype` (from part (a), else one resident run each)."""
    from bench.peers.process import run_engine

    out = {}
    for r in (resident or {}).get("rows", []):
        if r["dtype"] == dtype and r["tokens"] and len(r["tokens"]) >= n:
            out[r["engine"]] = r["tokens"]
    for engine in engines:
        if engine not in out:
            run = run_engine(spec(engine, dtype, new_tokens=n, runs=1), timeout=timeout)
            out[engine] = run.token_ids[0] if run.token_ids else None
    return out


def _ggufs(folder: Path, dtypes: set[str], args) -> dict[str, str]:
    from bench.peers.gguf_convert import convert, tensor_types

    out = {}
    for dtype in sorted(dtypes):
        path = convert(folder, dtype, folder.parent / "gguf", args.work_dir)
        print(f"  {path.name}: {tensor_types(path)}", flush=True)
        out[dtype] = str(path)
    return out


def _check_tiermoe_identical(result: dict) -> None:
    """Print what must hold: tiermoe fp32 == transformers fp32 (resident) and tiermoe limited == resident."""
    for c in (result.get("resident") or {}).get("checks", []):
        if c["must_match"]:
            print(f"tiermoe float32 tokens identical to transformers float32: {c['identical']}")
    for r in (result.get("memory") or {}).get("rows", []):
        if r["engine"] == "tiermoe" and r["same_tokens_as_resident"] is False:
            print(f"tiermoe at {r['limit_pct']:.0f}% did NOT reproduce its resident tokens")


if __name__ == "__main__":
    main()
