"""Sampling and stopping rules of the autoregressive decoder, on a tiny random model."""

import json
import shutil

import pytest

from tiermoe import LLM, SamplingParams

PROMPT = [3, 17, 42, 9, 77, 5]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models("qwen2_moe"))


def ids(llm, params, prompt=PROMPT):
    return llm.generate([prompt], params)[0].outputs[0].token_ids


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(llm):
    params = SamplingParams(temperature=1.5, seed=7, max_tokens=24)
    first = ids(llm, params)
    assert first == ids(llm, params)
    assert first != ids(llm, SamplingParams(temperature=0, max_tokens=24))
    assert first != ids(llm, SamplingParams(temperature=1.5, seed=8, max_tokens=24))


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    greedy = ids(llm, SamplingParams(temperature=0, max_tokens=16))
    assert ids(llm, SamplingParams(temperature=2.0, top_k=1, seed=1, max_tokens=16)) == greedy
    assert ids(llm, SamplingParams(temperature=2.0, top_p=1e-6, seed=1, max_tokens=16)) == greedy
    # a top_p that rounds to 0 in fp32 (cumulative masses are fp32) still keeps the most likely token
    assert ids(llm, SamplingParams(temperature=2.0, top_p=1e-300, seed=1, max_tokens=16)) == greedy


def test_stop_token_ids_end_the_request_and_are_kept(llm):
    greedy = ids(llm, SamplingParams(temperature=0, max_tokens=16))
    stop = greedy[5]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop]))[0]
    first = greedy.index(stop)
    assert out.outputs[0].token_ids == greedy[: first + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop)


def test_eos_comes_from_generation_config(tiny_models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models("qwen2_moe"), folder)
    greedy = ids(LLM(folder), SamplingParams(temperature=0, max_tokens=16))
    eos = greedy[3]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    llm = LLM(folder)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert out.token_ids == greedy[: greedy.index(eos) + 1] and out.finish_reason == "stop"
    assert ids(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)) == greedy


def test_outputs_carry_counts_and_timing(llm):
    out = llm.generate([PROMPT, PROMPT[:2]], [SamplingParams(temperature=0, max_tokens=5),
                                              SamplingParams(temperature=0, max_tokens=9)])
    assert [o.num_completion_tokens for o in out] == [5, 9]
    assert [o.num_prompt_tokens for o in out] == [6, 2]
    for o in out:
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert 0 < o.metrics.time_to_first_token <= o.metrics.total_time


def test_stream_yields_every_token_and_ends_finished(llm):
    chunks = list(llm.stream(PROMPT, SamplingParams(temperature=0, max_tokens=7)))
    assert [len(c.outputs[0].token_ids) for c in chunks] == list(range(1, 8))
    assert chunks[-1].finished and not chunks[0].finished
    assert chunks[-1].outputs[0].token_ids == ids(llm, SamplingParams(temperature=0, max_tokens=7))
