"""`tiermoe serve` started as a user starts it: a subprocess on a free port of 127.0.0.1, over copies of the shipped
models (so that a test may damage one), talked to with the official `openai` client."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest

from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL

API_KEY = "test-key-123"
START_TIMEOUT = 300  # seconds to load the model (the machine's cores are shared)


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    model: str  # served model name
    folder: Path
    log: Path
    loading: list[tuple[int, dict]] = field(default_factory=list)  # /health's answers before the first 200

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kwargs)

    def post(self, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
        kwargs.setdefault("timeout", 120)
        return httpx.post(self.url + path, headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})},
                          **kwargs)

    @contextmanager
    def stream_raw(self, path: str, body: dict):
        """The lines of an SSE response."""
        with httpx.stream("POST", self.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=120) as response:
            assert response.status_code == 200, response.read()
            yield response.iter_lines()

    def metric(self, name: str) -> float:
        """A sample's value from /metrics, summed over its labels."""
        lines = [ln for ln in self.get("/metrics").text.splitlines() if ln.startswith(name + "{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:  # long enough for a kernel build to end: killed during one, it would leave its lock behind
                return self.process.wait(180)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, log: Path, *flags: str,
                 on_loading: Callable[[Server], None] | None = None) -> Server:
    """Run `tiermoe serve` on `folder` and wait until /health answers 200; `on_loading` is called after each
    answer before that."""
    port = free_port()
    cmd = [sys.executable, "-m", "tiermoe.cli", "serve", "--model", str(folder), "--port", str(port),
           "--served-model-name", folder.name, "--api-key", API_KEY, "--threads", "1", *flags]
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())
    server = Server(process, f"http://127.0.0.1:{port}", folder.name, folder, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tiermoe serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            health = server.get("/health")
            if health.status_code == 200:
                return server
            server.loading.append((health.status_code, health.json()))
            if on_loading is not None:
                on_loading(server)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"tiermoe serve did not become healthy:\n{log.read_text()}")


@pytest.fixture(scope="session", autouse=True)
def built_kernels():
    """The compiled kernels, built here once, before any server process would build them itself."""
    from tiermoe.kernels import compiled

    compiled()


@pytest.fixture(scope="session")
def model_copy(tmp_path_factory):
    """A copy of the shipped autoregressive model (qwen3_moe, with tokenizer and chat template)."""
    return shutil.copytree(DEFAULT_MODEL, tmp_path_factory.mktemp("served") / "shakespeare-moe")


@pytest.fixture(scope="session")
def server(model_copy, tmp_path_factory):
    """The autoregressive server, its experts under a 25% RAM budget, behind an API key."""
    srv = start_server(model_copy, tmp_path_factory.mktemp("logs") / "server.log", "--expert-cache", "25%")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.fixture(scope="session")
def diffusion_server(tmp_path_factory):
    folder = shutil.copytree(DEFAULT_DIFFUSION_MODEL, tmp_path_factory.mktemp("served") / "shakespeare-dllm")
    srv = start_server(folder, tmp_path_factory.mktemp("logs") / "diffusion.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.fixture(scope="session")
def reference(model_copy):
    """The same model in-process, every expert resident: what HTTP outputs must equal."""
    from tiermoe import LLM

    return LLM(model_copy)
