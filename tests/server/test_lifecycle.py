"""Admission and the server's life: a full waiting queue answers 503, a client that disconnects aborts its
request, SIGTERM mid-stream lets the stream end cleanly and the server exit 0."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx2 as httpx
import pytest

from tests.server.conftest import API_KEY, free_port, start_server
from tiermoe.kernels import compiled
from tiermoe.kernels.build import build_lock, staged_source

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"prompt": "ROMEO:", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


LOADING_POLLS = 3  # /health answers seen while the server cannot finish loading


@pytest.fixture(scope="module")
def small_server(model_copy, tmp_path_factory):
    """Two requests decoded at a time and none waiting; a context long enough for a stream to outlast SIGTERM's
    grace period of 3 s. It starts while this process holds the decode kernels' build lock, as another tiermoe
    process building them would: the server cannot finish loading until /health has answered LOADING_POLLS times."""
    if compiled() is None:
        pytest.skip("no compiled kernels here (TIERMOE_KERNELS=off or no compiler): loading takes no build lock")
    with ExitStack() as held:
        held.enter_context(build_lock(staged_source()[0]))

        def release_after_polls(server) -> None:
            if len(server.loading) == 1:  # the API refuses requests meanwhile, saying when to retry
                refused = server.post("/v1/completions", json={"prompt": "ROMEO:"})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            if len(server.loading) >= LOADING_POLLS:
                held.close()

        srv = start_server(model_copy, tmp_path_factory.mktemp("logs") / "small.log", "--max-num-seqs", "2",
                           "--max-waiting", "0", "--max-model-len", "4096", "--shutdown-timeout", "3",
                           on_loading=release_after_polls)
    yield srv
    srv.stop()


def test_health_answers_503_while_the_model_loads(small_server):
    """The socket opens before the model is ready: /health answers 503 naming the reason until it is (the API
    meanwhile answers 503 with Retry-After, checked as the fixture starts the server); then 200."""
    assert len(small_server.loading) >= LOADING_POLLS
    assert all(code == 503 and "loading" in body["error"]["message"] for code, body in small_server.loading)
    assert small_server.get("/health").status_code == 200
    models = small_server.get("/v1/models", headers=AUTH)
    assert models.status_code == 200


def test_a_model_that_cannot_load_ends_the_server_with_a_message(tmp_path):
    run = subprocess.run([sys.executable, "-m", "tiermoe.cli", "serve", "--model", str(tmp_path / "missing"),
                          "--port", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "does not exist" in run.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "no_such_family"}')
    run = subprocess.run([sys.executable, "-m", "tiermoe.cli", "serve", "--model", str(tmp_path / "broken"),
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no_such_family" in run.stderr


def test_a_full_waiting_queue_answers_503(small_server):
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: small_server.post("/v1/completions", json=LONG), range(4)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert "busy" in busy.json()["error"]["message"] and busy.headers["retry-after"] == "1"
    assert all(r.json()["usage"]["completion_tokens"] == 400 for r in responses if r.status_code == 200)
    # admission counts sequences (prompts x n): a request for more than the server ever admits is refused outright
    too_many = small_server.post("/v1/completions", json=LONG | {"n": 2, "prompt": ["ROMEO:", "JULIET:"],
                                                                 "temperature": 1})
    assert too_many.status_code == 400 and "4 sequences" in too_many.json()["error"]["message"], too_many.text


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


def read_stream(server, body: dict, events: list, started: threading.Event) -> None:
    with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}, headers=AUTH,
                      timeout=120) as response:
        for line in response.iter_lines():
            if line:
                events.append(line)
                started.set()


def test_sigterm_lets_running_streams_finish_ends_the_rest_cleanly_and_exits_0(small_server):
    """SIGTERM while two streams run, of 200 and 3000 tokens: the first finishes; the second is ended after
    --shutdown-timeout with an error event; both end with [DONE]; no new connection is accepted; exit 0."""
    short, long = [], []
    started = [threading.Event(), threading.Event()]
    readers = [threading.Thread(target=read_stream, args=(small_server, LONG | {"max_tokens": 200}, short,
                                                          started[0])),
               threading.Thread(target=read_stream, args=(small_server, LONG | {"max_tokens": 3000}, long,
                                                          started[1]))]
    for reader, event in zip(readers, started, strict=True):
        reader.start()
        assert event.wait(60)
    small_server.process.terminate()
    for reader in readers:
        reader.join(120)
    assert short[-1] == "data: [DONE]" and json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in short[:-1]) != ""
    assert long[-1] == "data: [DONE]" and "shutting down" in json.loads(long[-2][6:])["error"]["message"]
    assert small_server.process.wait(60) == 0, small_server.log.read_text()
    with pytest.raises(httpx.TransportError):
        small_server.get("/health")
