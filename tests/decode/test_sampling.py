"""Sampling options against a plain re-computation: transformers' model of the same tiny checkpoint gives the
logits, the documented rule (vLLM's SamplingParams) is applied by hand, and the tokens must be the engine's.

Seeded draws are compared too: the reference draws from its own distribution with a generator seeded alike, so a
different rule (or order of rules) gives different tokens.
"""

import json
import math
import shutil

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.errors import RequestError

PROMPT = [3, 17, 42, 9, 77, 5, 17, 42]  # repeats tokens: the repetition penalty covers the prompt


@pytest.fixture(scope="module")
def llm(ar_folder):
    return LLM(ar_folder)


def next_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0, -1].float()


def penalised(logits: torch.Tensor, params: SamplingParams, prompt: list[int], out: list[int]) -> torch.Tensor:
    """CTRL's repetition penalty over prompt and output, then OpenAI's frequency and presence penalties."""
    logits = logits.clone()
    for t in set(prompt) | set(out):
        p = params.repetition_penalty
        logits[t] = logits[t] / p if logits[t] > 0 else logits[t] * p
    for t in set(out):
        logits[t] -= params.frequency_penalty * out.count(t) + params.presence_penalty
    return logits


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then min_p (relative to the most likely token), top_k, top_p, each by its definition."""
    logits = logits / params.temperature
    probs = torch.softmax(logits, -1)
    keep = [bool(probs[t] >= params.min_p * probs.max()) for t in range(len(logits))]
    if params.top_k > 0:
        kth = sorted((float(v) for t, v in enumerate(logits) if keep[t]), reverse=True)[:params.top_k][-1]
        keep = [k and float(logits[t]) >= kth for t, k in enumerate(keep)]
    probs = torch.softmax(logits.masked_fill(~torch.tensor(keep), -math.inf), -1)
    mass = 0.0
    for t in sorted(range(len(probs)), key=lambda t: -float(probs[t])):
        if mass >= params.top_p:
            keep[t] = False
        mass += float(probs[t])
    probs = probs * torch.tensor(keep)
    return probs / probs.sum()


def reference(ref, prompt: list[int], params: SamplingParams, stop_ids=()) -> list[int]:
    """Generate by the rules, recomputing the whole sequence for every token."""
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    out: list[int] = []
    while len(out) < params.max_tokens:
        logits = next_logits(ref, prompt + out)
        if len(out) < params.min_tokens:
            logits[list(stop_ids)] = -math.inf
        logits = penalised(logits, params, prompt, out)
        if params.temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(filtered_probs(logits, params), 1, generator=gen))
        out.append(token)
        if token in stop_ids:
            break
    return out


def ids(llm, params, prompt=PROMPT, index=0):
    return llm.generate([prompt], params)[0].outputs[index].token_ids


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.8), dict(repetition_penalty=0.6),
                                     dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
                                     dict(presence_penalty=-1.0, frequency_penalty=0.7, repetition_penalty=1.3)],
                         ids=["repetition", "repetition<1", "frequency", "presence", "all"])
def test_penalties_apply_even_when_greedy(llm, ref, penalty):
    params = SamplingParams(temperature=0, max_tokens=20, **penalty)
    expected = reference(ref, PROMPT, params)
    assert ids(llm, params) == expected
    assert expected != ids(llm, SamplingParams(temperature=0, max_tokens=20))  # the penalty changed the output


@pytest.mark.parametrize("options", [dict(min_p=0.2), dict(min_p=0.05, top_k=6), dict(min_p=0.1, top_p=0.7),
                                     dict(top_k=5, top_p=0.8, repetition_penalty=1.4, frequency_penalty=0.5)],
                         ids=["min_p", "min_p+top_k", "min_p+top_p", "penalties+top_k+top_p"])
def test_seeded_sampling_follows_the_rules_in_vllms_order(llm, ref, options):
    params = SamplingParams(temperature=1.7, seed=5, max_tokens=24, **options)
    expected = reference(ref, PROMPT, params)
    assert ids(llm, params) == expected
    # The filters matter: drawing with the same seed without them gives other tokens.
    assert expected != reference(ref, PROMPT, SamplingParams(temperature=1.7, seed=5, max_tokens=24))


def test_min_p_keeps_only_tokens_near_the_most_likely(llm, ref):
    """Every drawn token is at least min_p times as likely as the best one, under the tempered distribution."""
    def worst_ratio(params):
        out = ids(llm, params)
        ratios = []
        for i, t in enumerate(out):
            probs = torch.softmax(next_logits(ref, PROMPT + out[:i]) / params.temperature, -1)
            ratios.append(float(probs[t] / probs.max()))
        return min(ratios)

    assert worst_ratio(SamplingParams(temperature=2.0, seed=1, max_tokens=32, min_p=0.3)) >= 0.3 - 1e-5
    assert worst_ratio(SamplingParams(temperature=2.0, seed=1, max_tokens=32)) < 0.3


def test_min_tokens_masks_eos_and_stop_tokens_until_reached(llm, ref, ar_folder, tmp_path):
    greedy = ids(llm, SamplingParams(temperature=0, max_tokens=24))
    stop, eos = greedy[1], greedy[3]
    copy = tmp_path / "m"
    shutil.copytree(ar_folder, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with_eos = LLM(copy)
    for min_tokens in (0, 2, 6):
        params = SamplingParams(temperature=0, max_tokens=24, min_tokens=min_tokens, stop_token_ids=[stop])
        out = with_eos.generate([PROMPT], params)[0].outputs[0]
        expected = reference(ref, PROMPT, params, stop_ids={stop, eos})
        assert out.token_ids == expected
        assert len(out.token_ids) > min_tokens and out.finish_reason == "stop"
        assert not {stop, eos} & set(out.token_ids[:min_tokens])
    plain = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop])
    assert with_eos.generate([PROMPT], plain)[0].outputs[0].token_ids == greedy[:2]  # without min_tokens: at once


def test_n_completions_use_derived_seeds(llm, ref):
    params = SamplingParams(n=3, temperature=1.2, seed=11, max_tokens=12, presence_penalty=0.5)
    out = llm.generate([PROMPT], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for i, completion in enumerate(out.outputs):
        single = SamplingParams(temperature=1.2, seed=11 + i, max_tokens=12, presence_penalty=0.5)
        assert completion.token_ids == reference(ref, PROMPT, single) == ids(llm, single)
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    assert out.num_completion_tokens == 36 and out.finished
    again = llm.generate([PROMPT], params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_n_completions_stream_together(llm):
    params = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=6)
    chunks = list(llm.stream(PROMPT, params))
    assert len(chunks) == 6 and chunks[-1].finished and not chunks[0].finished
    final = llm.generate([PROMPT], params)[0]
    assert [o.token_ids for o in chunks[-1].outputs] == [o.token_ids for o in final.outputs]


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    params = SamplingParams(temperature=1.3, seed=21, max_tokens=20, min_p=0.02, repetition_penalty=1.2)
    alone = ids(llm, params)
    others = [SamplingParams(temperature=0, max_tokens=7), SamplingParams(temperature=1.0, seed=3, max_tokens=25),
              SamplingParams(n=2, temperature=0.9, max_tokens=4)]
    batched = llm.generate([[5, 6, 7], PROMPT, [90, 1], list(range(20, 40))], [others[0], params, *others[1:]])
    assert batched[1].outputs[0].token_ids == alone
    assert llm.generate([PROMPT, PROMPT], [params, params])[1].outputs[0].token_ids == alone


@pytest.mark.parametrize("bad, message", [
    (dict(n=0), r"n must be at least 1"),
    (dict(n=2, temperature=0), r"n must be 1 when sampling greedily"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(repetition_penalty=0), r"repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=math.inf), r"repetition_penalty must be a finite number > 0"),
    (dict(temperature=2.5), r"temperature must be in \[0, 2\]"),
    (dict(temperature=math.nan), r"temperature must be in \[0, 2\]"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(top_k=2.5), r"top_k must be an integer"),
    (dict(min_tokens=-1), r"min_tokens must be in \[0, max_tokens=16\]"),
    (dict(min_tokens=20), r"min_tokens must be in \[0, max_tokens=16\]"),
    (dict(logprobs=-2), r"logprobs must be None, -1 \(the whole vocabulary\) or >= 0"),
    (dict(prompt_logprobs=-5), r"prompt_logprobs must be None, -1"),
    (dict(stop_token_ids=[-3]), r"stop_token_ids must be non-negative integers"),
])
def test_bad_values_are_refused_by_name(bad, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**bad)


def test_vllm_conveniences():
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(stop_token_ids=[4, 4, 2]).stop_token_ids == [4, 2]
    with pytest.warns(UserWarning, match="raised to 0.01"):
        assert SamplingParams(temperature=0.001).temperature == 0.01


def test_model_dependent_values_are_refused(llm):
    with pytest.raises(RequestError, match=r"stop_token_ids \[128\] are outside the vocabulary \[0, 128\)"):
        llm.generate([PROMPT], SamplingParams(stop_token_ids=[128]))
    with pytest.raises(RequestError, match=r"logprobs=200 exceeds the vocabulary \(128 tokens\)"):
        llm.generate([PROMPT], SamplingParams(logprobs=200))


@pytest.mark.parametrize("option", [dict(presence_penalty=0.5), dict(frequency_penalty=0.5),
                                    dict(repetition_penalty=1.1), dict(min_tokens=2), dict(logprobs=1),
                                    dict(prompt_logprobs=0)], ids=lambda o: next(iter(o)))
def test_diffusion_models_refuse_autoregressive_options_by_name(llada2, option):
    name = next(iter(option))
    with pytest.raises(RequestError, match=rf"{name}: not supported by diffusion models \(llada2_moe"):
        llada2.generate([[3, 17, 42]], SamplingParams(max_tokens=8, block_length=8, steps=4, **option))


def test_diffusion_models_take_n_and_min_p(llada2):
    def completions(**kw):
        params = SamplingParams(temperature=1.0, max_tokens=8, block_length=8, steps=4, **kw)
        return [o.token_ids for o in llada2.generate([[3, 17, 42]], params)[0].outputs]

    two = completions(n=2, seed=9)
    assert two == completions(seed=9) + completions(seed=10) and two[0] != two[1]
    assert completions(seed=9, min_p=0.5) != completions(seed=9)  # min_p filters the denoiser's draws too


def test_stop_strings_are_not_honoured_within_min_tokens():
    """As vLLM: a stop string must end after the text of the first min_tokens tokens."""
    from tiermoe.models.registry import DEFAULT_MODEL

    llm = LLM(DEFAULT_MODEL)
    full = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    cuts = []
    for min_tokens in (0, 4, 8):
        out = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=40, stop="th",
                                                      min_tokens=min_tokens))[0].outputs[0]
        before = llm.tokenizer.decode(full.token_ids[:min_tokens])
        cut = full.text.find("th", max(0, len(before) - 1))  # it may begin in the last character before
        assert 0 <= cut and out.text == full.text[:cut] and (out.finish_reason, out.stop_reason) == ("stop", "th")
        assert len(out.token_ids) > min_tokens
        cuts.append(cut)
    assert len(set(cuts)) == 3  # each min_tokens skipped a "th" the smaller one honoured
