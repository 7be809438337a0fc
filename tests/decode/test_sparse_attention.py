"""Head-centric sparse attention (--sparse-attention top_k=N) on block diffusion: the selection per KV head, the
light steps' attention over it, exactness when N covers the prefix, and the option's refusals."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.decode.test_diffusion import LONG, SHORT
from tiermoe import LLM, SamplingParams
from tiermoe.errors import ConfigError
from tiermoe.models.sparse_attention import SparseKV
from tiermoe.models.sparse_spec import SparseAttention

BLOCK, PREFIX, G, R, D = 4, 12, 2, 2, 8  # block length, cached prefix, KV heads, query heads per KV head, head dim


def hand_set_keys() -> tuple[torch.Tensor, torch.Tensor, dict[int, list[int]]]:
    """keys [PREFIX + BLOCK, G, D], queries [BLOCK, G * R, D]: KV head 0's queries match prefix positions 2, 5, 9
    strongly, KV head 1's match 0, 7, 11; every other key is orthogonal to the queries."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(PREFIX + BLOCK, G, D, generator=g) * 0.1
    keys[..., 0] = 0.0  # the queries read feature 0 only
    favoured = {0: [2, 5, 9], 1: [0, 7, 11]}
    for head, positions in favoured.items():
        keys[positions, head, 0] = torch.tensor([3.0, 2.0, 1.0])
    q = torch.zeros(BLOCK, G * R, D)
    q[..., 0] = 4.0
    return q, keys, favoured


def test_each_kv_head_keeps_the_prefix_positions_its_query_heads_attend_to_most():
    q, keys, favoured = hand_set_keys()
    values = torch.randn(PREFIX + BLOCK, G, D, generator=torch.Generator().manual_seed(1))
    sparse = SparseKV(top_k=3)
    # the heavy step: the last block's rows [PREFIX, PREFIX + BLOCK) over everything, dense
    heavy = sparse.attend(0, q, keys, values, PREFIX, None, BLOCK)
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                           enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(heavy, dense, rtol=0, atol=0)
    sel = sparse.layers[0]
    assert sel.prefix == PREFIX and sel.kept == 3
    for head, positions in favoured.items():  # per head its own positions, ascending, exactly N of them
        torch.testing.assert_close(sel.keys[head, :3], keys[positions, head])
        torch.testing.assert_close(sel.values[head, :3], values[positions, head])
    # a light step: the block's rows over the kept positions and the block itself -- dense attention with every
    # other prefix position of that head masked out
    light = sparse.attend(0, q, keys, values, PREFIX, None, BLOCK)
    mask = torch.zeros(G, PREFIX + BLOCK, dtype=torch.bool)
    mask[:, PREFIX:] = True
    for head, positions in favoured.items():
        mask[head, positions] = True
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                              attn_mask=mask.repeat_interleave(R, 0)[:, None, :],
                                              enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(light, expected)
    assert not torch.allclose(light, dense)


def test_a_top_k_covering_the_prefix_attends_exactly_as_dense():
    q, keys, _ = hand_set_keys()
    values = torch.randn(PREFIX + BLOCK, G, D, generator=torch.Generator().manual_seed(1))
    sparse = SparseKV(top_k=PREFIX)
    sparse.attend(0, q, keys, values, PREFIX, None, BLOCK)
    light = sparse.attend(0, q, keys, values, PREFIX, None, BLOCK)
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                           enable_gqa=True).transpose(0, 1)
    assert torch.equal(light, dense)


@pytest.fixture(scope="module")
def llada2_sparse(folders):
    """The tiny llada2_moe with a top_k far beyond any prefix it sees, and with a small one."""
    return {n: LLM(folders["llada2_moe"], sparse_attention=f"top_k={n}") for n in (4096, 2)}


def tokens(llm, prompts, params):
    return [out.outputs[0].token_ids for out in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]


@pytest.mark.parametrize("block_length, steps, threshold", [(8, 8, 0.95), (4, 2, 0.3), (16, 4, 0.05)])
def test_top_k_beyond_the_prefix_gives_dense_attentions_tokens(llada2, llada2_sparse, block_length, steps, threshold):
    params = SamplingParams(temperature=0, max_tokens=40, block_length=block_length, steps=steps,
                            threshold=threshold, ignore_eos=True)
    prompts = [LONG, SHORT, LONG * 3]  # batched together, as the engine steps them
    dense = tokens(llada2, prompts, params)
    assert tokens(llada2_sparse[4096], prompts, params) == dense


def test_a_small_top_k_changes_the_light_steps(llada2, llada2_sparse):
    """Sparse attention is approximate: keeping 2 of ~60 prefix positions per head moves the predictions (the
    dense default, above, stays as it was)."""
    params = SamplingParams(temperature=0, max_tokens=48, block_length=8, steps=8, ignore_eos=True)
    outs = [llada2_sparse[2].generate([{"prompt_token_ids": LONG * 3}], params, use_tqdm=False)[0],
            llada2.generate([{"prompt_token_ids": LONG * 3}], params, use_tqdm=False)[0]]
    sparse, dense = (o.outputs[0].token_ids for o in outs)
    assert sparse != dense and len(sparse) == len(dense) == 48


@pytest.mark.parametrize("spec", ["top_k", "top_k=", "top_k=abc", "top_k=1.5", "top_k=-3", "k=4", "128", ""])
def test_a_malformed_spec_is_refused_naming_the_form(spec):
    with pytest.raises(ConfigError, match=r"sparse_attention .* malformed: expected top_k=N"):
        SparseAttention.parse(spec)


def test_top_k_zero_is_refused():
    with pytest.raises(ConfigError, match="top_k must be >= 1, got 0"):
        SparseAttention.parse("top_k=0")


def test_models_without_light_steps_are_refused_by_name(folders, tiny_models):
    with pytest.raises(ConfigError, match="qwen2_moe is autoregressive"):
        LLM(tiny_models("qwen2_moe"), sparse_attention="top_k=8")
    with pytest.raises(ConfigError, match="llada recomputes bidirectional attention"):
        LLM(folders["llada"], sparse_attention="top_k=8")


def test_cli_refuses_a_malformed_spec_before_loading():
    run = subprocess.run([sys.executable, "-m", "tiermoe.cli", "generate", "--diffusion", "--sparse-attention",
                          "top-k=64", "hi"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "argument --sparse-attention: sparse_attention 'top-k=64' is malformed" in run.stderr
