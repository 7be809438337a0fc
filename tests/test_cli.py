"""The command line as a user runs it: a real subprocess of `tiermoe`, on the built-in model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.sim.trace import Trace

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "olmoe-1b-7b-0924_decode_wikitext-mbpp.npz"


def tiermoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiermoe.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL)


def test_generate_streams_the_same_text_as_json(llm, tmp_path):
    expected = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=12))[0]
    as_json = tiermoe("generate", "--json", "--max-tokens", "12", "ROMEO:")
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["token_ids"] == expected.outputs[0].token_ids and out["text"] == expected.outputs[0].text
    assert out["usage"] == {"prompt_tokens": expected.num_prompt_tokens, "completion_tokens": 12}
    assert out["finish_reason"] == "length" and out["timing"]["total_s"] > 0
    streamed = tiermoe("generate", "--max-tokens", "12", "--expert-cache", "30%", "--stats", "ROMEO:")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "ROMEO:" + expected.outputs[0].text + "\n"
    assert "total" in streamed.stderr and "hit rate" in streamed.stderr


def test_memory_limit_sizes_the_engine_or_is_refused_with_the_minimum(llm):
    expected = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=8))[0]
    run = tiermoe("generate", "--json", "--max-tokens", "8", "--memory-limit", "4GiB", "ROMEO:")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == expected.outputs[0].token_ids
    assert "memory limit 4.00 GiB" in run.stderr and "-> expert cache" in run.stderr
    refused = tiermoe("generate", "--memory-limit", "100MB", "ROMEO:")
    assert refused.returncode == 2 and "the minimum is" in refused.stderr


def test_record_trace_and_convert(llm, tmp_path):
    rec = tiermoe("generate", "--max-tokens", "6", "--record-trace", str(tmp_path / "t"), "JULIET:")
    assert rec.returncode == 0, rec.stderr
    trace = Trace.load(tmp_path / "t")
    assert trace.num_layers == len(llm.model.moe_blocks) and trace.top_k == llm.model.shape.top_k
    conv = tiermoe("convert", str(DEFAULT_MODEL), str(tmp_path / "aligned"))
    assert conv.returncode == 0, conv.stderr
    params = SamplingParams(temperature=0, max_tokens=10)
    aligned = LLM(tmp_path / "aligned", expert_cache="25%")
    assert aligned.index.expert_layout == "converted"
    text = aligned.generate(["JULIET:"], params)[0].outputs[0].text
    assert text == llm.generate(["JULIET:"], params)[0].outputs[0].text


def test_bad_input_exits_with_a_message(tmp_path):
    missing = tiermoe("generate", "--model", str(tmp_path / "nope"), "hi")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    too_small = tiermoe("generate", "--expert-cache", "1KiB", "hi")
    assert too_small.returncode == 2 and "the minimum is" in too_small.stderr
    zero = tiermoe("generate", "--max-tokens", "0", "hi")
    assert zero.returncode == 2 and "max_tokens must be >= 1" in zero.stderr


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="../shared/traces not present")
def test_sim_cache_prints_json():
    res = tiermoe("sim", "cache", "--trace", str(SHARED_TRACE), "--capacity", "25%", "--policy", "lru", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)


def test_stop_strings_and_chat_template(llm):
    full = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    word = full.split()[2]
    out = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=24, stop=[word]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == word and out.text == full[: full.index(word)]
    chat = llm.chat([{"role": "user", "content": "Speak, good sir."}], SamplingParams(temperature=0, max_tokens=8))
    assert chat[0].num_prompt_tokens > 5 and len(chat[0].outputs[0].token_ids) >= 1
