"""bf16 against fp32 on a larger random model: tiermoe bf16 (this tree, and a baseline tree) and transformers bf16.

    flock -x /tmp/tiermoe-cpu.lock python -m bench.bf16_numerics [--model DIR] [--tokens 64] [--baseline REV]
        [--reps 3] [--out bench/results]

Without --model it uses bench/peers' mixtral-0.6b (random weights of Mixtral's layout, bf16 on disk; built and
cached on first use). transformers fp32 generates `--tokens` greedy tokens for each prompt of bench/decode_speed;
then, teacher-forced on those tokens, every engine's logits at each step are compared with the fp32 ones (tiermoe
through its decode path, one token per step; transformers in one forward). Reported per step: max and mean
|logit - fp32 logit| (median over prompts), their medians over all steps and prompts, and how many greedy tokens
each engine generates on its own before it first leaves the fp32 tokens. With --baseline (a git revision), the
same numbers for tiermoe at that revision, and bf16 decode speed of both trees, measured interleaved (each
repetition runs the baseline then this tree, each in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def agreement(tokens: list[int], reference: list[int]) -> int:
    """Tokens generated before the first one that differs from the reference."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(reference))


def worker(model: Path, ref_file: Path, speed_only: bool) -> dict:
    """Run in a fresh process whose `tiermoe` and `bench` are the tree under test (PYTHONPATH): tiermoe bf16's
    per-step distances and greedy tokens, or only its decode speed."""
    from bench.decode_speed import tiermoe_decode
    from bench.logit_diff import decode_logits
    from tiermoe import LLM

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    ref = torch.load(ref_file)
    llm = LLM(model, dtype="bfloat16")
    out = {"tok_s": [], "steps_max": [], "steps_mean": [], "agreement": []}
    for prompt, tokens, exact in zip(ref["prompts"], ref["tokens"], ref["logits"], strict=True):
        speed, generated = tiermoe_decode(llm, prompt, len(tokens))
        out["tok_s"].append(speed)
        if not speed_only:
            diff = (decode_logits(llm, prompt, tokens) - exact).abs()  # [n, V]
            out["steps_max"].append(diff.amax(-1).tolist())
            out["steps_mean"].append(diff.mean(-1).tolist())
            out["agreement"].append(agreement(generated, tokens))
    return out


