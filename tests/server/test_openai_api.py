"""The OpenAI API as the official `openai` client uses it: completions, chat, streaming, stop strings, usage,
sampling fields, logprobs; greedy outputs equal LLM.generate's."""

from __future__ import annotations

import json

import openai
import pytest

from tiermoe import SamplingParams

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed"]
MESSAGES = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "Speak of love."}]


def expected(reference, prompt, **kwargs):
    return reference.generate([prompt], SamplingParams(**kwargs))[0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_llm_generate(server, reference, prompt):
    out = server.client().completions.create(model=server.model, prompt=prompt, max_tokens=16, temperature=0)
    want = expected(reference, prompt, temperature=0, max_tokens=16)
    (choice,) = out.choices
    assert choice.text == want.outputs[0].text and choice.finish_reason == want.outputs[0].finish_reason
    assert out.usage.prompt_tokens == want.num_prompt_tokens and out.usage.completion_tokens == 16
    assert out.usage.total_tokens == want.num_prompt_tokens + 16 and out.model == server.model


def test_echo_puts_the_prompt_before_the_completion(server, reference):
    want = expected(reference, "ROMEO:", temperature=0, max_tokens=6).outputs[0].text
    client = server.client()
    out = client.completions.create(model=server.model, prompt="ROMEO:", max_tokens=6, temperature=0, echo=True)
    assert out.choices[0].text == "ROMEO:" + want
    chunks = client.completions.create(model=server.model, prompt="ROMEO:", max_tokens=6, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == "ROMEO:" + want


def test_chat_equals_llm_chat(server, reference):
    out = server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=12,
                                                  temperature=0)
    want = reference.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.outputs[0].text
    assert out.usage.prompt_tokens == want.num_prompt_tokens and out.object == "chat.completion"


def test_streams_concatenate_to_the_whole_reply_with_usage_last(server, reference):
    client = server.client()
    want = expected(reference, PROMPTS[1], temperature=0, max_tokens=20)
    chunks = list(client.completions.create(model=server.model, prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
    assert len([c for c in chunks if c.choices]) > 3, "streamed token by token, not in one piece"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = list(client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=12, temperature=0,
                                               stream=True))
    want = reference.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))[0]
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == want.outputs[0].text
    assert chat[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chat)


def test_stream_ends_with_done(server):
    with server.stream_raw("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 5, "stream": True}) as lines:
        events = [ln for ln in lines if ln]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1]) and len(events) >= 3


def test_stop_strings_end_the_text_before_them(server, reference):
    whole = expected(reference, "ROMEO:", temperature=0, max_tokens=24).outputs[0].text
    stop = whole[len(whole) // 2:][:3]
    client = server.client()
    for stream in (False, True):
        out = client.completions.create(model=server.model, prompt="ROMEO:", max_tokens=24, temperature=0,
                                        stop=[stop], stream=stream)
        chunks = list(out) if stream else [out]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == whole[:whole.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_and_vllm_fields_equal_llm_generate(server, reference):
    params = dict(temperature=0.8, seed=7, top_k=20, repetition_penalty=1.2, max_tokens=10)
    out = server.client().completions.create(model=server.model, prompt=["ROMEO:", "JULIET:"], n=2,
                                             temperature=0.8, seed=7, max_tokens=10,
                                             extra_body={"top_k": 20, "repetition_penalty": 1.2})
    for i, prompt in enumerate(["ROMEO:", "JULIET:"]):
        want = expected(reference, prompt, n=2, **params)
        assert [c.text for c in out.choices[2 * i: 2 * i + 2]] == [c.text for c in want.outputs]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]


def test_logprobs(server, reference):
    client = server.client()
    out = client.completions.create(model=server.model, prompt="ROMEO:", max_tokens=4, temperature=0, logprobs=2)
    want = expected(reference, "ROMEO:", temperature=0, max_tokens=4, logprobs=2).outputs[0]
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([next(iter(e.values())).logprob for e in want.logprobs], abs=1e-4)
    assert "".join(lp.tokens) == out.choices[0].text and all(len(t) >= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content), "greedy picks the most likely token"


def test_models_tokenize_detokenize_version(server, reference):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    ids = reference.tokenizer.encode("ROMEO: O")
    tokens = server.post("/tokenize", json={"prompt": "ROMEO: O"}).json()
    assert tokens["tokens"] == ids and tokens["count"] == len(ids) and tokens["max_model_len"] == 512
    assert server.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "ROMEO: O"}
    chat = server.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == reference.chat_prompt(MESSAGES)["prompt_token_ids"]
    assert server.get("/version").json()["version"]


def test_api_key_is_required_but_health_is_open(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    response = server.get("/v1/models")
    assert response.status_code == 401 and response.json()["error"]["type"] == "AuthenticationError"
    assert server.get("/health").status_code == 200


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_metrics(server):
    server.client().completions.create(model=server.model, prompt="ROMEO:", max_tokens=3, temperature=0)
    text = server.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "time_per_output_token_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "expert_cache_hits_total", "expert_cache_misses_total", "expert_bytes_read_total",
                 "expert_io_stall_seconds_total"):
        assert f"tiermoe:{name}{{" in text, name
    assert server.metric("tiermoe:expert_bytes_read_total") > 0, "a 25% budget reads experts"
    assert server.metric("tiermoe:generation_tokens_total") >= 3
    assert server.metric("tiermoe:e2e_request_latency_seconds_count") >= 1


def test_openapi_schema_lists_the_endpoints(server):
    paths = json.loads(server.get("/openapi.json").text)["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health"):
        assert path in paths
