"""How far tiermoe's decode logits are from transformers' fp32 logits, step by step, on the same tokens.

    python -m bench.logit_diff [--peer-model DIR] [--tokens 32] [--label NAME] [--out bench/results]

For each tiny random family of the test suite (and, with --peer-model, a checkpoint such as bench/peers'
mixtral-0.6b): transformers fp32 generates `--tokens` greedy tokens; tiermoe then decodes the same tokens one at a
time (teacher-forced, each step through its decode path: batch 1, one new row) in fp32 and in bf16. Reported: the
max and mean |logit difference| over every decode step and vocabulary entry, and whether tiermoe's greedy choice
agrees at every step. Run it from an older checkout (`PYTHONPATH=<old tree> python <this file>`, with a Python whose
tiermoe is not an editable install of this one) to compare before/after.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.report import machine, markdown_table, write
from tests.tiny_models import FAMILIES, build_tiny
from tiermoe import LLM, SamplingParams
from tiermoe.engine.model_runner import forward_new_tokens

PROMPT = [3, 17, 42, 9, 77, 5]


def reference_run(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits that chose each of them [n, V] (one forward over the whole sequence)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        logits = model(out).logits[0, len(prompt) - 1:-1].float()
    return out[0, len(prompt):].tolist(), logits


def decode_logits(llm: LLM, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """tiermoe's logits at each step when fed `tokens` one at a time after the prompt [n, V]."""
    seq = llm._make_sequence(prompt, SamplingParams(temperature=0, max_tokens=len(tokens) + 1, ignore_eos=True))
    rows = []
    with torch.inference_mode():
        for tok in tokens:
            rows.append(forward_new_tokens(llm.model, [seq])[0].float())
            seq.output_ids.append(tok)
    return torch.stack(rows)


def compare(name: str, folder: Path, reference, prompt: list[int], n: int) -> list[dict]:
    tokens, ref_logits = reference_run(reference, prompt, n)
    records = []
    for dtype in ("float32", "bfloat16"):
        ours = decode_logits(LLM(folder, dtype=dtype), prompt, tokens)
        records.append({"model": name, "dtype": dtype, "steps": n,
                        "max_abs_logit_diff": float((ours - ref_logits).abs().max()),
                        "mean_abs_logit_diff": float((ours - ref_logits).abs().mean()),
                        "logit_range": float(ref_logits.abs().max()),
                        "greedy_agrees": bool((ours.argmax(-1) == torch.tensor(tokens)).all())})
        print(records[-1], flush=True)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-model", type=Path, help="a checkpoint folder to compare too (e.g. bench/peers' model)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="", help="suffix of the output name, e.g. 'before'")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            from tests.tiny_models import make_reference

            folder = build_tiny(family, Path(tmp) / family)
            records += compare(family, folder, make_reference(family), PROMPT, args.tokens)
    if args.peer_model is not None:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(args.peer_model, dtype=torch.float32).eval()
        records += compare(args.peer_model.name, args.peer_model, ref, list(range(100, 132)), args.tokens)
    try:
        from tiermoe import kernels

        backend = kernels.backend()
    except ImportError:  # a checkout from before tiermoe.kernels
        backend = "none (before tiermoe.kernels)"
    table = markdown_table(["model", "dtype", "decode steps", "max abs logit diff vs transformers fp32",
                            "mean abs logit diff", "max abs logit", "greedy agrees"],
                           [[r["model"], r["dtype"], r["steps"], r["max_abs_logit_diff"], r["mean_abs_logit_diff"],
                             r["logit_range"], "yes" if r["greedy_agrees"] else "NO"] for r in records])
    table += f"\n\nKernel path: {backend}."
    name = "logit_diff" + (f"_{args.label}" if args.label else "")
    write(args.out, name, {"machine": machine(), "backend": backend, "records": records,
                           "args": {k: str(v) for k, v in vars(args).items()}}, table)


if __name__ == "__main__":
    main()
