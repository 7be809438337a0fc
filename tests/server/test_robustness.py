"""Bad requests get 4xx with an OpenAI error body, property-based fuzzing over /openapi.json finds no 5xx, and a
request whose expert reads fail gets a 500 while the next one succeeds."""

from __future__ import annotations

import json
import os

import httpx2 as httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.server.conftest import API_KEY
from tiermoe import SamplingParams

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BAD_COMPLETIONS = {
    "malformed JSON": b'{"prompt": "ROMEO:", ',
    "non-UTF-8 body": b'{"prompt": "\xff\xfe\xfd"}',
    "NaN temperature": b'{"prompt": "ROMEO:", "temperature": NaN}',
    "deeply nested JSON": b"[" * 100_000,
    "not an object": b'["ROMEO:"]',
    "prompt of wrong type": {"prompt": 5},
    "max_tokens of wrong type": {"prompt": "ROMEO:", "max_tokens": "many"},
    "n as float": {"prompt": "ROMEO:", "n": 1.5},
    "huge n": {"prompt": "ROMEO:", "n": 10**9},
    "huge max_tokens": {"prompt": "ROMEO:", "max_tokens": 10**12},
    "max_tokens beyond the context": {"prompt": "ROMEO:", "max_tokens": 100_000},
    "empty prompt": {"prompt": ""},
    "prompt longer than the context": {"prompt": "ROMEO: " * 2000},
    "token id outside the vocabulary": {"prompt": [1, 99_999_999]},
    "unsupported field": {"prompt": "ROMEO:", "logit_bias": {"5": 10}},
    "diffusion field on an autoregressive model": {"prompt": "ROMEO:", "steps": 4},
    "greedy with n > 1": {"prompt": "ROMEO:", "n": 2, "temperature": 0},
    "temperature out of range": {"prompt": "ROMEO:", "temperature": 3},
    "stop of wrong type": {"prompt": "ROMEO:", "stop": [1, 2]},
    "lone surrogate in the prompt": b'{"prompt": "\\ud800 ROMEO:"}',
    "lone surrogate in a streamed prompt": b'{"prompt": "ROMEO:\\udfff", "stream": true}',
    "lone surrogate in the model name": b'{"prompt": "ROMEO:", "model": "\\udc00"}',
    "lone surrogate in a stop string": b'{"prompt": "ROMEO:", "stop": ["\\ud83d"]}',
    "repetition_penalty near 0": {"prompt": "ROMEO:", "repetition_penalty": 1e-300},
    "more sequences than the server admits": {"prompt": ["ROMEO:"] * 64, "n": 16, "temperature": 1},
}
NAMED = {"unsupported field": "logit_bias", "diffusion field on an autoregressive model": "steps",
         "huge n": "n", "max_tokens beyond the context": "max_tokens", "prompt longer than the context": "context",
         "lone surrogate in the prompt": "prompt holds a lone UTF-16 surrogate",
         "lone surrogate in the model name": "model holds a lone UTF-16 surrogate",
         "lone surrogate in a stop string": "stop.0 holds a lone UTF-16 surrogate",
         "repetition_penalty near 0": "repetition_penalty",
         "more sequences than the server admits": "1024 sequences"}


@pytest.mark.parametrize("case", BAD_COMPLETIONS)
def test_bad_completion_requests_get_400_naming_the_problem(server, case):
    body = BAD_COMPLETIONS[case]
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    response = server.post("/v1/completions", **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError" and error["message"]
    if case in NAMED:
        assert NAMED[case] in error["message"]


@pytest.mark.parametrize("body", [{"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
                                  {"messages": [{"role": "user", "content": 5}]}, {"messages": "hi"},
                                  {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}])
def test_bad_chat_requests_get_400(server, body):
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text"),
    ("/tokenize", b'{"prompt": "\\udbff"}', "prompt")])
def test_text_that_is_not_unicode_gets_400_naming_the_field(server, path, body, field):
    """JSON can escape a lone surrogate, which no tokenizer takes and no UTF-8 response can carry."""
    response = server.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert f"{field} holds a lone UTF-16 surrogate" in response.json()["error"]["message"]


def test_oversize_body_is_413_and_oversize_headers_are_refused(server):
    response = server.post("/v1/completions", json={"prompt": "x" * (5 * 2**20)})
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]
    try:
        response = server.post("/v1/completions", json={"prompt": "x"}, headers={"X-Big": "y" * 2**16})
        assert response.status_code in (400, 431)
    except httpx.TransportError:  # the server may also just close the connection
        pass
    assert server.get("/health").status_code == 200


def test_openai_client_raises_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().completions.create(model=server.model, prompt="ROMEO:", max_tokens=10**6)


def test_fuzzed_requests_never_get_a_server_error(server):
    """Requests generated from /openapi.json (valid and invalid bodies of every operation) get no 5xx."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    for operation in operations:
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def no_server_error(case):
            case.call_and_validate(base_url=server.url, headers=AUTH, checks=[not_a_server_error], timeout=120)

        no_server_error()


def test_damaged_expert_file_fails_that_request_and_the_next_succeeds(server, reference, model_copy):
    """The checkpoint is cut short under the running server: the request that needs an expert from it gets a 500
    with an error body naming the file (streamed: an error event, then [DONE]); restored, the next request gives
    the right tokens."""
    path = model_copy / "model.safetensors"
    original, st = path.read_bytes(), path.stat()
    body = {"prompt": "KING HENRY:\nWhat is the news", "max_tokens": 24, "temperature": 0}
    try:
        with open(path, "r+b") as f:
            f.truncate(st.st_size - 4096)
        response = server.post("/v1/completions", json=body)
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["code"] == 500 and "model.safetensors" in error["message"]
        with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}, headers=AUTH,
                          timeout=120) as streamed:  # a failure before the first token: no stream begins
            if streamed.status_code == 200:
                events = [ln for ln in streamed.iter_lines() if ln]
                assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == 500
            else:
                assert streamed.status_code == 500 and json.loads(streamed.read())["error"]["code"] == 500
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = server.client().completions.create(model=server.model, **body)
    want = reference.generate([body["prompt"]], SamplingParams(temperature=0, max_tokens=24))[0]
    assert out.choices[0].text == want.outputs[0].text
