"""Tiny checkpoints carrying the published configs' fields (sizes scaled down, every other field as published),
greedy tokens against transformers' generate in fp32 with prompts longer than every window and original context.

Also one tiny model per rope type and per sliding-window rule, and the refusal of fields we do not implement.
"""

import json
from pathlib import Path

import pytest
import torch

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
CASES = {
    # name: (published config, overrides that scale it down and exercise a feature)
    "deepseek-v2": ("deepseek-v2", dict(DEEPSEEK, num_hidden_layers=2)),
    "deepseek-v3": ("deepseek-v3", dict(DEEPSEEK, num_hidden_layers=4)),
    "qwen3-235b-a22b": ("qwen3-235b-a22b", dict(QWEN3)),
    # Qwen3's documented long-context setting: YaRN over the original context
    "qwen3-yarn": ("qwen3-235b-a22b", dict(QWEN3, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 16})),
    "qwen3-sliding": ("qwen3-235b-a22b", dict(QWEN3, use_sliding_window=True, sliding_window=8)),
    "mixtral-8x7b": ("mixtral-8x7b-v0.1", dict(MIXTRAL)),
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
QWEN2_BASE = dict(SMALL, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_hidden_layers=3,
                  moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=48,
                  rope_theta=1000000.0, hidden_act="silu")
CASES_QWEN2 = {
    # transformers' default layer_types: even layers below max_window_layers slide
    "qwen2-sliding": dict(QWEN2_BASE, use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "qwen2-layer-types": dict(QWEN2_BASE, use_sliding_window=True, sliding_window=8,
                              layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
}


def case_config(name: str) -> dict:
    if name in CASES_QWEN2:
        return CASES_QWEN2[name]
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


@pytest.mark.parametrize("name", [*CASES, *CASES_QWEN2])
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
    """One config.json per family: the published ones, the built-in models, the tiny diffusion ones."""
    from tests.tiny_diffusion_models import LLADA2_CONFIG, LLADA_CONFIG
    from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL, read_config

    configs = {name: published(name) for name in ("deepseek-v2", "mixtral-8x7b-v0.1", "qwen3-235b-a22b")}
    configs["deepseek-v3"] = {k: v for k, v in published("deepseek-v3").items() if k != "quantization_config"}
    configs |= {"qwen2-moe": QWEN2_BASE, "llada2_moe": LLADA2_CONFIG, "llada": LLADA_CONFIG,
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
