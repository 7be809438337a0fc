"""Tiny checkpoints carrying the published configs' fields (sizes scaled down, every other field as published):
autoregressive ones give transformers' greedy tokens (fp32) on prompts longer than every window and original
context; diffusion ones (LLaDA2.0, LLaDA) load, generate, and give the logits of a plain re-implementation of their
public modeling file.

Also one tiny model per rope type and per sliding-window rule, and the refusal of fields we do not implement.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.models.test_llada import our_logits, reference_llada, reference_llada2
from tests.tiny_diffusion_models import MASK_ID, VOCAB, build_diffusion_from_dict
from tests.tiny_models import build_from_dict
from tiermoe import LLM, SamplingParams
from tiermoe.errors import ConfigError

DATA = Path(__file__).parents[1] / "data" / "published_configs"
PROMPT = [(7 * i + 3) % 120 + 1 for i in range(28)]  # longer than every window (8) and original context (16)
NEW = 10
SMALL = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             max_position_embeddings=256)


def published(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def scaled_rope(rope: dict | None) -> dict | None:
    """The published rope settings with the original context scaled down so the test prompt passes it."""
    return None if rope is None else {**rope, **({"original_max_position_embeddings": 16}
                                                 if "original_max_position_embeddings" in rope else {})}


DEEPSEEK = dict(SMALL, num_key_value_heads=4, moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=24,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16)
# (Mixtral's head_dim = hidden / heads, written out because transformers' longrope/dynamic code reads it)
MIXTRAL = dict(SMALL, num_hidden_layers=2, num_local_experts=4, head_dim=16)
QWEN3 = dict(SMALL, num_hidden_layers=2, head_dim=16, num_experts=16, moe_intermediate_size=32, max_window_layers=2)
QWEN2 = dict(SMALL, num_hidden_layers=3, num_experts=16, moe_intermediate_size=16, shared_expert_intermediate_size=48)
OLMOE = dict(SMALL, num_hidden_layers=2, num_key_value_heads=4, num_experts=16, intermediate_size=32)
CASES = {
    # name: (published config, overrides that scale it down and exercise a feature)
    "deepseek-v2": ("deepseek-v2", dict(DEEPSEEK, num_hidden_layers=2)),
    # DeepSeek-V2-Lite's differences from V2 (its config was not found verbatim): no query LoRA (q_proj), plain
    # greedy top-k over one group, two shared experts
    "deepseek-v2-lite": ("deepseek-v2", dict(DEEPSEEK, num_hidden_layers=2, q_lora_rank=None, topk_method="greedy",
                                             n_group=1, topk_group=1, n_shared_experts=2)),
    "deepseek-v3": ("deepseek-v3", dict(DEEPSEEK, num_hidden_layers=4)),
    "qwen3-235b-a22b": ("qwen3-235b-a22b", dict(QWEN3)),
    "qwen3-30b-a3b": ("qwen3-30b-a3b", dict(QWEN3)),
    # Qwen3's documented long-context setting: YaRN over the original context
    "qwen3-yarn": ("qwen3-235b-a22b", dict(QWEN3, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 16})),
    "qwen3-sliding": ("qwen3-235b-a22b", dict(QWEN3, use_sliding_window=True, sliding_window=8)),
    "qwen2-57b-a14b": ("qwen2-57b-a14b", dict(QWEN2)),
    # transformers' default layer_types: even layers below max_window_layers slide
    "qwen2-sliding": ("qwen2-57b-a14b", dict(QWEN2, use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "qwen2-layer-types": ("qwen2-57b-a14b", dict(QWEN2, use_sliding_window=True, sliding_window=8, layer_types=[
        "full_attention", "sliding_attention", "sliding_attention"])),
    "olmoe-1b-7b-0924": ("olmoe-1b-7b-0924", dict(OLMOE)),
    "mixtral-8x7b": ("mixtral-8x7b-v0.1", dict(MIXTRAL)),
    "mixtral-8x22b": ("mixtral-8x22b-v0.1", dict(MIXTRAL)),
    "mixtral-sliding": ("mixtral-8x7b-v0.1", dict(MIXTRAL, sliding_window=8)),
    "mixtral-linear": ("mixtral-8x7b-v0.1", dict(MIXTRAL, rope_scaling={"type": "linear", "factor": 4.0})),
    "mixtral-llama3": ("mixtral-8x7b-v0.1", dict(MIXTRAL, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mixtral-longrope": ("mixtral-8x7b-v0.1", dict(MIXTRAL, rope_scaling={
        "rope_type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(8)],
        "short_factor": [1.0 + 0.02 * i for i in range(8)], "original_max_position_embeddings": 16})),
    # dynamic NTK grows past max_position_embeddings, so the prompt must pass that (the engine allows it)
    "mixtral-dynamic": ("mixtral-8x7b-v0.1", dict(MIXTRAL, max_position_embeddings=16,
                                                  rope_scaling={"type": "dynamic", "factor": 2.0})),
}
# Diffusion families: sizes (rotary_dim with them) scaled down; the vocabulary too, so the mask token is named.
LLADA2 = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=8,
              intermediate_size=96, moe_intermediate_size=16, num_experts=16, num_hidden_layers=3,
              mask_token_id=MASK_ID)
LLADA = dict(vocab_size=VOCAB, embedding_size=VOCAB, d_model=64, n_heads=4, n_kv_heads=4, n_layers=2,
             mlp_hidden_size=96, mask_token_id=MASK_ID)
DIFFUSION_CASES = {"llada2.0-mini": LLADA2, "llada2.0-mini-preview": LLADA2, "llada-8b-instruct": LLADA}


def case_config(name: str) -> dict:
    source, overrides = CASES[name]
    config = {**published(source), **overrides}
    config.pop("quantization_config", None)  # fp8 is refused (tested below); the rest of V3 is tested here
    if "rope_scaling" in config and "rope_scaling" not in overrides:
        config["rope_scaling"] = scaled_rope(config["rope_scaling"])
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("published"), {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_from_dict(case_config(name), root / name)
        return cache[name]

    return get


def greedy_transformers(model, prompt: list[int], n: int = NEW) -> list[int]:
    """transformers' greedy tokens, EOS included (min_new_tokens would suppress it; ours run with ignore_eos)."""
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_match_transformers(name, built):
    model, folder = built(name)
    llm = LLM(folder, max_model_len=64)
    ours = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True))[0]
    assert ours.outputs[0].token_ids == greedy_transformers(model, PROMPT)


