"""The affinity prefetcher: its table learns inter-layer routing, is chosen and judged on sequences it was not fitted
on, is written by `tiermoe prefetch train` where `--prefetch affinity` finds it, and is refused on a model of another
shape. Lossless reads ahead with it, within the budget, on every family: test_lossless_matrix.py."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main
from tiermoe.errors import ConfigError
from tiermoe.offload.prefetch import AFFINITY_FILE, AffinityTable
from tiermoe.offload.tools.prefetch_cli import fit_affinity
from tiermoe.sim.trace import Trace

E, K = 8, 2  # the tiny models' experts and top-k


def routing(sequences: int, tokens: int, layers: int, follow: bool, seed: int = 0) -> Trace:
    """Random first-layer routing; each later layer picks (e + 3) mod E for each expert e the layer before picked
    when `follow`, else an independent random choice."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.permutation(E)[:K] for _ in range(sequences * tokens * layers)]).reshape(-1, layers, K)
    if follow:
        for layer in range(1, layers):
            x[:, layer] = (x[:, layer - 1] + 3) % E
    n = len(x)
    return Trace(x, np.full(x.shape, 0.5), np.arange(0, n, tokens), np.zeros(n, bool), np.arange(n) % tokens,
                 meta={"num_experts": E})


def test_held_out_precision_follows_how_predictable_routing_is():
    _, learned = fit_affinity([routing(12, 16, 3, follow=True)], split=0.5)
    within = learned["heldout"]["within_token"]
    assert within["precision"] == 1.0 and within["recall"] == 1.0  # the next layer is a function of this one
    assert learned["settings"]["top_p"] == K
    _, chance = fit_affinity([routing(12, 16, 3, follow=False)], split=0.5, min_prob=0.0)
    assert chance["heldout"]["within_token"]["precision"] < 0.45  # independent layers: about K / E = 0.25
    assert sorted(chance["split"]["train_sequences"][""]) == chance["split"]["train_sequences"][""]
    assert len(chance["split"]["train_sequences"][""]) == 6


def test_prefetch_train_writes_the_table_that_prefetch_affinity_loads(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models("qwen3_moe", "per_expert"), tmp_path / "m")
    llm = LLM(folder)
    layers = len(llm.model.moe_blocks)
    prompts = [[3 + i, 17, 42 + i, 9, 77] for i in range(8)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False,
                 record_trace=tmp_path / "routing")
    assert main(["prefetch", "train", "--trace", str(tmp_path / "routing.npz"), "--model", str(folder)]) == 0
    table = AffinityTable.load(folder / AFFINITY_FILE)
    assert table.probs.shape == (layers, E, E) and table.info["heldout"]["tokens"] > 0
    assert (folder / AFFINITY_FILE).with_suffix(".json").exists()

    expected = [o.outputs[0].token_ids for o in llm.generate(prompts[:2], SamplingParams(temperature=0,
                                                                                         max_tokens=8))]
    offloaded = LLM(folder, expert_cache="50%", prefetch="affinity")
    assert offloaded.model.moe_blocks[0].prefetcher.top_p == table.top_p  # the validated count by default
    got = [o.outputs[0].token_ids for o in offloaded.generate(prompts[:2], SamplingParams(temperature=0,
                                                                                          max_tokens=8))]
    offloaded.store.close()
    assert got == expected


def test_affinity_needs_a_table_of_the_models_shape(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models("mixtral", "per_expert"), tmp_path / "m")
    with pytest.raises(ConfigError, match="run `tiermoe prefetch train"):
        LLM(folder, expert_cache="50%", prefetch="affinity")
    table, _ = fit_affinity([routing(8, 8, 5, follow=True)], top_p=1, min_prob=0.0)
    table.save(folder / AFFINITY_FILE)
    with pytest.raises(ConfigError, match=r"affinity table is for 5 MoE layers x 8 experts; the model has \d+ x"):
        LLM(folder, expert_cache="50%", prefetch="affinity")
    save_file({"affinity_probs": torch.zeros(3)}, folder / AFFINITY_FILE)  # no settings
    with pytest.raises(ConfigError, match="not an affinity table"):
        LLM(folder, expert_cache="50%", prefetch="affinity")


def test_prefetch_train_refuses_bad_settings(tmp_path, capsys):
    routing(4, 8, 3, follow=True).save(tmp_path / "r")
    assert main(["prefetch", "train", "--trace", str(tmp_path / "r.npz"), "--out", str(tmp_path / "t.safetensors"),
                 "--validation", "1"]) == 2
    assert "--validation must be in (0, 1)" in capsys.readouterr().err
    assert main(["prefetch", "train", "--trace", str(tmp_path / "r.npz"), "--out", str(tmp_path / "t.safetensors"),
                 "--split", "0.25"]) == 2  # one training sequence: none left to validate on
    assert "too few training sequences" in capsys.readouterr().err
