"""`tiermoe generate`'s sampling flags, run as a user runs them: the JSON must be what the Python API returns for the
same SamplingParams, and the help must state the CLI's own defaults."""

import json
import subprocess
import sys

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main
from tiermoe.models.registry import DEFAULT_MODEL


def tiermoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiermoe.cli", *args, "--threads", "1"], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL)


def same_logprobs(a: list, b: list) -> bool:
    """Same tokens, ranks and texts per position; logprobs equal to float precision (another process computed them)."""
    def split(positions):
        exact = [None if p is None else [(e["token_id"], e["rank"], e["decoded_token"]) for e in p] for p in positions]
        return exact, [e["logprob"] for p in positions if p is not None for e in p]

    (exact_a, values_a), (exact_b, values_b) = split(a), split(b)
    return exact_a == exact_b and values_a == pytest.approx(values_b, abs=1e-5)


def test_generate_flags_give_the_python_apis_output(llm):
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=10, min_tokens=4, min_p=0.05, top_k=40,
                            presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, stop_token_ids=[1, 7],
                            logprobs=2, prompt_logprobs=1)
    expected = llm.generate(["ROMEO:"], params)[0].to_dict()
    run = tiermoe("generate", "--json", "--n", "2", "--temperature", "0.8", "--seed", "3", "--max-tokens", "10",
                  "--min-tokens", "4", "--min-p", "0.05", "--top-k", "40", "--presence-penalty", "0.5",
                  "--frequency-penalty", "0.3", "--repetition-penalty", "1.2", "--stop-token-ids", "1,7",
                  "--logprobs", "2", "--prompt-logprobs", "1", "ROMEO:")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert (out["token_ids"], out["text"]) == (expected["token_ids"], expected["text"])
    for key in ("logprobs", "prompt_logprobs"):
        assert same_logprobs(out[key], expected[key])
    assert [o["token_ids"] for o in out["outputs"]] == [o["token_ids"] for o in expected["outputs"]]
    assert [o["index"] for o in out["outputs"]] == [0, 1]
    first = out["logprobs"][0][0]
    assert set(first) == {"token_id", "logprob", "rank", "decoded_token"} and first["token_id"] == out["token_ids"][0]
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == out["usage"]["prompt_tokens"]


def test_generate_prints_completions_and_logprobs_without_json(llm):
    run = tiermoe("generate", "--n", "2", "--temperature", "1", "--seed", "5", "--max-tokens", "6", "--logprobs", "1",
                  "ROMEO:")
    assert run.returncode == 0, run.stderr
    texts = [o.text for o in llm.generate(["ROMEO:"], SamplingParams(n=2, temperature=1, seed=5, max_tokens=6))[0]
             .outputs]
    assert run.stdout == "".join(f"--- completion {i} ---\nROMEO:{t}\n" for i, t in enumerate(texts))
    assert "logprobs of completion 0" in run.stderr and "logprobs of completion 1" in run.stderr


def test_help_states_the_clis_defaults_and_bad_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64; SamplingParams' is 16, as vLLM's)" in help_text
    assert "(default: 0.0, greedy; SamplingParams' is 1.0, as vLLM's)" in help_text
    for flag in ("--n", "--presence-penalty", "--frequency-penalty", "--repetition-penalty", "--min-p", "--logprobs",
                 "--prompt-logprobs", "--min-tokens", "--stop-token-ids"):
        assert flag in help_text
    for args, message in [(["--n", "2"], "n must be 1 when sampling greedily"),
                          (["--presence-penalty", "3"], "presence_penalty must be in [-2, 2]"),
                          (["--diffusion", "--logprobs", "1"], "logprobs: not supported by diffusion models")]:
        assert main(["generate", *args, "hi"]) == 2
        assert message in capsys.readouterr().err