@pytest.mark.parametrize("name", ["mixtral-sliding", "mixtral-dynamic", "mixtral-longrope", "qwen2-sliding"])
def test_request_tokens_do_not_depend_on_its_batch(name, built):
    """Windows and length-dependent rope are per sequence: a short request batched with a long one is unchanged."""
    llm = LLM(built(name)[1], max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    short = PROMPT[:6]
    alone = [o.outputs[0].token_ids for p in (short, PROMPT) for o in llm.generate([p], params)]
    assert [o.outputs[0].token_ids for o in llm.generate([short, PROMPT], params)] == alone


def test_window_and_rope_cases_are_not_vacuous(built):
    """The sliding window and the scaled rope change the tokens: without them the prompt would decode otherwise."""
    base = LLM(built("mixtral-8x7b")[1], max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    plain = base.generate([PROMPT], params)[0].outputs[0].token_ids
    for name in ("mixtral-sliding", "mixtral-linear", "mixtral-longrope"):
        model, _ = built(name)
        assert greedy_transformers(model, PROMPT) != plain, name


@pytest.fixture(scope="module")
def diffusion_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("published-diffusion")
    return {name: build_diffusion_from_dict({**published(name), **scale}, root / name)
            for name, scale in DIFFUSION_CASES.items()}


@pytest.mark.parametrize("name", DIFFUSION_CASES)
def test_diffusion_configs_load_generate_and_match_the_modeling_file(name, diffusion_built):
    """Every published field is accepted, and the forward pass is the public modeling file's for those fields
    (partial rotary, dense first layers, grouped sigmoid router with top-8, shared expert, biases off)."""
    folder = diffusion_built[name]
    config, llm = json.loads((folder / "config.json").read_text()), LLM(folder)
    out = llm.generate([PROMPT[:11]], SamplingParams(temperature=0, max_tokens=16, block_length=8, steps=8))[0]
    assert len(out.outputs[0].token_ids) == 16 and MASK_ID not in out.outputs[0].token_ids
    raw, ids = load_file(folder / "model.safetensors"), PROMPT[:11] + [MASK_ID] * 13
    if config["model_type"] == "llada2_moe":
        expected, ours = reference_llada2(raw, config, ids, 8), our_logits(llm, ids, 8)
    else:
        expected, ours = reference_llada(raw, config, ids), our_logits(llm, ids, None)
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("source, field, value", [
    ("deepseek-v3", "quantization_config", None),  # fp8 block quantisation is not implemented
    ("deepseek-v3", "scoring_func", "softmax"),
    ("deepseek-v2", "topk_method", "noaux_tc"),
    ("deepseek-v2", "norm_topk_prob", True),
    ("deepseek-v2", "moe_layer_freq", 2),
    ("mixtral-8x7b-v0.1", "hidden_act", "gelu"),
    ("mixtral-8x7b-v0.1", "attention_sink", 4),
    ("qwen3-235b-a22b", "layer_types", ["full_attention"] * 94),
    ("qwen3-235b-a22b", "rope_scaling", {"rope_type": "yarn", "factor": 4.0, "sharpness": 1.0}),
    # training-framework switches LLaDA2.0's modeling file never reads: only the published values are what it runs
    ("llada2.0-mini", "use_rmsnorm", False),
    ("llada2.0-mini", "using_split_qkv_in_self_attention", True),
    ("llada2.0-mini", "rotary_dim", 128),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, source, field, value):
    config = published(source)
    if value is not None:
        config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    name = "sharpness" if field == "rope_scaling" else field
    with pytest.raises(ConfigError, match=name):
        LLM(tmp_path)


def family_configs() -> dict[str, dict]:
    """Every published config.json, the built-in models' and the tiny diffusion ones: each family is covered."""
    from tests.tiny_diffusion_models import LLADA2_CONFIG, LLADA_CONFIG
    from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL, read_config

    configs = {f.stem: published(f.stem) for f in sorted(DATA.glob("*.json"))}
    configs["deepseek-v3"].pop("quantization_config")  # refused by name (above); the rest must be accepted
    configs |= {"tiny-llada2_moe": LLADA2_CONFIG, "tiny-llada": LLADA_CONFIG,
                "shakespeare-moe": read_config(DEFAULT_MODEL), "shakespeare-dllm": read_config(DEFAULT_DIFFUSION_MODEL)}
    return configs


@pytest.mark.parametrize("name", list(family_configs()))
def test_every_family_refuses_an_unknown_field_by_name(name):
    from tiermoe.models.registry import family

    config = family_configs()[name]
    build = family(config["model_type"]).build
    with torch.device("meta"):
        build(config)  # as published: every field classified
        with pytest.raises(ConfigError, match="expert_dropout_schedule"):
            build({**config, "expert_dropout_schedule": "cosine"})
