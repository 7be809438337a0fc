"""The order a forward pass asks for its experts: the prompt's last tokens' experts last, so they stay resident."""

import numpy as np
import torch

from tests.offload.test_tiered_store import budgets
from tiermoe import LLM, SamplingParams
from tiermoe.engine.model_runner import forward_new_tokens
from tiermoe.offload.fetch_order import fetch_order


def test_experts_ordered_by_their_latest_token_with_counts():
    ids = np.array([[5, 1], [2, 5], [7, 3], [-1, -1]])  # the last token's layer was not computed
    assert fetch_order(ids) == ([1, 2, 5, 3, 7], [1, 1, 2, 1, 1])
    assert fetch_order(np.array([[4, 0]])) == ([0, 4], [1, 1])  # one token: ascending ids


def test_a_prefill_larger_than_the_budget_leaves_its_last_tokens_experts_resident(tiny_models):
    folder = tiny_models("mixtral")
    least = budgets(folder)[0][-1]  # room for exactly one token's top-k experts
    llm = LLM(folder, expert_cache=least)
    last = llm.model.moe_blocks[-1]
    routed = {}

    def observe(layer, ids, weights):
        routed[layer] = ids.clone()
        return ids, weights

    last.on_route = observe
    prompt = [3, 17, 42, 9, 77, 5, 61, 23, 88, 1, 64, 12]
    with torch.inference_mode():
        forward_new_tokens(llm.model, [llm._make_sequence(prompt, SamplingParams(max_tokens=1))])
    ids = routed[last.layer]  # [T, k]
    final = {(last.layer, e) for e in ids[-1].tolist()}
    highest = {(last.layer, e) for e in torch.unique(ids).tolist()[-len(final):]}
    assert final != highest, "pick a prompt where ascending id order would leave other experts resident"
    assert set(llm.store.cache.resident) == final
