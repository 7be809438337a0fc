"""Bad input gets an exception that names the problem."""

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tiermoe import LLM, SamplingParams
from tiermoe.errors import CheckpointError, ConfigError, RequestError


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    def copy(family="qwen3_moe", layout="per_expert"):
        dst = tmp_path / f"{family}-{layout}"
        shutil.copytree(tiny_models(family, layout), dst)
        return dst

    return copy


def rewrite_without(folder, drop: str):
    path = next(folder.glob("*.safetensors"))
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    save_file(state, path)


def test_missing_expert_tensor_is_named(model_copy):
    folder = model_copy()
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    rewrite_without(folder, name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        LLM(folder)


def test_missing_whole_expert_is_named(model_copy):
    folder = model_copy()
    for part in ("gate", "up", "down"):
        rewrite_without(folder, f"model.layers.2.mlp.experts.7.{part}_proj.weight")
    with pytest.raises(CheckpointError, match=r"expert 7 of layer 2"):
        LLM(folder)


def test_missing_attention_tensor_is_named(model_copy):
    folder = model_copy("mixtral")
    rewrite_without(folder, "model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        LLM(folder)


def test_truncated_safetensors_file(model_copy):
    folder = model_copy()
    path = next(folder.glob("*.safetensors"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated.*"):
        LLM(folder)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"truncated"):
        LLM(folder)


def test_unknown_model_type_lists_supported(model_copy):
    folder = model_copy()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_banana"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt_banana'; supported: ") as err:
        LLM(folder)
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llada2_moe"):
        assert family in str(err.value)


def test_malformed_config(model_copy):
    folder = model_copy()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"malformed JSON"):
        LLM(folder)


def test_config_missing_a_field(model_copy):
    folder = model_copy("mixtral")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"hidden_size"):
        LLM(folder)


def test_shape_mismatch_between_config_and_weights(model_copy):
    folder = model_copy("mixtral")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 200
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"embed_tokens.*shape"):
        LLM(folder)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        LLM(tmp_path / "nowhere")


@pytest.fixture
def llm(tiny_models):
    return LLM(tiny_models("mixtral"), max_model_len=64)


def test_empty_prompt(llm):
    with pytest.raises(RequestError, match=r"prompt is empty"):
        llm.generate([[]], SamplingParams(max_tokens=4))


def test_max_tokens_must_be_positive():
    for bad in (0, -3):
        with pytest.raises(RequestError, match=r"max_tokens must be >= 1"):
            SamplingParams(max_tokens=bad)


def test_prompt_longer_than_context(llm):
    with pytest.raises(RequestError, match=r"prompt has 64 tokens but the model's context is 64"):
        llm.generate([[5] * 64], SamplingParams(max_tokens=4))


def test_token_ids_out_of_vocabulary(llm):
    with pytest.raises(RequestError, match=r"token ids must be in \[0, 128\)"):
        llm.generate([[5, 128]], SamplingParams(max_tokens=4))


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(RequestError, match=r"no tokenizer"):
        llm.generate("hello", SamplingParams(max_tokens=4))


def test_bad_sampling_values():
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)


def test_generation_stops_at_the_context_limit(llm):
    out = llm.generate([[5] * 60], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
