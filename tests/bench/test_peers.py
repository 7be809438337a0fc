"""bench.peers on a tiny shape: the model it builds, the runners, the cgroup plumbing and the report.

The llama.cpp parts run only where llama-cpp-python (the `peers` extra) and its converter are installed.
"""

import importlib.util
import json
import math
from dataclasses import replace

import pytest
from safetensors import safe_open

from bench.peers import cgroup
from bench.peers.model import SHAPES, build_model, model_bytes, prompt_ids
from bench.peers.process import run_engine
from bench.peers.report import environment, save
from bench.peers.resident import summarize, token_checks
from bench.peers.runners import RunSpec, run_tiermoe, run_transformers

SHAPE = SHAPES["mixtral-tiny"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model(SHAPE, tmp_path_factory.mktemp("peers") / "hf")


@pytest.fixture(scope="module")
def spec(folder):
    return RunSpec(engine="tiermoe", model=str(folder), gguf=None, dtype="float32", prompt=prompt_ids(folder, 12),
                   new_tokens=8, runs=2, threads=1)


@pytest.fixture(scope="module")
def resident_runs(spec):
    return [run_tiermoe(spec), run_transformers(replace(spec, engine="transformers"))]


def test_model_has_the_shape_and_a_full_vocabulary(folder):
    from transformers import AutoTokenizer

    with safe_open(folder / "model.safetensors", "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert params == SHAPE.params()
    assert dtypes == {"torch.bfloat16"}
    assert model_bytes(folder) == pytest.approx(2 * params, rel=0.01)
    assert len(AutoTokenizer.from_pretrained(folder)) == SHAPE.vocab_size  # llama.cpp needs vocab == embedding rows
    ids = prompt_ids(folder, 12)
    assert len(ids) == 12 and ids[0] == 1 and max(ids) < SHAPE.vocab_size
    assert build_model(SHAPE, folder) == folder  # cached: a second build reuses the folder


def test_tiermoe_float32_matches_transformers_and_is_timed(resident_runs):
    ours, theirs = resident_runs
    assert ours.token_ids[0] == theirs.token_ids[0]
    assert all(len(t) == 8 for r in resident_runs for t in r.token_ids)
    for run in resident_runs:
        assert len(run.decode_tok_s) == 2 and min(run.decode_tok_s) > 0 and min(run.prefill_tok_s) > 0
    rows = summarize(resident_runs)
    (check,) = token_checks(rows)
    assert check["must_match"] and check["identical"] and check["agreement_pct"] == 100


def test_report_writes_json_markdown_and_plot(resident_runs, tmp_path, folder):
    rows = summarize(resident_runs)
    result = {"environment": environment(["--shape", "mixtral-tiny"]), "notes": ["a note"],
              "model": {"shape": "mixtral-tiny", "params": SHAPE.params(), "bytes": model_bytes(folder),
                        "prompt_tokens": 12, "threads": 1},
              "resident": {"rows": rows, "checks": token_checks(rows)}}
    save(tmp_path, "peers", result, "shared machine")
    md = (tmp_path / "peers.md").read_text()
    assert "shared machine" in md and "| tiermoe | float32 |" in md and "identical" in md
    assert "--shape mixtral-tiny" in md and json.loads((tmp_path / "peers.json").read_text())["resident"]["rows"]
    assert (tmp_path / "peers.png").stat().st_size > 0


@pytest.mark.skipif(cgroup.unavailable() is not None, reason=f"memory cgroups: {cgroup.unavailable()}")
def test_a_run_over_its_memory_limit_is_reported_oom_killed(spec):
    run = run_engine(replace(spec, runs=1, warmup=False), limit=32 << 20, group_name="tiermoe-peers-test-oom",
                     timeout=300)
    assert run.oom_killed and not run.decode_tok_s and run.exit_code != 0
    assert run.group_peak_bytes is not None and run.group_peak_bytes <= 32 << 20


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_converted_model(folder, spec):
    from pathlib import Path

    from bench.peers.gguf_convert import convert, find_converter, tensor_types
    from bench.peers.runners import run_llama_cpp

    work = Path.home() / ".cache" / "tiermoe" / "peers"
    if find_converter(work, fetch=False) is None:
        pytest.skip("llama.cpp's converter is not extracted yet (run `python -m bench.peers` once)")
    gguf = convert(folder, "float32", folder.parent / "gguf", work)
    assert set(tensor_types(gguf)) == {"F32"}
    run = run_llama_cpp(replace(spec, engine="llama.cpp", gguf=str(gguf)))
    assert len(run.token_ids[0]) == 8 and min(run.decode_tok_s) > 0


@pytest.mark.skipif(cgroup.unavailable() is not None, reason=f"memory cgroups: {cgroup.unavailable()}")
def test_tiermoe_sized_to_a_limit_fits_it_and_keeps_its_tokens(folder, spec, resident_runs):
    from bench.peers.memory import LimitPlan, fixed_footprints, limit_row, run_at_limit

    one_token = 2 * 3 * SHAPE.hidden_size * SHAPE.intermediate_size * 4  # top-2 experts in float32
    plan = LimitPlan({"tiermoe": replace(spec, runs=1, warmup=False)}, {"tiermoe": one_token}, [folder],
                     headroom=64 << 20, retries=1, timeout=300)
    fixed = fixed_footprints(plan)["tiermoe"]["fixed_bytes"]
    assert 50 << 20 < fixed < 2 << 30  # python + torch + the model's dense weights
    limit = fixed + (64 << 20) + 4 * one_token
    attempts = run_at_limit(plan, "tiermoe", limit, fixed)
    row = limit_row(100.0, limit, attempts, resident_runs[0].token_ids[0])
    assert not row["oom_killed"] and row["decode_tok_s"] > 0, row["error"]
    assert row["group_peak_bytes"] <= limit and row["same_tokens_as_resident"]
    assert row["setting"].startswith("expert cache")
    # tiermoe given the limit itself (no fitting loop): one run, under the limit, its own split in the notes
    self_sized = replace(plan, floors={})
    row = limit_row(100.0, limit, run_at_limit(self_sized, "tiermoe", limit), resident_runs[0].token_ids[0])
    assert row["attempts"] == 1 and not row["oom_killed"] and row["decode_tok_s"] > 0, row["error"]
    assert row["group_peak_bytes"] <= limit and row["same_tokens_as_resident"]
    assert row["setting"].startswith("memory limit -> expert cache") and row["extra"]["memory"]["limit"] == limit
