"""Weights that `tiermoe policy train` writes run the live engine: LLM(...) and the CLI load them, losslessly."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main as cli_main
from tiermoe.errors import ConfigError
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.offload.policies.learned import LearnedConfig, LearnedPolicy, LearnedWeights
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.offload.tools import policy_cli
from tiermoe.sim.trace import Trace

PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)
FEATURES = ("recency", "frequency")  # unlike the shipped weights' inputs, so their decisions differ


def token_ids(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The built-in model's routing recorded by the engine, policy weights trained on it, and all-resident output."""
    root = tmp_path_factory.mktemp("learned")
    llm = LLM(DEFAULT_MODEL)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, record_trace=root / "trace")]
    out = root / "tiny.safetensors"
    args = ["train", "--trace", str(root / "trace.npz"), "--out", str(out), "--split", "1", "--rows-per-layer", "300",
            "--epochs", "3", "--features", ",".join(FEATURES), "--capacity", "25%"]
    assert policy_cli.main(args) == 0
    return Trace.load(root / "trace"), out, expected


def evictions(trace: Trace, weights) -> list:
    """Evicted keys per request, replaying the trace through one cache over all layers at a quarter of the experts."""
    cache = ExpertCache(trace.num_layers * trace.num_experts // 4, LearnedPolicy(weights))
    rows = trace.experts  # [T, L, K]
    return [cache.request([(layer, int(e)) for e in rows[t, layer] if e >= 0], t * trace.num_layers + layer).evicted
            for t in range(len(rows)) for layer in range(trace.num_layers)]


def test_llm_loads_trained_weights_and_stays_lossless(trained):
    trace, path, expected = trained
    llm = LLM(DEFAULT_MODEL, expert_cache="25%", cache_policy="learned", learned_weights=path)
    assert token_ids(llm) == expected
    assert llm.store.stats.total.misses > 0 and llm.store.stats.evictions > 0
    policy, loaded = llm.store.cache.policy, LearnedWeights.load(path)
    assert policy.weights.config.features == FEATURES
    assert np.array_equal(policy.weights.pooled.w1, loaded.pooled.w1)
    # The file decides: on the same requests, its weights evict other experts than the shipped ones.
    assert evictions(trace, path) != evictions(trace, None)


def test_cli_generate_with_trained_weights(trained):
    _, path, expected = trained
    run = subprocess.run([sys.executable, "-m", "tiermoe.cli", "generate", "--json", "--max-tokens", "24",
                          "--expert-cache", "25%", "--cache-policy", "learned", "--learned-weights", str(path),
                          PROMPTS[0]], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == expected[0]


def test_unusable_weights_are_refused_by_name(trained, tmp_path, capsys):
    _, path, _ = trained
    budget = dict(expert_cache="25%", cache_policy="learned")
    with pytest.raises(ConfigError, match="do not exist"):
        LLM(DEFAULT_MODEL, **budget, learned_weights=tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        LLM(DEFAULT_MODEL, **budget, learned_weights=tmp_path / "notes.txt")
    # MLPs of two inputs under a config that names three: the shapes do not fit.
    weights = LearnedWeights.load(path)
    LearnedWeights(LearnedConfig(features=("recency", "frequency", "reuse")), weights.layers, weights.pooled,
                   weights.info).save(tmp_path / "misfit.safetensors")
    with pytest.raises(ConfigError, match=r"tensor pooled.w1 is of shape \[2, 32\].*needs shape \[3, 32\]"):
        LLM(DEFAULT_MODEL, **budget, learned_weights=tmp_path / "misfit.safetensors")
    with pytest.raises(ConfigError, match="cache_policy is 'lru'"):
        LLM(DEFAULT_MODEL, expert_cache="25%", learned_weights=path)
    with pytest.raises(ConfigError, match="need an expert budget"):
        LLM(DEFAULT_MODEL, cache_policy="learned", learned_weights=path)
    assert cli_main(["generate", "--expert-cache", "25%", "--cache-policy", "learned", "--learned-weights",
                     str(tmp_path / "misfit.safetensors"), "ROMEO:"]) == 2
    assert "needs shape [3, 32]" in capsys.readouterr().err
