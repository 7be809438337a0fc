"""Token selection from one row of logits, in vLLM's order:

1. min_tokens: EOS and stop_token_ids get -inf while fewer than min_tokens tokens are generated;
2. penalties: repetition (CTRL's rule over prompt and output tokens), then frequency, then presence (OpenAI's,
   over output tokens);
3. temperature 0: argmax of the penalised logits; otherwise divide by the temperature, then min_p, top_k, top_p
   filter the distribution and a token is drawn with the request's generator.

`sample` is a pure function of (logits row, params, per-request state): it never changes the row, so the logprobs
reported to the user (tiermoe.decode.logprobs) are those of the model's own distribution, as vLLM reports them by
default ("raw_logprobs": before penalties, temperature and filtering).

Shape legend: V = vocabulary, c = rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tiermoe.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplerState:
    """What sampling one request's next token reads besides its logits."""

    generator: torch.Generator | None  # seeded per request; None: torch's global generator
    prompt_ids: torch.Tensor  # [P] long: the repetition penalty covers the prompt's tokens too
    output_ids: list[int]  # the tokens generated so far (the request's own list, appended as it grows)
    stop_ids: torch.Tensor  # [S] long: EOS and stop_token_ids, masked until min_tokens tokens are generated

    @classmethod
    def new(cls, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
            eos_ids: Iterable[int]) -> SamplerState:
        # vLLM masks EOS during min_tokens even with ignore_eos (its stop set always holds EOS).
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        stop_ids = sorted(set(params.stop_token_ids) | set(eos_ids))
        return cls(generator, torch.tensor(prompt_ids, dtype=torch.long), output_ids,
                   torch.tensor(stop_ids, dtype=torch.long))


def sample(logits: torch.Tensor, params: SamplingParams, state: SamplerState) -> int:
    """logits [V] fp32 (left as they are) -> token id."""
    logits = mask_stop_tokens(logits, params, state)
    logits = apply_penalties(logits, params, state)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = sampling_probs(logits, params)
    return int(torch.multinomial(probs, 1, generator=state.generator))


def mask_stop_tokens(logits: torch.Tensor, params: SamplingParams, state: SamplerState) -> torch.Tensor:
    """Before min_tokens tokens are generated the request cannot end on a token: [V] -> [V]."""
    if len(state.output_ids) >= params.min_tokens or state.stop_ids.numel() == 0:
        return logits
    return logits.index_fill(-1, state.stop_ids, float("-inf"))


def apply_penalties(logits: torch.Tensor, params: SamplingParams, state: SamplerState) -> torch.Tensor:
    """Repetition, frequency and presence penalties, as vLLM applies them: [V] -> [V]."""
    if params.repetition_penalty == 1.0 and not params.frequency_penalty and not params.presence_penalty:
        return logits
    vocab = logits.shape[-1]
    output = torch.tensor(state.output_ids, dtype=torch.long)  # [O]
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[state.prompt_ids] = True
        seen[output] = True
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.frequency_penalty or params.presence_penalty:
        counts = torch.bincount(output, minlength=vocab).to(logits.dtype)  # [V]
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then min_p, top_k, top_p (vLLM's order): logits [..., V] -> probabilities [..., V]."""
    logits = logits / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        floor = params.min_p * probs.amax(dim=-1, keepdim=True)  # [..., 1]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return _top_p(probs, params.top_p) if params.top_p < 1.0 else probs


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one): [..., V]."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
    outside[..., 0] = False  # a top_p that rounds to 0 in fp32 keeps the most likely token too
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
