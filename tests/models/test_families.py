"""One runner for every family: our resident path against transformers on tiny random checkpoints."""

import pytest
import torch

from tests.tiny_models import FAMILIES, make_reference
from tiermoe import LLM, SamplingParams
from tiermoe.engine.model_runner import forward_new_tokens

PROMPTS = [[3, 17, 42, 9, 77, 5], [88, 1, 64], [12, 99, 31, 7, 54, 23, 70, 2, 45, 16, 61]]
GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32)


def reference_greedy(family: str, prompt: list[int], n: int = 32, dtype=torch.float32) -> list[int]:
    ref = make_reference(family).to(dtype)
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def ours(llm: LLM, prompts, params=GREEDY_32) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_tokens_match_transformers(family, tiny_models):
    llm = LLM(tiny_models(family))
    assert ours(llm, [PROMPTS[0]]) == [reference_greedy(family, PROMPTS[0])]


@pytest.mark.parametrize("family", FAMILIES)
def test_last_position_logits_match_transformers(family, tiny_models):
    llm, ref = LLM(tiny_models(family)), make_reference(family)
    for prompt in PROMPTS:
        with torch.inference_mode():
            expected = ref(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(last_logits(llm, prompt), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_different_lengths_equals_each_alone(family, tiny_models):
    llm = LLM(tiny_models(family))
    alone = [ours(llm, [p])[0] for p in PROMPTS]
    assert ours(llm, PROMPTS) == alone


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_per_expert_layouts_give_identical_output(family, tiny_models):
    per_expert, fused = LLM(tiny_models(family, "per_expert")), LLM(tiny_models(family, "fused"))
    assert fused.index.expert_layout == "fused" and per_expert.index.expert_layout == "per_expert"
    assert ours(fused, PROMPTS) == ours(per_expert, PROMPTS)


def last_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    seq = llm._make_sequence(prompt, GREEDY_32)
    with torch.inference_mode():
        return forward_new_tokens(llm.model, [seq])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_close_to_transformers_in_bfloat16(family, tiny_models):
    """bf16 keeps ~3 significant digits, so near-tied tokens may flip between kernels: compare logits, not tokens."""
    llm = LLM(tiny_models(family), dtype="bfloat16")
    assert llm.model.lm_head.weight.dtype == torch.bfloat16
    ref = make_reference(family).to(torch.bfloat16)
    for prompt in PROMPTS:
        with torch.inference_mode():
            expected = ref(torch.tensor([prompt])).logits[0, -1].float()
        torch.testing.assert_close(last_logits(llm, prompt), expected, atol=0.1, rtol=0.02)
