"""Where tiermoe's memory goes: RSS (anonymous / file-backed), and the model file's pages in the page cache, after
each start-up stage and after an offloaded decode, in a fresh process per configuration, cold page cache.

    python -m bench.memory_footprint [--model DIR] [--budget 33MiB] [--limit 488MiB]

Configurations (interleaved, one process each): a fixed expert budget (`--expert-cache`, token embedding resident),
and `--memory-limit` (embedding on disk, I/O threads = top_k). Writes bench/results/memory_footprint.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.report import machine, write

PEERS_MODEL = Path.home() / ".cache" / "tiermoe" / "peers" / "mixtral-0.6b" / "hf"
STAGE = """
import json, subprocess, sys, time
def stage(name, out=[]):
    s = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    kib = lambda k: int(s[k].split()[0]) * 1024
    res = subprocess.run(["fincore", "-b", "-n", "-o", "RES", MODEL + "/model.safetensors"], capture_output=True,
                         text=True).stdout.strip()
    out.append({"stage": name, "rss": kib("VmRSS"), "anon": kib("RssAnon"), "file": kib("RssFile"),
                "shmem": kib("RssShmem"), "model_page_cache": int(res or 0), "t": time.perf_counter()})
    return out
MODEL, kwargs, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
stage("python")
import torch
stage("import torch")
from tiermoe import LLM, SamplingParams
stage("import tiermoe")
llm = LLM(MODEL, dtype="bfloat16", threads=2, **kwargs)
stage("LLM() loaded")
from bench.peers.model import prompt_ids
from pathlib import Path
ids = prompt_ids(Path(MODEL), 32)
out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)[0]
rows = stage(f"after {tokens}-token decode")
print(json.dumps({"stages": rows, "modules": {m: m in sys.modules for m in ("transformers", "torch._dynamo")},
                  "tokens": list(out.outputs[0].token_ids), "memory": out.stats.get("memory")}))
"""


def measure(model: Path, kwargs: dict, tokens: int) -> dict:
    from tiermoe.offload.tiers.direct_io import drop_page_cache

    drop_page_cache(model / "model.safetensors")
    proc = subprocess.run([sys.executable, "-c", STAGE, str(model), json.dumps(kwargs), str(tokens)],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.splitlines()[-1])


def table(runs: dict[str, dict]) -> str:
    rows = ["| configuration | stage | RSS MiB | anonymous | file-backed | model file in page cache | s |",
            "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        t0 = run["stages"][0]["t"]
        for s in run["stages"]:
            rows.append(f"| {name} | {s['stage']} | {s['rss'] >> 20} | {(s['anon'] + s['shmem']) >> 20} | "
                        f"{s['file'] >> 20} | {s['model_page_cache'] >> 20} | {s['t'] - t0:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory_footprint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=PEERS_MODEL, help="default: bench.peers' mixtral-0.6b")
    ap.add_argument("--budget", default="33MiB", help="expert cache of the fixed-budget configuration")
    ap.add_argument("--limit", default="1000MiB", help="memory_limit of the sized configuration")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    configs = {f"expert_cache={args.budget}": {"expert_cache": args.budget},
               f"memory_limit={args.limit}": {"memory_limit": args.limit, "max_model_len": 64}}
    runs = {name: measure(args.model, kw, args.tokens) for name, kw in configs.items()}
    same = len({json.dumps(r["tokens"]) for r in runs.values()}) == 1
    notes = [f"same tokens in every configuration: {same}"]
    for name, run in runs.items():
        imported = [m for m, on in run["modules"].items() if on]
        said = f"imported {', '.join(imported)}" if imported else "transformers, torch._dynamo not imported"
        notes.append(f"{name}: {said}")
    plan = runs[f"memory_limit={args.limit}"]["memory"]
    if plan:
        notes.append("memory_limit split: " + ", ".join(f"{k} {plan[k] >> 20} MiB" for k in
                     ("runtime", "weights", "kv_cache", "activations", "read_buffers", "margin", "experts")))
    md = f"Model: {_shown(args.model)}, bfloat16, 2 threads, {args.tokens} tokens.\n\n{table(runs)}\n\n" + \
        "\n".join(f"- {n}" for n in notes)
    write(args.out, "memory_footprint", {"machine": machine(), "runs": runs,
                                         "args": vars(args) | {"model": _shown(args.model), "out": str(args.out)}}, md)


def _shown(path: Path) -> str:
    """The path with the home folder as ~ (no machine paths in results)."""
    return str(path).replace(str(Path.home()), "~", 1)


if __name__ == "__main__":
    main()
