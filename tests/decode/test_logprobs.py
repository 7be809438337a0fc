"""logprobs and prompt_logprobs against transformers' logits of the same tiny checkpoint: the model's own
distribution (vLLM's default, "raw_logprobs"), whatever penalties and temperature the sampler applied."""

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.engine import model_runner as autoregressive

PROMPT = [3, 17, 42, 9, 77, 5, 17, 42, 100, 64, 8]


@pytest.fixture(scope="module")
def llm(ar_folder):
    return LLM(ar_folder)


def ref_logprobs(ref, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the distribution of the token after ids[:i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)


def check_entry(entry, chosen: int, expected: torch.Tensor, num: int) -> None:
    """The chosen token first with its logprob and rank, then the `num` most likely with ranks 1..num."""
    assert next(iter(entry)) == chosen
    assert entry[chosen].logprob == pytest.approx(float(expected[chosen]), abs=1e-4)
    assert entry[chosen].rank == int((expected > expected[chosen]).sum()) + 1
    top = torch.topk(expected, num).indices.tolist()
    assert set(entry) == {chosen, *top}
    for rank, t in enumerate(top, start=1):
        if t != chosen:
            assert entry[t].rank == rank and entry[t].logprob == pytest.approx(float(expected[t]), abs=1e-4)


def test_logprobs_are_the_models_before_penalties_and_temperature(llm, ref):
    params = SamplingParams(temperature=1.6, seed=2, max_tokens=12, logprobs=5, repetition_penalty=1.5, top_k=20)
    out = llm.generate([PROMPT], params)[0].outputs[0]
    expected = ref_logprobs(ref, PROMPT + out.token_ids)[len(PROMPT) - 1:-1]  # [12, V]
    assert len(out.logprobs) == 12
    for entry, token, row in zip(out.logprobs, out.token_ids, expected, strict=True):
        check_entry(entry, token, row, 5)
    assert any(next(iter(e.values())).rank > 1 for e in out.logprobs)  # sampled, not always the most likely
    chosen = [e[t].logprob for e, t in zip(out.logprobs, out.token_ids, strict=True)]
    assert out.cumulative_logprob == pytest.approx(sum(chosen))


def test_logprobs_zero_and_all(llm, ref):
    zero = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=0))[0].outputs[0]
    assert [list(e) for e in zero.logprobs] == [[t] for t in zero.token_ids]
    assert all(e[t].rank == 1 for e, t in zip(zero.logprobs, zero.token_ids, strict=True))  # greedy picks rank 1
    everything = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2, logprobs=-1))[0].outputs[0]
    assert all(len(e) == 128 for e in everything.logprobs)
    total = torch.tensor([lp.logprob for lp in everything.logprobs[0].values()]).exp().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-4)
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2))[0].outputs[0].logprobs is None


def test_prompt_logprobs_in_chunks_never_the_whole_prompt(llm, ref, monkeypatch):
    rows_per_call = []
    logits = llm.model.logits

    def counting(hidden):
        rows_per_call.append(hidden.shape[0])
        return logits(hidden)

    monkeypatch.setattr(llm.model, "logits", counting)
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3))[0]
    assert plain.prompt_logprobs is None and max(rows_per_call) == 1  # not asked: only sampling rows
    monkeypatch.setattr(autoregressive, "logit_rows", lambda vocab: 3)
    rows_per_call.clear()
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4))[0]
    assert max(rows_per_call) == 3 and sum(rows_per_call) == len(PROMPT) - 1 + 3  # prompt rows + sampling rows
    expected = ref_logprobs(ref, PROMPT)
    assert len(out.prompt_logprobs) == len(PROMPT) and out.prompt_logprobs[0] is None
    for i in range(1, len(PROMPT)):
        check_entry(out.prompt_logprobs[i], PROMPT[i], expected[i - 1], 4)
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids


def test_prompt_logprobs_once_per_request_with_n(llm):
    out = llm.generate([PROMPT], SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=3, prompt_logprobs=0))[0]
    assert len(out.outputs) == 2 and len(out.prompt_logprobs) == len(PROMPT)
    assert [list(e) for e in out.prompt_logprobs[1:]] == [[t] for t in PROMPT[1:]]
    assert llm.generate([[7]], SamplingParams(max_tokens=2, prompt_logprobs=2))[0].prompt_logprobs == [None]


def test_logprobs_name_their_tokens():
    from tiermoe.models.registry import DEFAULT_MODEL

    llm = LLM(DEFAULT_MODEL)
    out = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=1))[0]
    for entry in out.outputs[0].logprobs + out.prompt_logprobs[1:]:
        for token, lp in entry.items():
            assert lp.decoded_token == llm.tokenizer.decode([token], skip_special_tokens=False)
    assert "".join(next(iter(e.values())).decoded_token for e in out.outputs[0].logprobs) == out.outputs[0].text
