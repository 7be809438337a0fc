"""Admission and the server's life: a full waiting queue answers 503, a client that disconnects aborts its
request, SIGTERM mid-stream lets the stream end cleanly and the server exit 0."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from tests.server.conftest import API_KEY, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"prompt": "ROMEO:", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def small_server(model_copy, tmp_path_factory):
    """One request decoded at a time, one more may wait."""
    srv = start_server(model_copy, tmp_path_factory.mktemp("logs") / "small.log", "--max-num-seqs", "1",
                       "--max-waiting", "1")
    yield srv
    srv.stop()


def test_a_full_waiting_queue_answers_503(small_server):
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: small_server.post("/v1/completions", json=LONG), range(4)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert "busy" in busy.json()["error"]["message"] and busy.headers["retry-after"] == "1"
    assert all(r.json()["usage"]["completion_tokens"] == 400 for r in responses if r.status_code == 200)


def generated(server) -> float:
    return server.metric("tiermoe:generation_tokens_total")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_aborts_its_request(small_server, stream):
    before = generated(small_server)
    if stream:
        with httpx.stream("POST", small_server.url + "/v1/completions", json=LONG | {"stream": True},
                          headers=AUTH, timeout=60) as response:
            next(ln for ln in response.iter_lines() if ln.startswith("data: {"))
    else:
        with pytest.raises(httpx.ReadTimeout):
            small_server.post("/v1/completions", json=LONG, timeout=0.3)
    deadline = time.monotonic() + 30
    while small_server.metric("tiermoe:num_requests_running") or small_server.metric("tiermoe:kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "the request still runs after its client left"
        time.sleep(0.05)
    stopped = generated(small_server)
    time.sleep(0.5)
    assert generated(small_server) == stopped < before + 400, "aborted before its 400 tokens"
    assert small_server.metric("tiermoe:request_failure_total") >= 1


def test_sigterm_mid_stream_finishes_the_stream_and_exits_0(small_server):
    with httpx.stream("POST", small_server.url + "/v1/completions", json=LONG | {"stream": True, "max_tokens": 200},
                      headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: {"))
        small_server.process.terminate()
        events = [first, *(ln for ln in lines if ln)]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert small_server.process.wait(60) == 0, small_server.log.read_text()
    with pytest.raises(httpx.TransportError):
        small_server.get("/health")
