"""The shipped diffusion model (tiermoe/assets/shakespeare-dllm, llada2_moe) denoises "ROMEO:" as pinned.

There is no transformers implementation of LLaDA2, so the pinned tokens in
tests/data/default_diffusion_expected.json come from the reference algorithm: the model recomputed over the whole
sequence at every denoising step (no K/V reuse), greedy. The training script separately checks that the engine's
logits equal those of the module the weights were trained in (training_report.json, engine_max_abs_logit_diff).
Regenerate the file after retraining with::

    python tests/test_default_diffusion_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main
from tiermoe.decode import diffusion
from tiermoe.decode.diffusion import DiffusionOptions
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL

EXPECTED_PATH = Path(__file__).resolve().parent / "data" / "default_diffusion_expected.json"
PROMPT = "ROMEO:"
PARAMS = dict(temperature=0.0, max_tokens=48)


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_DIFFUSION_MODEL)


def full_recomputation(llm: LLM) -> list[int]:
    """Greedy block diffusion recomputing every position at every step (the reference decoder)."""
    seq = llm._make_sequence(PROMPT, SamplingParams(**PARAMS))
    diffusion.generate(llm.model, [seq], llm.tokenizer, llm.diffusion, DiffusionOptions(kv_cache=False))
    return list(seq.output_ids)


def test_shipped_folder_is_a_small_llada2_model():
    config = json.loads((DEFAULT_DIFFUSION_MODEL / "config.json").read_text())
    assert config["model_type"] == "llada2_moe"
    size = sum(f.stat().st_size for f in DEFAULT_DIFFUSION_MODEL.iterdir() if f.is_file())
    assert size <= 25 * 2**20


def test_reference_decoder_gives_the_pinned_tokens(llm):
    assert full_recomputation(llm) == json.loads(EXPECTED_PATH.read_text())["token_ids"]


def test_engine_gives_the_pinned_tokens(llm):
    out = llm.generate([PROMPT], SamplingParams(**PARAMS))[0]
    assert list(out.outputs[0].token_ids) == json.loads(EXPECTED_PATH.read_text())["token_ids"]
    assert out.stats["diffusion"]["nfe"] > 0


@pytest.mark.parametrize("budget, tau", [("25%", None), ("25%", "auto"), ("50%", 4)])
def test_offloaded_experts_give_the_pinned_tokens(budget, tau):
    """Per-step LRU caching and TIDE's interval refresh, at expert budgets the model does not fit in."""
    out = LLM(DEFAULT_DIFFUSION_MODEL, expert_cache=budget, tau=tau).generate([PROMPT], SamplingParams(**PARAMS))[0]
    assert out.stats["evictions"] > 0
    assert list(out.outputs[0].token_ids) == json.loads(EXPECTED_PATH.read_text())["token_ids"]


def test_cli_diffusion_flag_uses_the_shipped_model(capsys):
    argv = ["generate", PROMPT, "--diffusion", "--json", "--stats", "--max-tokens", str(PARAMS["max_tokens"])]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["outputs"][0]["token_ids"] == json.loads(EXPECTED_PATH.read_text())["token_ids"]
    assert f"NFE {out['stats']['diffusion']['nfe']}," in captured.err


def write_expected() -> None:
    """Recompute tests/data/default_diffusion_expected.json from the shipped folder."""
    llm = LLM(DEFAULT_DIFFUSION_MODEL)
    ids = full_recomputation(llm)
    record = {"model": "tiermoe/assets/shakespeare-dllm", "prompt": PROMPT, **PARAMS,
              "computed_with": "tiermoe block diffusion recomputing every step (kv_cache=False), float32",
              "token_ids": ids, "text": llm.tokenizer.decode(ids)}
    EXPECTED_PATH.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    write_expected()
