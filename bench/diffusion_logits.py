"""Block diffusion on a tiny LLaDA2-shaped model with LLaDA2.0's vocabulary (157,184): peak memory of the logits
path, and NFE / tokens per forward of decoding.

    python -m bench.diffusion_logits [--prompt 512] [--out bench/results]

Logits: one denoising step of a block of 32 masked positions after a prompt of `--prompt` tokens. "full" is what
the public generate() does -- the head over every row of the window ([T x V] fp32), then the sampling softmax over
the block; "chunked" is tiermoe's path (only the masked rows, `rows` at a time, reduced at once to token and
confidence). Peak = the most bytes of tensors allocated at once inside the call (torch profiler, CPU), weights
excluded. Decoding: greedy, 64 new tokens, block 32, per-block steps 32, several thresholds; the weights are random,
so the numbers say how the accounting works, not how fast a trained model unmasks.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.report import machine, markdown_table, write
from tests.tiny_diffusion_models import build_tiny_diffusion
from tiermoe import LLM, SamplingParams
from tiermoe.decode.remasking import logit_rows, predict

VOCAB, MASK, EOS = 157184, 156895, 156892
BLOCK = 32


def peak_bytes(fn) -> int:
    """Most bytes held at once by tensors allocated (and not yet freed) while `fn` runs, on the CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are charged to the op that made them, frees arrive as "[memory]" events: replay them in order
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    held = most = 0
    for e in events:
        held += e.self_cpu_memory_usage
        most = max(most, held)
    return most


def full_logits(model, hidden: torch.Tensor) -> None:
    logits = model.logits(hidden)  # [T, V]
    logits[-BLOCK:].softmax(-1).max(-1)


def logits_rows(llm: LLM, prompt: int) -> list[list]:
    hidden = torch.randn(prompt + BLOCK, llm.model.shape.hidden_size)
    greedy = SamplingParams(temperature=0)
    rows = [["full [T x V]", prompt + BLOCK, prompt + BLOCK, peak_bytes(lambda: full_logits(llm.model, hidden))]]
    for per_call in (logit_rows(VOCAB), 8, 1):
        def chunked(per_call=per_call):
            predict(llm.model, hidden[-BLOCK:], greedy, None, per_call, MASK, True)

        rows.append([f"chunked, {per_call} rows per call", BLOCK, min(per_call, BLOCK), peak_bytes(chunked)])
    return [[name, t, c, round(b / 2**20, 2), round(c * VOCAB * 4 / 2**20, 2)] for name, t, c, b in rows]


def decode_rows(llm: LLM) -> list[list]:
    rows = []
    prompt = list(range(100, 140))
    for threshold in (0.95, 0.5, 0.1, 1.0):
        params = SamplingParams(temperature=0, max_tokens=64, block_length=BLOCK, steps=BLOCK, threshold=threshold,
                                ignore_eos=True)
        out = llm.generate([prompt], params)[0]
        s = out.stats["diffusion"]
        rows.append([threshold, s["nfe"], s["output_tokens"], round(s["tokens_per_forward"], 2), s["forward_rows"],
                     s["logit_rows"], round(out.metrics.total_time, 3)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = build_tiny_diffusion("llada2_moe", Path(tmp) / "llada2", vocab_size=VOCAB, mask_token_id=MASK,
                                      pad_token_id=EOS)
        llm = LLM(folder)
        memory = logits_rows(llm, args.prompt)
    with tempfile.TemporaryDirectory() as tmp:
        decoding = decode_rows(LLM(build_tiny_diffusion("llada2_moe", Path(tmp) / "llada2")))
    table = markdown_table(["logits path", "rows in", "rows per lm_head call", "peak MiB", "one call's logits MiB"],
                           memory)
    table += "\n\n" + markdown_table(["threshold", "NFE", "tokens", "tokens/forward", "forward rows", "logit rows",
                                      "seconds"], decoding)
    write(args.out, "diffusion_logits", {"machine": machine(), "prompt": args.prompt, "vocab": VOCAB,
                                         "memory": memory, "decoding": decoding}, table)


if __name__ == "__main__":
    main()
