"""One forward pass over every scheduled request's tokens, flattened into one batch, and per-request sampling.

Rows of the batch are independent of each other bit for bit (tiermoe.kernels' batch-invariant mode, set by the
engine), so what a request computes does not depend on what else runs in the same step.
"""

from __future__ import annotations

import torch

from tiermoe.decode.logprobs import logprob_entries
from tiermoe.decode.remasking import logit_rows
from tiermoe.decode.sampler import sample
from tiermoe.engine.kv_cache_manager import PagedBatch
from tiermoe.engine.request import Request
from tiermoe.models.layers import ForwardBatch, SeqSlice
from tiermoe.models.transformer import CausalLM

Scheduled = list[tuple[Request, int]]  # (request, tokens of it computed in this pass)


def forward(model: CausalLM, scheduled: Scheduled, observer=None, tokenizer=None) -> torch.Tensor:
    """Compute the next n uncached tokens of each request; returns the logits [r, V] of the r requests whose last
    token this pass computes (those that sample), in order.

    `observer` (a RoutingRecorder or RoutingReplay) is told where each row comes from before the pass. A request that
    asked for prompt logprobs gets those of its prompt rows in this pass (`tokenizer` names their tokens).
    """
    if observer is not None:
        observer.begin(scheduled)
    ids, positions, slices, start = [], [], [], 0
    for req, n in scheduled:
        ids.extend(req.ids(req.cached, req.cached + n))
        positions.extend(range(req.cached, req.cached + n))
        slices.append(SeqSlice(req.cache, start, n, req.cached))
        start += n
    device = model.lm_head.weight.device
    batch = ForwardBatch(torch.tensor(positions, device=device), slices, paged=PagedBatch.of(slices))
    hidden = model(torch.tensor(ids, device=device), batch)
    if observer is not None:
        observer.end()
    last_rows = []
    for (req, _), s in zip(scheduled, slices, strict=True):
        if req.prompt_logprobs is not None:
            req.prompt_logprobs.extend(prompt_logprobs(model, hidden[s.start:s.start + s.length], s.past, req,
                                                       tokenizer))
        req.cached += s.length
        if req.cached == req.num_tokens:
            last_rows.append(s.start + s.length - 1)
    return model.logits(hidden[torch.tensor(last_rows, dtype=torch.long, device=device)]).cpu()  # [r, V]


def prompt_logprobs(model: CausalLM, hidden: torch.Tensor, past: int, req: Request, tokenizer) -> list[dict]:
    """Logprobs of the prompt tokens that rows at positions [past, past + t) predict (hidden [t, H]).

    The row at position p predicts prompt token p + 1; rows past the prompt's second-to-last token predict generated
    tokens and are left out, as are positions already reported (a preempted request recomputes them). Logits are
    made `logit_rows` rows at a time, so [t, V] never exists whole.
    """
    prompt = req.prompt_ids
    first = max(past, len(req.prompt_logprobs) - 1)  # prompt_logprobs[0] is None (nothing predicts token 0)
    end = min(past + hidden.shape[0], len(prompt) - 1)  # positions [first, end) predict prompt tokens
    if end <= first:
        return []
    targets = torch.tensor(prompt[first + 1:end + 1], dtype=torch.long)  # [end - first]
    rows, entries = logit_rows(model.shape.vocab_size), []
    for h, t in zip(hidden[first - past:end - past].split(rows), targets.split(rows), strict=True):
        entries += logprob_entries(model.logits(h).cpu(), t, req.params.prompt_logprobs, tokenizer)  # [c, V]
    return entries


def sample_next(reqs: list[Request], logits: torch.Tensor, tokenizer) -> None:
    """Append one token to each request, sampled from its logits row [V] with its own params and generator."""
    for req, row in zip(reqs, logits, strict=True):
        token = sample(row, req.params, req.sampler)
        logprobs = None
        if req.params.logprobs is not None:
            (logprobs,) = logprob_entries(row[None], torch.tensor([token]), req.params.logprobs, tokenizer)
        req.append(token, tokenizer, logprobs)


class ModelRunner:
    """Runs a scheduled step of autoregressive requests: forward, then sample for those at their last token."""

    def __init__(self, model: CausalLM, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.observer = None  # a routing recorder or replay, for the calls that ask for one

    @torch.inference_mode()
    def execute(self, scheduled: Scheduled) -> list[Request]:
        """Returns the requests that sampled a token."""
        logits = forward(self.model, scheduled, self.observer, self.tokenizer)
        sampling = [req for req, _ in scheduled if req.cached == req.num_tokens]
        sample_next(sampling, logits, self.tokenizer)
        return sampling


def forward_new_tokens(model: CausalLM, reqs: list[Request], observer=None, tokenizer=None) -> torch.Tensor:
    """`forward` of all of each request's uncached tokens (tools and tests driving the model directly)."""
    return forward(model, [(r, r.num_tokens - r.cached) for r in reqs], observer, tokenizer)


def step(model: CausalLM, reqs: list[Request], tokenizer, observer=None) -> None:
    """Forward the requests' uncached tokens and append one sampled token to each (no scheduler)."""
    sample_next(reqs, forward_new_tokens(model, reqs, observer, tokenizer), tokenizer)
