"""Bad input on the command line, as a user types it (`tiermoe` in a subprocess): one line on stderr naming the
problem and exit status 2, never a traceback; options that do nothing or get capped are said so on stderr."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.sim.trace import Trace


def tiermoe(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiermoe.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A routing trace of 16 experts per layer, a text file named like a trace, a model folder whose weights file is
    random bytes."""
    root = tmp_path_factory.mktemp("bad-input")
    rng = np.random.default_rng(1)
    experts = np.stack([rng.permutation(16)[:4] for _ in range(20 * 2)]).reshape(20, 2, 4)
    Trace(experts, np.ones(experts.shape), [0], np.zeros(20, bool), np.arange(20)).save(root / "t",
                                                                                        {"num_experts": 16})
    (root / "notes.npz").write_text("these are notes, not a trace\n")
    junk = root / "junk-model"
    junk.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (junk / name).write_bytes((DEFAULT_MODEL / name).read_bytes())
    (junk / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(100_000))
    return root


def assert_one_line_error(run: subprocess.CompletedProcess, message: str) -> None:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiermoe: error: ") and message in lines[0], run.stderr


def test_prompt_that_is_not_utf8():
    run = tiermoe("generate", os.fsdecode(b"ROMEO\xff\xfe"))
    assert_one_line_error(run, "the prompt is not UTF-8 text (byte 0xff at offset 5)")


def test_prompt_file_that_is_missing(tmp_path):
    assert_one_line_error(tiermoe("generate", "@" + str(tmp_path / "missing.txt")),
                          f"prompt file {tmp_path / 'missing.txt'}: No such file or directory")


def test_no_prompt():
    assert_one_line_error(tiermoe("generate"), "no prompt: give it as an argument, '-' to read stdin")


def test_calibration_text_that_is_missing(tmp_path):
    assert_one_line_error(tiermoe("calibrate", "--text", str(tmp_path / "missing.txt")),
                          f"calibration text {tmp_path / 'missing.txt'}: No such file or directory")


def test_expert_cache_above_all_experts():
    assert_one_line_error(tiermoe("generate", "--expert-cache", "500%", "x"),
                          "expert_cache: budget '500%' is more than all the experts (100%)")


def test_prefetch_top_p_above_top_k():
    assert_one_line_error(tiermoe("generate", "--expert-cache", "50%", "--prefetch-top-p", "5", "x"),
                          "prefetch_top_p 5 is more than the 4 experts a token routes to (top_k)")


def test_random_bytes_named_safetensors(files):
    assert_one_line_error(tiermoe("generate", "--model", str(files / "junk-model"), "x"),
                          "model.safetensors: not a safetensors file")


def test_sim_capacity_above_the_experts(files):
    assert_one_line_error(tiermoe("sim", "cache", "--trace", str(files / "t.npz"), "--capacity", "500"),
                          "capacity 500 is more than the trace's 16 experts per layer")


def test_text_file_passed_as_a_trace(files):
    assert_one_line_error(tiermoe("sim", "cache", "--trace", str(files / "notes.npz")),
                          "notes.npz is not a routing trace: not an .npz archive")


def test_plot_into_a_missing_folder_is_refused_and_a_plot_says_where_it_went(files, tmp_path):
    assert_one_line_error(tiermoe("sim", "cache", "--trace", str(files / "t.npz"), "--plot",
                                  str(tmp_path / "nowhere" / "hit.png")), "nowhere does not exist")
    run = tiermoe("sim", "cache", "--trace", str(files / "t.npz"), "--plot", str(tmp_path / "hit.png"))
    assert run.returncode == 0 and f"tiermoe: wrote {tmp_path / 'hit.png'}" in run.stderr
    assert (tmp_path / "hit.png").exists()


def test_ctrl_c_exits_quietly_with_130():
    proc = subprocess.Popen([sys.executable, "-m", "tiermoe.cli", "generate", "--max-tokens", "500", "--ignore-eos",
                             "ROMEO:"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(8)  # generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err and b"KeyboardInterrupt" not in err


@pytest.fixture(scope="module")
def ignored():
    """One run with every ignored option of an autoregressive model, one whose max_tokens the context caps."""
    return (tiermoe("generate", "--json", "--model", str(DEFAULT_MODEL), "--diffusion", "--steps", "4",
                    "--system", "Be brief.", "--max-model-len", "100000", "--max-tokens", "2", "ROMEO:"),
            tiermoe("generate", "--json", "--max-model-len", "24", "--max-tokens", "1000000000", "--ignore-eos",
                    "ROMEO:"))


@pytest.mark.parametrize("warning", [
    "--system is used with --chat only: ignored",
    "--steps: for diffusion models only; qwen3_moe is autoregressive: ignored",
    "--diffusion picks the built-in diffusion model when --model is not given; ",
    "--max-model-len 100000 is above the 512 positions qwen3_moe was trained on",
])
def test_ignored_option_is_said(ignored, warning):
    run = ignored[0]
    assert run.returncode == 0 and "Traceback" not in run.stderr
    assert f"tiermoe: warning: {warning}" in run.stderr


def test_max_tokens_capped_by_the_context_is_said(ignored):
    run = ignored[1]
    assert run.returncode == 0
    out = json.loads(run.stdout)
    room = 24 - out["usage"]["prompt_tokens"]
    assert len(out["token_ids"]) == room and out["finish_reason"] == "length"
    assert (f"tiermoe: warning: --max-tokens 1000000000 does not fit the context: at most {room} tokens will be "
            "generated") in run.stderr


def test_unknown_scheduler_is_refused_naming_the_valid_ones():
    assert_one_line_error(tiermoe("serve", "--diffusion", "--scheduler", "sjf", "--port", "1"),
                          "scheduler must be one of fcfs-request, fcfs, phase; got 'sjf'")


def test_scheduler_on_an_autoregressive_model_is_refused():
    assert_one_line_error(tiermoe("generate", "--scheduler", "phase", "x"),
                          "scheduler 'phase' applies to diffusion models only: qwen3_moe is autoregressive")


def test_a_batching_scheduler_with_tau_is_refused():
    assert_one_line_error(tiermoe("generate", "--diffusion", "--expert-cache", "50%", "--tau", "2", "--scheduler",
                                  "fcfs", "x"), "scheduler 'fcfs' cannot run with tau")
