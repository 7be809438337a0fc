"""The tokenizer loaded through `tokenizers` alone gives transformers' AutoTokenizer results, and falls back to
transformers where it would not."""

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from bench.peers.model import train_tokenizer
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL
from tiermoe.tokenizer import FastTokenizer, load_tokenizer

TEXTS = ["ROMEO: But soft, what light through yonder window breaks?", "  two  spaces , and a comma .",
         "naïve café — ünïcödé 日本語 🙂", "<|eos|>text after a special token</s><s>", "", "don't  we 're"]


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """bench.peers' tokenizer: byte-fallback BPE with Metaspace, add_bos_token in tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("llama-style")
    train_tokenizer(600, folder)
    return folder


def folders(llama_style):
    return {"shipped": DEFAULT_MODEL, "shipped-dllm": DEFAULT_DIFFUSION_MODEL, "llama-style": llama_style}


@pytest.mark.parametrize("name", ["shipped", "shipped-dllm", "llama-style"])
def test_same_ids_text_and_special_tokens_as_transformers(name, llama_style):
    folder = folders(llama_style)[name]
    ours, theirs = load_tokenizer(folder, "qwen3_moe"), AutoTokenizer.from_pretrained(folder)
    assert isinstance(ours, FastTokenizer)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert (ours.eos_token_id, ours.bos_token_id, ours.mask_token_id) == \
        (theirs.eos_token_id, theirs.bos_token_id, theirs.mask_token_id)
    assert len(ours) == len(theirs)


def test_bos_and_eos_flags_yield_to_tokenizer_json_as_in_transformers(llama_style, tmp_path):
    folder = tmp_path / "eos"
    shutil.copytree(llama_style, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True, "add_eos_token": True}))
    ours, theirs = load_tokenizer(folder, "mixtral"), AutoTokenizer.from_pretrained(folder)
    assert isinstance(ours, FastTokenizer)
    assert ours.encode(TEXTS[0]) == theirs.encode(TEXTS[0]) == ours.encode(TEXTS[0], add_special_tokens=False)


@pytest.mark.parametrize("change", [{"tokenizer_class": "LlamaTokenizer"}, {"do_lower_case": True},
                                    {"pad_token": "<not-in-tokenizer.json>"}])
def test_settings_it_does_not_apply_go_to_transformers(llama_style, tmp_path, change):
    folder = tmp_path / "other"
    shutil.copytree(llama_style, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | change))
    assert not isinstance(load_tokenizer(folder, "mixtral"), FastTokenizer)


def test_engine_start_imports_neither_transformers_nor_dynamo_and_chat_still_renders():
    code = ("import sys; from tiermoe import LLM, SamplingParams; llm = LLM(); "
            "llm.generate('ROMEO:', SamplingParams(max_tokens=2)); "
            "print(sorted(m for m in ('transformers', 'torch._dynamo') if m in sys.modules)); "
            "llm.chat([{'role': 'user', 'content': 'Speak.'}], SamplingParams(max_tokens=2)); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"  # start-up and generation
    assert out[1] == "True"  # the chat template is rendered by transformers, imported then
