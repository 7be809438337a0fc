"""The pieces of a denoising step: predict a token and a confidence for each masked position, then choose which
predictions to commit (unmask) this step.

NOTE: logits are computed only for the masked positions, `rows` at a time, and reduced to (token, confidence) at
once; the full [positions x vocab] tensor never exists (dLLM-Serve's logit-aware activation budgeting: LLaDA2's
vocabulary is 157k, so one block of 32 rows is already 20 MB of fp32 logits, a whole prompt hundreds).

Shape legend: n = masked positions predicted this step, c = rows in one lm_head call, V = vocabulary.
"""

from __future__ import annotations

import torch

from tiermoe import kernels
from tiermoe.decode.sampler import sampling_probs
from tiermoe.models.transformer import CausalLM
from tiermoe.sampling_params import SamplingParams

LOGIT_BUDGET = 32 << 20  # bytes of fp32 logits one lm_head call may produce


def logit_rows(vocab_size: int, budget: int = LOGIT_BUDGET) -> int:
    """Rows per lm_head call so that one call's fp32 logits stay within `budget` bytes."""
    return max(1, budget // (vocab_size * 4))


def predict(model: CausalLM, hidden: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
            rows: int, mask_id: int, tempered_confidence: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [n, H] of masked positions -> token ids [n], confidences [n] (fp32), `rows` rows per lm_head call.

    Greedy (temperature 0) takes the argmax, and its confidence is its softmax probability. Otherwise a token is
    sampled from the tempered, min-p/top-k/top-p filtered distribution (the autoregressive sampler's filters); its
    confidence is its probability under that distribution when `tempered_confidence` (LLaDA2), under the plain
    softmax otherwise (LLaDA).
    """
    tokens, confidence = [], []
    for chunk in hidden.split(rows):
        logits = model.logits(chunk)  # [c, V] fp32
        if not params.greedy:
            logits = logits.cpu()  # the request's generator lives on the CPU
        # A trained model never predicts the mask token; a random tiny one might, and would re-mask its own position.
        logits[:, mask_id] = float("-inf")
        t, c = _choose(logits, params, generator, tempered_confidence)
        tokens.append(t)
        confidence.append(c)
    if not tokens:
        return hidden.new_empty(0, dtype=torch.long), hidden.new_empty(0, dtype=torch.float)
    return torch.cat(tokens), torch.cat(confidence)


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
            tempered_confidence: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [c, V] -> tokens [c], confidences [c]."""
    if params.greedy:
        best = logits.max(-1)
        return best.indices, probability(logits, best.values)
    probs = sampling_probs(logits, params)  # [c, V]
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [c]
    if tempered_confidence:
        return tokens, probs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, probability(logits, logits.gather(1, tokens[:, None]).squeeze(1))


def probability(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each row's chosen logit: logits [c, V], chosen [c] -> [c], without a second [c, V].
    Each row's value is the one it gets alone (kernels.logsumexp in batch-invariant mode), so a position's confidence
    does not depend on how many masked positions share its lm_head call."""
    return (chosen - kernels.logsumexp(logits)).exp()


def random_confidence(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's "random" remasking: the order in which positions are committed is uniform at random."""
    return torch.rand(n, generator=generator)


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many positions to commit at each of `steps` steps: `masked` spread evenly, the remainder first."""
    base, extra = divmod(masked, steps)
    return [base + (i < extra) for i in range(steps)]


def commit_confident(confidence: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
    """LLaDA2: every position whose confidence exceeds `threshold` if there are at least k, else the k most
    confident (all when fewer remain). Returns indices into `confidence`."""
    high = (confidence > threshold).nonzero().squeeze(1)
    if len(high) >= k:
        return high
    return commit_top_k(confidence, k)


def commit_top_k(confidence: torch.Tensor, k: int) -> torch.Tensor:
    """The k most confident positions (all when fewer remain)."""
    return torch.topk(confidence, min(k, confidence.shape[0])).indices
