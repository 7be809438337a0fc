"""The tiny diffusion models loaded once per test module."""

import pytest

from tiermoe import LLM


@pytest.fixture(scope="module")
def llada2(folders):
    return LLM(folders["llada2_moe"])


@pytest.fixture(scope="module")
def llada(folders):
    return LLM(folders["llada"])
