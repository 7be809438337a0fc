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


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory):
    """Per family: a bf16 checkpoint and its twin holding the same weights widened to fp32 (lazily built)."""
    root, built = tmp_path_factory.mktemp("bf16"), {}

    def get(family: str) -> tuple:
        if family not in built:
            model = make_reference(family).to(torch.bfloat16)
            model.save_pretrained(root / f"{family}-bf16")
            model.float().save_pretrained(root / f"{family}-fp32")
            built[family] = root / f"{family}-bf16", root / f"{family}-fp32"
        return built[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_keeps_a_bf16_checkpoint_s_weights_and_computes_as_on_them_widened(family, bf16_checkpoints):
    narrow_folder, wide_folder = bf16_checkpoints(family)
    narrow, wide = LLM(narrow_folder), LLM(wide_folder)  # dtype float32
    params = dict(narrow.model.named_parameters())
    assert params["lm_head.weight"].dtype == torch.bfloat16 and params["model.norm.weight"].dtype == torch.float32
    moe = narrow.model.moe_blocks[0]
    (_, w), = moe.store.fetch(moe.layer, [0])
    assert w.gate_up.dtype == w.down.dtype == torch.bfloat16
    nbytes = [sum(p.nbytes for p in llm.model.parameters()) for llm in (narrow, wide)]
    assert nbytes[0] < 0.6 * nbytes[1], nbytes
    for prompt in PROMPTS:
        assert torch.equal(last_logits(narrow, prompt), last_logits(wide, prompt))
    tokens = ours(narrow, PROMPTS)
    assert tokens == ours(wide, PROMPTS)
    # PROMPTS[1]: with the rounded weights PROMPTS[0] meets a near-tie in qwen3_moe that transformers' summation
    # order decides the other way (for the fp32 twin as well)
    reference = make_reference(family).to(torch.bfloat16).float()
    expected = reference.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert tokens[1] == expected[0, len(PROMPTS[1]):].tolist()
    assert ours(LLM(narrow_folder, expert_cache="30%"), PROMPTS) == tokens


def last_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    seq = llm._make_sequence(prompt, GREEDY_32)
    with torch.inference_mode():
        return forward_new_tokens(llm.model, [seq])[0]