def run_tree(tree: Path, label: str, model: Path, ref_file: Path, speed_only: bool) -> dict:
    """`worker` in a subprocess importing tiermoe from `tree`, with its own kernel build folder."""
    from tiermoe.kernels.build import build_dir

    env = {**os.environ, "PYTHONPATH": str(tree), "TIERMOE_KERNELS_DIR": str(build_dir() / f"bench-{label}")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(ref_file), "--model", str(model)]
    proc = subprocess.run(cmd + (["--speed-only"] if speed_only else []), env=env, cwd=tree, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def transformers_bf16(model: Path, ref: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from bench.logit_diff import reference_run, teacher_forced

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    out = {"steps_max": [], "steps_mean": [], "agreement": []}
    for prompt, tokens, exact in zip(ref["prompts"], ref["tokens"], ref["logits"], strict=True):
        diff = (teacher_forced(hf, prompt, tokens) - exact).abs()
        out["steps_max"].append(diff.amax(-1).tolist())
        out["steps_mean"].append(diff.mean(-1).tolist())
        out["agreement"].append(agreement(reference_run(hf, prompt, len(tokens))[0], tokens))
    return out


def fp32_reference(model: Path, prompts: list[list[int]], n: int) -> dict:
    from transformers import AutoModelForCausalLM

    from bench.logit_diff import reference_run

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    runs = [reference_run(hf, p, n) for p in prompts]
    return {"prompts": prompts, "tokens": [t for t, _ in runs], "logits": [g for _, g in runs]}


def summary(engine: dict) -> dict:
    """Median over prompts per step, and over every step and prompt."""
    flat = {k: [v for row in engine[k] for v in row] for k in ("steps_max", "steps_mean")}
    return {"per_step_max": [statistics.median(s) for s in zip(*engine["steps_max"], strict=True)],
            "per_step_mean": [statistics.median(s) for s in zip(*engine["steps_mean"], strict=True)],
            "median_max": statistics.median(flat["steps_max"]), "median_mean": statistics.median(flat["steps_mean"]),
            "agreement": engine["agreement"]}


def table(engines: dict[str, dict], n: int, show_steps: int) -> str:
    from bench.report import markdown_table

    names = list(engines)
    headers = ["step"] + [f"{name} max / mean" for name in names]
    rows = [[str(i)] + [f"{e['per_step_max'][i]:.4f} / {e['per_step_mean'][i]:.4f}" for e in engines.values()]
            for i in range(min(show_steps, n))]
    rows.append(["median, all steps and prompts"] + [f"**{e['median_max']:.4f} / {e['median_mean']:.4f}**"
                                                     for e in engines.values()])
    rows.append([f"greedy tokens equal to fp32's (of {n}), per prompt"]
                + [", ".join(map(str, e["agreement"])) for e in engines.values()])
    return markdown_table(headers, rows)


def default_model() -> Path:
    from bench.peers.model import SHAPES, build_model

    return build_model(SHAPES["mixtral-0.6b"], Path.home() / ".cache" / "tiermoe" / "peers" / "mixtral-0.6b" / "hf")


def main() -> None:
    from bench.decode_speed import _prompt_ids
    from bench.report import machine, write
    from tiermoe import kernels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: peers' mixtral-0.6b)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--baseline", default=None,
                    help="a git revision, or a checkout's folder, to compare with (numerics and speed)")
    ap.add_argument("--reps", type=int, default=3, help="speed repetitions per tree")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show-steps", type=int, default=8, help="steps listed one by one in the table")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.model, args.worker, args.speed_only)))
        return
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        ref_file = Path(tmp) / "fp32.pt"
        torch.save(fp32_reference(model, _prompt_ids(model), args.tokens), ref_file)
        trees = {"tiermoe bf16": REPO}
        checkout = args.baseline is not None and not Path(args.baseline).is_dir()
        if args.baseline:
            base = Path(tmp) / "baseline" if checkout else Path(args.baseline)
            if checkout:
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.baseline],
                               check=True, capture_output=True)
            rev = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, check=False).stdout.strip() or args.baseline
            trees = {f"tiermoe bf16 at {rev} (before)": base, **trees}
        try:
            runs = {label: run_tree(tree, f"t{i}", model, ref_file, False) for i, (label, tree) in
                    enumerate(trees.items())}
            speed = {label: [] for label in trees}
            for _ in range(args.reps if args.baseline else 0):  # interleaved: baseline, then this tree
                for i, (label, tree) in enumerate(trees.items()):
                    speed[label].append(statistics.median(run_tree(tree, f"t{i}", model, ref_file, True)["tok_s"]))
        finally:
            if checkout:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
        engines = {"transformers bf16": summary(transformers_bf16(model, torch.load(ref_file)))}
        engines.update({label: summary(r) for label, r in runs.items()})
    text = table(engines, args.tokens, args.show_steps)
    text += (f"\n\nModel: {model.name if model.name != 'hf' else model.parent.name}; prompts: bench/decode_speed's "
             f"{len(_prompt_ids(model))}; max and mean |logit - transformers fp32 logit| over the vocabulary, "
             "median over prompts per step; teacher-forced on transformers fp32's greedy tokens. "
             f"Kernel path: {kernels.backend()}.")
    if args.baseline:
        rates = {label: statistics.median(v) for label, v in speed.items()}
        text += "\n\nbf16 decode tok/s (median of " + str(args.reps) + " interleaved runs, batch 1, " \
                f"{args.tokens} tokens): " + ", ".join(f"{k}: {v:.1f}" for k, v in rates.items()) + "."
    result = {"machine": machine(), "model": str(model.name), "tokens": args.tokens, "engines": engines,
              "speed_tok_s": speed if args.baseline else None, "args": {k: str(v) for k, v in vars(args).items()}}
    write(args.out, "bf16_numerics", result, text)


if __name__ == "__main__":
    main()
