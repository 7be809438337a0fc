"""Resident decode speed: tiermoe against transformers' `generate`, same model, same prompts, one run.

    python -m bench.decode_speed [--model DIR] [--reps 5] [--tokens 64] [--out bench/results]

Without --model it measures the built-in model and a random Mixtral-shaped model built here. Reported: median
decode tokens/s over the repetitions (time after the first token), and the ratio tiermoe / transformers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.report import machine, markdown_table, median, write
from tiermoe import LLM, SamplingParams
from tiermoe.models.registry import DEFAULT_MODEL

PROMPTS = ["ROMEO:", "To be, or not to be", "My lord, the king is coming"]


class _Clock:
    """A transformers streamer that timestamps the first generated token."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def transformers_decode(model, prompt_ids: list[int], n: int) -> tuple[float, list[int]]:
    clock = _Clock()
    start = time.perf_counter()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         streamer=clock)
    end = time.perf_counter()
    del start
    return (n - 1) / (end - clock.first), out[0, len(prompt_ids):].tolist()


def tiermoe_decode(llm: LLM, prompt_ids: list[int], n: int) -> tuple[float, list[int]]:
    out = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    m = out.metrics
    return (n - 1) / (m.finish_time - m.first_token_time), out.outputs[0].token_ids


def measure(folder: Path, prompts: list[list[int]], n: int, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    llm = LLM(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours, theirs, identical = [], [], True
    for _ in range(reps):
        for p in prompts:
            with torch.inference_mode():
                t_speed, t_ids = transformers_decode(ref, p, n)
            o_speed, o_ids = tiermoe_decode(llm, p, n)
            theirs.append(t_speed)
            ours.append(o_speed)
            identical &= t_ids == o_ids
    return {"model": folder.name, "tokens": n, "reps": reps, "tiermoe_tok_s": median(ours),
            "transformers_tok_s": median(theirs), "ratio": median(ours) / median(theirs),
            "identical_tokens": identical}


def random_mixtral(folder: Path) -> Path:
    """A Mixtral-shaped random model: 4 layers, hidden 512, 8 experts of 1024, top-2 (~110M params)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=2048)
    MixtralForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [args.model] if args.model else [DEFAULT_MODEL, random_mixtral(Path(tmp) / "mixtral")]
        for folder in models:
            if not (folder / "config.json").exists():
                print(f"skipping {folder}: not built")
                continue
            ids = _prompt_ids(folder)
            results.append(measure(folder, ids, args.tokens, args.reps))
    rows = [[Path(r["model"]).name, r["tokens"], r["tiermoe_tok_s"], r["transformers_tok_s"], r["ratio"],
             r["identical_tokens"]] for r in results]
    table = markdown_table(["model", "new tokens", "tiermoe tok/s", "transformers tok/s", "ratio", "same tokens"],
                           rows)
    write(args.out, "decode_speed", {"machine": machine(), "results": results}, table)


def _prompt_ids(folder: Path) -> list[list[int]]:
    if (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        return [tok.encode(p) for p in PROMPTS]
    return [[11, 22, 33], [5, 6, 7, 8, 9, 10], [100, 200, 300, 400]]


if __name__ == "__main__":
    main()
