"""The shipped diffusion model (llada2_moe) over HTTP: its sampling fields as extra body fields, outputs equal to
LLM.generate's, streaming, chat, and the autoregressive-only fields refused by name."""

from __future__ import annotations

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL

DIFFUSION = {"steps": 8, "block_length": 8, "threshold": 0.9}


@pytest.fixture(scope="module")
def diffusion_reference():
    return LLM(DEFAULT_DIFFUSION_MODEL)


def test_diffusion_completion_equals_llm_generate(diffusion_server, diffusion_reference):
    client = diffusion_server.client()
    out = client.completions.create(model=diffusion_server.model, prompt="ROMEO:", max_tokens=16, temperature=0,
                                    extra_body=DIFFUSION)
    want = diffusion_reference.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=16, **DIFFUSION))[0]
    assert out.choices[0].text == want.outputs[0].text
    assert out.usage.completion_tokens == want.num_completion_tokens
    chunks = list(client.completions.create(model=diffusion_server.model, prompt="ROMEO:", max_tokens=16,
                                            temperature=0, extra_body=DIFFUSION, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == want.outputs[0].finish_reason


def test_diffusion_chat(diffusion_server, diffusion_reference):
    messages = [{"role": "user", "content": "Speak of love."}]
    out = diffusion_server.client().chat.completions.create(model=diffusion_server.model, messages=messages,
                                                            max_tokens=8, temperature=0,
                                                            extra_body={"remasking": "low_confidence"})
    want = diffusion_reference.chat(messages, SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.choices[0].message.content == want.outputs[0].text


def test_autoregressive_only_fields_are_refused_by_name(diffusion_server):
    response = diffusion_server.post("/v1/completions", json={"prompt": "ROMEO:", "presence_penalty": 0.5})
    assert response.status_code == 400 and "presence_penalty" in response.json()["error"]["message"]
