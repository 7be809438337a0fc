"""Autoregressive decoding: prefill every prompt in one pass, then one token per sequence per step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tiermoe.decode.logprobs import logprob_entries
from tiermoe.decode.remasking import logit_rows
from tiermoe.decode.sampler import sample
from tiermoe.decode.sequence import Sequence
from tiermoe.models.layers import ForwardBatch, SeqSlice
from tiermoe.models.transformer import CausalLM


def forward_new_tokens(model: CausalLM, seqs: list[Sequence], observer=None, tokenizer=None) -> torch.Tensor:
    """Run every sequence's uncached tokens through the model, flattened; returns last-row logits [n, V].

    `observer` (a RoutingRecorder or RoutingReplay) is told where each row comes from before the pass. A sequence
    that asked for prompt logprobs gets those of the prompt rows in this pass (`tokenizer` names their tokens).
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
        if seq.prompt_logprobs is not None:
            seq.prompt_logprobs.extend(prompt_logprobs(model, hidden[s.start:s.start + s.length], s.past, seq,
                                                       tokenizer))
        seq.cached += s.length
    return model.logits(hidden[last_rows]).cpu()  # only the rows that sample: [n, V]


def prompt_logprobs(model: CausalLM, hidden: torch.Tensor, past: int, seq: Sequence, tokenizer) -> list[dict]:
    """Logprobs of the prompt tokens that rows at positions [past, past + t) predict (hidden [t, H]).

    The row at position p predicts prompt token p + 1; rows past the prompt's second-to-last token predict generated
    tokens and are left out. Logits are made `logit_rows` rows at a time, so [t, V] never exists whole.
    """
    prompt = seq.prompt_ids
    end = min(past + hidden.shape[0], len(prompt) - 1)  # positions [past, end) predict prompt tokens
    if end <= past:
        return []
    targets = torch.tensor(prompt[past + 1:end + 1], dtype=torch.long)  # [end - past]
    rows, entries = logit_rows(model.shape.vocab_size), []
    for h, t in zip(hidden[:end - past].split(rows), targets.split(rows), strict=True):
        entries += logprob_entries(model.logits(h).cpu(), t, seq.params.prompt_logprobs, tokenizer)  # [c, V]
    return entries


def step(model: CausalLM, seqs: list[Sequence], tokenizer, observer=None) -> None:
    """One engine step: forward the running sequences and append one sampled token to each."""
    logits = forward_new_tokens(model, seqs, observer, tokenizer)
    for seq, row in zip(seqs, logits, strict=True):
        token = sample(row, seq.params, seq.sampler)
        logprobs = None
        if seq.params.logprobs is not None:
            (logprobs,) = logprob_entries(row[None], torch.tensor([token]), seq.params.logprobs, tokenizer)
        seq.append(token, tokenizer, logprobs)


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
