"""Logprobs reported to the user: the model's own distribution (log-softmax of the raw logits, before penalties,
temperature and filtering), as vLLM reports them by default ("raw_logprobs").

Per position: the chosen token (the sampled one, or the prompt's next token) with its rank, then the `num` most
likely tokens (-1: the whole vocabulary) with ranks 1..num; a chosen token among those appears once.

Shape legend: c = rows, V = vocabulary, k = top tokens asked for.
"""

from __future__ import annotations

import torch

from tiermoe.outputs import Logprob


def logprob_entries(logits: torch.Tensor, chosen: torch.Tensor, num: int, tokenizer=None) -> list[dict[int, Logprob]]:
    """logits [c, V], chosen token ids [c] -> one {token id: Logprob} per row, the chosen token first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [c, V]
    chosen_lp = logprobs.gather(1, chosen[:, None])  # [c, 1]
    ranks = (logprobs > chosen_lp).sum(-1) + 1  # [c]
    k = logprobs.shape[-1] if num == -1 else num
    top = torch.topk(logprobs, k, dim=-1)  # values, indices [c, k]
    entries = []
    for t, lp, rank, top_ids, top_lps in zip(chosen.tolist(), chosen_lp[:, 0].tolist(), ranks.tolist(),
                                             top.indices.tolist(), top.values.tolist(), strict=True):
        entry = {t: Logprob(lp, rank)}
        for r, (i, v) in enumerate(zip(top_ids, top_lps, strict=True), start=1):
            entry.setdefault(i, Logprob(v, r))
        entries.append(entry)
    if tokenizer is not None:
        _decode_tokens(entries, tokenizer)
    return entries


def _decode_tokens(entries: list[dict[int, Logprob]], tokenizer) -> None:
    """Fill each Logprob's decoded_token with its token's text alone (special tokens by name)."""
    texts: dict[int, str] = {}
    for entry in entries:
        for token, lp in entry.items():
            if token not in texts:
                texts[token] = tokenizer.decode([token], skip_special_tokens=False)
            lp.decoded_token = texts[token]
