"""The tiny models loaded once per test module: diffusion ones, and an autoregressive one with its transformers
reference (the sampling and logprobs tests recompute its logits)."""

import pytest
import torch

from tiermoe import LLM


@pytest.fixture(scope="module")
def llada2(folders):
    return LLM(folders["llada2_moe"])


@pytest.fixture(scope="module")
def llada(folders):
    return LLM(folders["llada"])


@pytest.fixture(scope="module")
def ar_folder(tiny_models):
    return tiny_models("qwen2_moe")


@pytest.fixture(scope="module")
def ref(ar_folder):
    """transformers' model of `ar_folder`'s checkpoint, in fp32."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(ar_folder, dtype=torch.float32).eval()
