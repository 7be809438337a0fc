"""32 concurrent clients against the server (experts under a 25% budget): every response complete and well formed,
each greedy output the one the request gets alone, and the server's memory does not grow from round to round."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tiermoe import SamplingParams
from tiermoe.models.registry import DEFAULT_MODEL

CLIENTS = 32
MAX_TOKENS = 12


def prompts() -> list[str]:
    lines = [ln.strip() for ln in (DEFAULT_MODEL.parent / "calibration.txt").read_text().splitlines()]
    return [ln for ln in lines if len(ln) > 20][:CLIENTS]


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) * 1024


def test_32_concurrent_clients_each_get_their_own_output(server, reference):
    texts = prompts()
    alone = [reference.generate([p], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].outputs[0].text
             for p in texts]

    def ask(i: int):
        client = server.client()
        if i % 2:  # half of the clients stream
            chunks = list(client.completions.create(model=server.model, prompt=texts[i], max_tokens=MAX_TOKENS,
                                                    temperature=0, stream=True))
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        out = client.completions.create(model=server.model, prompt=texts[i], max_tokens=MAX_TOKENS, temperature=0)
        return out.choices[0].text, out.choices[0].finish_reason

    sizes = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(2):
            results = list(pool.map(ask, range(CLIENTS)))
            assert [text for text, _ in results] == alone
            assert all(reason in ("length", "stop") for _, reason in results)
            sizes.append(rss(server.process.pid))
    assert sizes[1] < sizes[0] * 1.1 + 32 * 2**20, f"RSS grew from {sizes[0]} to {sizes[1]} bytes"
