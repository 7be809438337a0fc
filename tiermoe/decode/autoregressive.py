"""Autoregressive decoding: prefill every prompt in one pass, then one token per sequence per step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tiermoe.decode.sampler import sample
from tiermoe.decode.sequence import Sequence
from tiermoe.models.layers import ForwardBatch, SeqSlice
from tiermoe.models.transformer import CausalLM


def forward_new_tokens(model: CausalLM, seqs: list[Sequence], observer=None) -> torch.Tensor:
    """Run every sequence's uncached tokens through the model, flattened; returns last-row logits [n, V].

    `observer` (a RoutingRecorder or RoutingReplay) is told where each row comes from before the pass.
    """
    if observer is not None:
        observer.begin(seqs)
    ids, positions, slices, start = [], [], [], 0
    for seq in seqs:
        new = seq.new_tokens()
        ids.extend(new)
        positions.extend(range(seq.cached, seq.cached + len(new)))
        slices.append(SeqSlice(seq.cache, start, len(new), seq.cached))
        start += len(new)
    device = model.lm_head.weight.device
    batch = ForwardBatch(torch.tensor(positions, device=device), slices)
    hidden = model(torch.tensor(ids, device=device), batch)  # [T, H]
    if observer is not None:
        observer.end()
    last_rows = torch.tensor([s.start + s.length - 1 for s in slices], device=device)
    for seq, s in zip(seqs, slices, strict=True):
        seq.cached += s.length
    return model.logits(hidden[last_rows]).cpu()  # only the rows that sample: [n, V]


def step(model: CausalLM, seqs: list[Sequence], tokenizer, observer=None) -> None:
    """One engine step: forward the running sequences and append one sampled token to each."""
    logits = forward_new_tokens(model, seqs, observer)
    for seq, row in zip(seqs, logits, strict=True):
        seq.append(sample(row, seq.params, seq.generator), tokenizer)


def generate(model: CausalLM, seqs: list[Sequence], tokenizer,
             on_step: Callable[[list[Sequence]], None] | None = None, observer=None) -> None:
    """Decode until every sequence has finished; `on_step` sees the sequences after each step."""
    running = [s for s in seqs if not s.finished]
    with torch.inference_mode():
        while running:
            step(model, running, tokenizer, observer)
            if on_step is not None:
                on_step(running)
            running = [s for s in running if not s.finished]
