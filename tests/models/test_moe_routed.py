"""A batch's routed experts (SparseMoE.routed: one gather, groups as the store hands them over, one sum per token)
give every token the bits it gets alone (the batch-1 path), whatever the store holds: all resident, or a budget that
serves residents and landed reads in groups of experts that are not neighbours in the batch's entries."""

from __future__ import annotations

import pytest
import torch

from tiermoe.config import EngineConfig
from tiermoe.engine import LLMEngine


@pytest.fixture(scope="module")
def blocks(tiny_models):
    made = {}

    def get(budget: str | None):
        if budget not in made:
            # qwen3_moe: top-3, so an order of the adds shows in the bits
            engine = LLMEngine(EngineConfig(model=tiny_models("qwen3_moe"), expert_cache=budget))
            made[budget] = engine.model.moe_blocks
        return made[budget]

    return get


def routing(block, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs [T, H], router weights [T, A] and distinct expert ids [T, A] per token, in router rank order."""
    gen = torch.Generator().manual_seed(seed)
    args = block.gate.args
    hidden = block.gate.weight.shape[1]
    ids = torch.stack([torch.randperm(args.num_experts, generator=gen)[:args.top_k] for _ in range(tokens)])
    x = torch.randn(tokens, hidden, generator=gen).to(block.gate.weight.dtype)
    return x, torch.rand(tokens, args.top_k, generator=gen), ids


@pytest.mark.parametrize("budget", [None, "30%"])
@pytest.mark.parametrize("tokens", [2, 7])
def test_each_token_of_a_batch_gets_its_bits_alone(blocks, budget, tokens):
    for layer, block in enumerate(blocks(budget)):
        x, weights, ids = routing(block, tokens, seed=tokens * 100 + layer)
        together = block.routed(x, weights, ids)  # [T, H]
        for t in range(tokens):
            alone = block.routed(x[t:t + 1], weights[t:t + 1], ids[t:t + 1])  # the batch-1 path
            assert torch.equal(together[t:t + 1], alone), (layer, t)


def test_a_token_the_layer_does_not_compute_gets_zeros_and_the_others_their_bits(blocks):
    block = blocks("30%")[0]
    x, weights, ids = routing(block, 4, seed=7)
    ids[2] = -1  # the layer was not computed for token 2 (a replayed trace's gap)
    together = block.routed(x, weights, ids)
    assert not together[2].any()
    for t in (0, 1, 3):
        assert torch.equal(together[t:t + 1], block.routed(x[t:t + 1], weights[t:t + 1], ids[t:t + 1]))
