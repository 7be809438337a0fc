"""The command line's first minutes: --version, --help with defaults and an example for every command, prompts from
stdin and files, throughput in --json/--stats, calibration output where a user expects it."""

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

from tiermoe import LLM, SamplingParams, __version__
from tiermoe.cli import build_parser
from tiermoe.cli_help import EXAMPLES
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.sim.trace import Trace


def tiermoe(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiermoe.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def expected():
    """The built-in model's greedy 6-token continuations of the prompts these tests send."""
    llm = LLM(DEFAULT_MODEL)
    params = SamplingParams(temperature=0, max_tokens=6)
    return {p: llm.generate([p], params)[0].outputs[0].text for p in ("ROMEO:", "JULIET:\nO")}


def test_version_is_printed_without_loading_torch():
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "tiermoe.cli", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"tiermoe {__version__}"
    assert " torch" not in run.stderr  # -X importtime lists every module imported
    assert time.perf_counter() - start < 10


def leaf_commands(parser, path=()):
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from leaf_commands(child, (*path, name))


def test_every_command_has_an_example_and_states_its_defaults():
    commands = dict(leaf_commands(build_parser()))
    assert {("generate",), ("chat",), ("calibrate",), ("convert",), ("sim", "cache"), ("policy", "train")} <= set(
        commands)
    for path, parser in commands.items():
        text = parser.format_help()
        assert "\nexample: tiermoe " + " ".join(path) in text, path
        assert "-q, --quiet" in text, path
    gen = commands[("generate",)].format_help().replace("\n", " ")
    for flag in ("--max-tokens MAX_TOKENS", "--block-length BLOCK_LENGTH", "--prefetch-top-p PREFETCH_TOP_P"):
        assert "(default:" in gen.rsplit(flag, 1)[1].split(" --", 1)[0], flag  # in the options list
    assert set(EXAMPLES) >= {" ".join(p) for p in commands}


def test_prompt_from_stdin_and_from_a_file(expected, tmp_path):
    run = tiermoe("generate", "--max-tokens", "6", "-", stdin="ROMEO:\n")  # the shell's newline is dropped
    assert run.returncode == 0, run.stderr
    assert run.stdout == "ROMEO:" + expected["ROMEO:"] + "\n"
    (tmp_path / "p.txt").write_text("JULIET:\nO\n")
    for args in (["@" + str(tmp_path / "p.txt")], ["--prompt-file", str(tmp_path / "p.txt")]):
        run = tiermoe("generate", "--max-tokens", "6", *args)
        assert run.returncode == 0, run.stderr
        assert run.stdout == "JULIET:\nO" + expected["JULIET:\nO"] + "\n"


def test_json_and_stats_report_throughput_and_ttft(expected):
    run = tiermoe("generate", "--json", "--max-tokens", "6", "ROMEO:")
    out = json.loads(run.stdout)
    timing = out["timing"]
    assert out["text"] == expected["ROMEO:"]
    assert 0 < timing["time_to_first_token_s"] < timing["total_s"]
    assert timing["prompt_tokens_per_s"] == pytest.approx(out["usage"]["prompt_tokens"]
                                                          / timing["time_to_first_token_s"])
    assert timing["decode_tokens_per_s"] == pytest.approx(5 / (timing["total_s"] - timing["time_to_first_token_s"]))
    run = tiermoe("generate", "--stats", "--expert-cache", "30%", "--max-tokens", "6", "ROMEO:")
    first = run.stderr.splitlines()[0]
    assert first.startswith("prompt ") and "tok/s; time to first token " in first and "hit rate " in first
    assert "MiB read" in first and "total" in run.stderr


def test_calibrate_never_writes_into_the_package_and_prints_tables(tmp_path):
    """The built-in model lives in the package: its calibration goes to the user's cache; a writable model folder
    gets it beside the model."""
    before = sorted(p.name for p in DEFAULT_MODEL.iterdir())
    text = tmp_path / "text.txt"
    text.write_text((DEFAULT_MODEL.parent / "calibration.txt").read_text()[:2500])
    env_cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-m", "tiermoe.cli", "calibrate", "--only", "residuals", "--text",
                          str(text), "--chunk-tokens", "64"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "XDG_CACHE_HOME": str(env_cache)})
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in DEFAULT_MODEL.iterdir()) == before
    (saved,) = env_cache.glob("tiermoe/shakespeare-moe-*/tiermoe_residuals.safetensors")
    assert f"tiermoe: saved {saved}" in run.stderr
    header, *rows = run.stdout.splitlines()[1:]
    assert header.split()[:3] == ["layer", "P@1", "resid"] and len(rows) == 5  # 6 MoE layers, the last predicts none
    copy = shutil.copytree(DEFAULT_MODEL, tmp_path / "model")
    run = tiermoe("calibrate", "--model", str(copy), "--only", "residuals", "--text", str(text), "--chunk-tokens",
                  "64", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["file"] == str(copy / "tiermoe_residuals.safetensors")
    assert (copy / "tiermoe_residuals.safetensors").exists()


def stderr_of(args: list[str], terminal: bool) -> bytes:
    """What `tiermoe ARGS` writes on stderr, when stderr is a terminal (a pseudo-terminal) or a pipe."""
    cmd = [sys.executable, "-m", "tiermoe.cli", *args]
    if not terminal:
        return subprocess.run(cmd, capture_output=True, timeout=120).stderr
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new one is 0 columns wide
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=child, timeout=120)
    os.close(child)
    out = b""
    try:
        while chunk := os.read(parent, 4096):
            out += chunk
    except OSError:  # EIO: the terminal's other end is closed and everything has been read
        pass
    os.close(parent)
    return out


def test_progress_bars_on_a_terminal_only_and_not_with_quiet(tmp_path):
    experts = np.random.default_rng(0).integers(0, 16, (400, 8, 2))
    experts[:, :, 1] = (experts[:, :, 0] + 1) % 16  # two distinct experts per token
    Trace(experts, np.ones(experts.shape), [0], np.zeros(400, bool), np.arange(400)).save(tmp_path / "t",
                                                                                          {"num_experts": 16})
    args = ["sim", "cache", "--trace", str(tmp_path / "t.npz")]
    assert b"simulating" in stderr_of(args, terminal=True)
    assert b"simulating" not in stderr_of([*args, "--quiet"], terminal=True)
    assert b"simulating" not in stderr_of(args, terminal=False)
