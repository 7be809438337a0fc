"""bf16 against fp32: tiermoe's bf16 decode logits are no further from transformers' fp32 logits than transformers'
own bf16 logits are (teacher-forced on the fp32 greedy tokens, so both are measured at the same positions)."""

import statistics

import pytest
import torch

from bench.logit_diff import decode_logits, reference_run, step_distances, teacher_forced
from tests.tiny_models import FAMILIES, make_reference
from tiermoe import LLM

# Random tiny models route many tokens near a tie between two experts, and a near-tie decided the other way moves
# a step's logits by ~10x the rounding error: enough prompts and steps that the median measures rounding, not luck.
PROMPTS = [[3, 17, 42, 9, 77, 5], [88, 1, 64], [12, 99, 31, 7, 54, 23, 70, 2, 45, 16, 61], [5, 120, 33, 8],
           [71, 70, 69, 68, 67], [101, 2, 57, 90, 14, 26]]
STEPS = 24


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_is_no_further_from_fp32_than_transformers_bfloat16(family, tiny_models):
    exact_model, their_bf16 = make_reference(family), make_reference(family).to(torch.bfloat16)
    llm = LLM(tiny_models(family), dtype="bfloat16")
    ours, theirs = ([], []), ([], [])
    for prompt in PROMPTS:
        tokens, exact = reference_run(exact_model, prompt, STEPS)
        for acc, logits in ((ours, decode_logits(llm, prompt, tokens)),
                            (theirs, teacher_forced(their_bf16, prompt, tokens))):
            worst, mean = step_distances(logits, exact)
            acc[0].extend(worst)
            acc[1].extend(mean)
    median = statistics.median
    assert median(ours[0]) <= median(theirs[0]), "median over steps of max |logit - fp32 logit|"
    assert median(ours[1]) <= median(theirs[1]), "median over steps of mean |logit - fp32 logit|"
