"""Diffusion output is streamed: `LLM.stream` yields once per committed block, each output extending the last and the
final one equal to `generate`'s; `tiermoe generate` prints each block as it is committed."""

import io

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL

PROMPT = [12, 99, 31, 7, 54, 23, 70, 2, 45, 16, 61, 88, 1, 64, 20, 5, 90, 33, 40]  # 19 tokens


@pytest.mark.parametrize("which, lengths", [
    ("llada2", [5, 13, 20]),  # blocks aligned to position 0: the prompt's last block [16, 24) gives 5 tokens
    ("llada", [8, 16, 20]),  # blocks start after the prompt; the last one is shorter
])
def test_stream_yields_every_block_as_it_is_committed(which, lengths, request):
    llm = request.getfixturevalue(which)
    params = SamplingParams(temperature=0, max_tokens=20, block_length=8, steps=8, ignore_eos=True)
    full = llm.generate([PROMPT], params)[0]
    outs = list(llm.stream(PROMPT, params))
    ids = [o.outputs[0].token_ids for o in outs]
    assert [len(i) for i in ids] == lengths
    assert all(later[:len(ids[i])] == ids[i] for i, later in enumerate(ids[1:]))
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert ids[-1] == full.outputs[0].token_ids
    assert outs[-1].stats["diffusion"]["nfe"] == full.stats["diffusion"]["nfe"]


class Writes(io.StringIO):
    """stdout that remembers what each flush showed."""

    def __init__(self):
        super().__init__()
        self.shown: list[str] = []
        self._flushed = 0

    def flush(self):
        text = self.getvalue()
        self.shown.append(text[self._flushed:])
        self._flushed = len(text)


def test_cli_prints_the_prompt_first_then_each_block(monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=12, block_length=4, steps=4)
    expected = LLM(DEFAULT_DIFFUSION_MODEL).generate(["ROMEO:"], params)[0].outputs[0].text
    out = Writes()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["generate", "--diffusion", "--max-tokens", "12", "--block-length", "4", "--steps", "4",
                 "ROMEO:"]) == 0
    assert out.shown[0] == "ROMEO:"  # before any denoising
    blocks = [s for s in out.shown[1:] if s]
    assert len(blocks) >= 3 and "".join(blocks) == expected
    assert out.getvalue() == "ROMEO:" + expected + "\n"
