"""The diffusion families on tiny hand-written checkpoints: loading, name mapping, routing and the forward pass
against straightforward re-implementations of the public modeling files written here (no transformers reference
exists for LLaDA)."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.tiny_diffusion_models import FAMILIES
from tiermoe import LLM, SamplingParams
from tiermoe.checkpoint import CheckpointIndex
from tiermoe.decode.kv_cache import KVCache
from tiermoe.models.layers import ForwardBatch, SeqSlice
from tiermoe.models.registry import family, read_config

PROMPT = [3, 17, 42, 9, 77, 5, 101, 64, 12, 33, 8]


@pytest.fixture(scope="module")
def llms(folders):
    return {f: LLM(folder) for f, folder in folders.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_models_load_via_the_registry_and_generate(name, llms):
    llm = llms[name]
    assert llm.diffusion is not None and llm.diffusion.mask_id == 159
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, block_length=8, steps=8))[0]
    assert len(out.outputs[0].token_ids) == 20 and out.outputs[0].finish_reason == "length"
    assert 159 not in out.outputs[0].token_ids  # the mask token is never a prediction
    assert out.stats["diffusion"]["nfe"] > 0


def test_llada2_has_moe_layers_after_the_dense_ones_and_llada_has_none(llms):
    assert [b.layer for b in llms["llada2_moe"].model.moe_blocks] == [1, 2]
    assert llms["llada2_moe"].model.moe_blocks[0].shared_expert is not None
    assert llms["llada"].model.moe_blocks == [] and llms["llada"].index.experts() == {}


@pytest.mark.parametrize("name", FAMILIES)
def test_sanitize_maps_every_checkpoint_tensor_onto_the_model(name, folders, llms):
    index = CheckpointIndex(folders[name], family(name).sanitize)
    with torch.device("meta"):  # the names the loader reads, before projections are fused
        model_names = set(family(name).build(read_config(folders[name])).state_dict())
    assert set(index.non_expert_names()) == model_names
    if name == "llada2_moe":
        assert len(index.experts()) == 2 * 16


def reference_router(x, weight, bias, top_k=4, n_group=4, topk_group=2, scale=2.5):
    """LLaDA2MoeGate, token by token: sigmoid scores in fp32; expert_bias only decides the choice; groups ranked by
    the sum of their two best biased scores; chosen scores normalised, then scaled."""
    ids, weights = [], []
    for row in x.float():
        scores = torch.sigmoid(weight.float() @ row)
        biased = (scores + bias).tolist()
        size = len(biased) // n_group
        groups = [sorted(biased[g * size:(g + 1) * size], reverse=True) for g in range(n_group)]
        best_groups = sorted(range(n_group), key=lambda g: -(groups[g][0] + groups[g][1]))[:topk_group]
        allowed = [e for e in range(len(biased)) if e // size in best_groups]
        chosen = sorted(sorted(allowed, key=lambda e: -biased[e])[:top_k])
        w = scores[chosen]
        ids.append(chosen)
        weights.append((w / w.sum() * scale).tolist())
    return ids, weights


def test_router_matches_a_plain_reimplementation_of_the_llada2_gate(folders, llms):
    raw = load_file(folders["llada2_moe"] / "model.safetensors")
    x = torch.randn(200, 64)
    for block in llms["llada2_moe"].model.moe_blocks:
        pre = f"model.layers.{block.layer}.mlp.gate"
        expected_ids, expected_weights = reference_router(x, raw[f"{pre}.weight"], raw[f"{pre}.expert_bias"])
        weights, ids = block.gate(x)
        order = ids.sort(dim=-1)
        assert order.values.tolist() == expected_ids
        torch.testing.assert_close(weights.gather(1, order.indices), torch.tensor(expected_weights))
    # the bias matters: selection by unbiased scores would differ for some tokens
    plain_ids, _ = reference_router(x, raw["model.layers.1.mlp.gate.weight"], torch.zeros(16))
    assert plain_ids != reference_router(x, raw["model.layers.1.mlp.gate.weight"],
                                         raw["model.layers.1.mlp.gate.expert_bias"])[0]


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def swiglu(x, raw, pre):
    return F.silu(x @ raw[f"{pre}.gate_proj.weight"].T) * (x @ raw[f"{pre}.up_proj.weight"].T) @ \
        raw[f"{pre}.down_proj.weight"].T


def rotate(x, positions, dim, theta):
    """Rotary on the first `dim` features of x [heads, T, d] (rotate-half layout), the rest passed through."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions[:, None].float() * inv  # [T, dim / 2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rot, rest = x[..., :dim], x[..., dim:]
    half = torch.cat([-rot[..., dim // 2:], rot[..., :dim // 2]], -1)
    return torch.cat([rot * cos + half * sin, rest], -1)


def reference_llada2(raw, c, ids, block):
    """LLaDA2MoeModelLM's forward over a whole sequence with the block-diffusion mask (block-causal, blocks aligned
    to position 0), on the raw checkpoint tensors."""
    T, heads, kv, d = len(ids), c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps, pos = c["rms_norm_eps"], torch.arange(T)
    allowed = (pos[None, :] // block) <= (pos[:, None] // block)  # [T, T]
    x = raw["model.word_embeddings.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        h = rms(x, raw[f"{pre}.input_layernorm.weight"], eps)
        qkv = (h @ raw[f"{pre}.attention.query_key_value.weight"].T).view(T, heads + 2 * kv, d).transpose(0, 1)
        q, k, v = qkv[:heads], qkv[heads:heads + kv], qkv[heads + kv:]
        q = rms(q, raw[f"{pre}.attention.query_layernorm.weight"], eps)
        k = rms(k, raw[f"{pre}.attention.key_layernorm.weight"], eps)
        rot = int(d * c["partial_rotary_factor"])
        q, k = rotate(q, pos, rot, c["rope_theta"]), rotate(k, pos, rot, c["rope_theta"])
        k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
        scores = (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
        x = x + attn @ raw[f"{pre}.attention.dense.weight"].T
        h = rms(x, raw[f"{pre}.post_attention_layernorm.weight"], eps)
        x = x + (swiglu(h, raw, f"{pre}.mlp") if i < c["first_k_dense_replace"] else reference_moe(h, raw, pre, c))
    return rms(x, raw["model.norm.weight"], eps) @ raw["lm_head.weight"].T


def reference_moe(h, raw, pre, c):
    ids, weights = reference_router(h, raw[f"{pre}.mlp.gate.weight"], raw[f"{pre}.mlp.gate.expert_bias"],
                                    c["num_experts_per_tok"], c["n_group"], c["topk_group"],
                                    c["routed_scaling_factor"])
    out = torch.stack([sum(w * swiglu(row, raw, f"{pre}.mlp.experts.{e}") for e, w in zip(es, ws, strict=True))
                       for row, es, ws in zip(h, ids, weights, strict=True)])
    return out + swiglu(h, raw, f"{pre}.mlp.shared_experts")


def reference_llada(raw, c, ids):
    """LLaDAModelLM's forward (llama block, bidirectional attention) on the raw checkpoint tensors."""
    T, heads, d = len(ids), c["n_heads"], c["d_model"] // c["n_heads"]
    eps, pos = c["rms_norm_eps"], torch.arange(T)
    x = raw["model.transformer.wte.weight"][ids]
    for i in range(c["n_layers"]):
        pre = f"model.transformer.blocks.{i}"
        h = rms(x, raw[f"{pre}.attn_norm.weight"], eps)
        q, k, v = ((h @ raw[f"{pre}.{n}_proj.weight"].T).view(T, heads, d).transpose(0, 1) for n in "qkv")
        q, k = rotate(q, pos, d, c["rope_theta"]), rotate(k, pos, d, c["rope_theta"])
        attn = ((q @ k.transpose(1, 2) / math.sqrt(d)).softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
        x = x + attn @ raw[f"{pre}.attn_out.weight"].T
        h = rms(x, raw[f"{pre}.ff_norm.weight"], eps)
        x = x + (F.silu(h @ raw[f"{pre}.ff_proj.weight"].T) * (h @ raw[f"{pre}.up_proj.weight"].T)) @ \
            raw[f"{pre}.ff_out.weight"].T
    return rms(x, raw["model.transformer.ln_f.weight"], eps) @ raw["model.transformer.ff_out.weight"].T


def our_logits(llm, ids, block):
    with torch.inference_mode():
        batch = ForwardBatch(torch.arange(len(ids)), [SeqSlice(KVCache(len(ids)), 0, len(ids), 0)], attn_block=block)
        return llm.model.logits(llm.model(torch.tensor(ids), batch))


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_matches_a_plain_reimplementation_of_the_modeling_file(name, folders, llms):
    raw = load_file(folders[name] / "model.safetensors")
    config, _ = FAMILIES[name]
    ids = PROMPT + [159] * 13  # 24 positions: the prompt, then masks, as in a denoising step
    if name == "llada2_moe":
        expected, ours = reference_llada2(raw, config, ids, 8), our_logits(llms[name], ids, 8)
    else:
        expected, ours = reference_llada(raw, config, ids), our_logits(llms[name], ids, None)
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


def test_block_causal_attention_hides_later_blocks_and_shows_the_own_block(llms):
    """LLaDA2 (block 8): changing position 12 changes positions 8..15 but not 0..7; LLaDA sees everything.

    (Not bit-equal: an expert's GEMM over a different set of rows may round differently.)"""
    ids = PROMPT + [159] * 13
    changed = list(ids)
    changed[12] = 7
    before, after = our_logits(llms["llada2_moe"], ids, 8), our_logits(llms["llada2_moe"], changed, 8)
    torch.testing.assert_close(before[:8], after[:8], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[8:16], after[8:16], atol=1e-2)
    before, after = our_logits(llms["llada"], ids, None), our_logits(llms["llada"], changed, None)
    assert not torch.allclose(before[:8], after[:8])


def test_cached_block_rows_equal_the_full_block_causal_pass(llms):
    """Blocks 0-1 into the cache, then block 2 alone over it, equals the whole sequence in one pass."""
    model, ids = llms["llada2_moe"].model, torch.tensor(PROMPT + [159] * 13)
    cache = KVCache(24)
    with torch.inference_mode():
        model(ids[:16], ForwardBatch(torch.arange(16), [SeqSlice(cache, 0, 16, 0)], attn_block=8))
        tail = model(ids[16:], ForwardBatch(torch.arange(16, 24), [SeqSlice(cache, 0, 8, 16)], attn_block=8))
        whole = model(ids, ForwardBatch(torch.arange(24), [SeqSlice(KVCache(24), 0, 24, 0)], attn_block=8))
    torch.testing.assert_close(tail, whole[16:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_dense_mlp_with_biases_gives_a_row_among_any_odd_number_of_rows_what_it_gives_it_alone(monkeypatch, threads):
    """LLaDA with include_bias: gate | up and down with biases, the gate activated by kernels.silu. In the engine's
    batch-invariant mode each row's output is the one it gets alone (with F.silu, 2 threads and 349 rows it was not),
    and it is silu(gate) * up within rounding."""
    from tiermoe import kernels
    from tiermoe.models.layers import SwiGLU

    monkeypatch.setattr(kernels, "_invariant", True)
    torch.manual_seed(0)
    mlp = SwiGLU(64, 96, bias=True)  # the tiny LLaDA's widths
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.5)
    mlp.fuse_weights()
    x = torch.randn(401, 64)  # [T, H]: gate rows past torch's parallel grain, split between threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            alone = [mlp(x[i:i + 1])[0] for i in range(401)]
            for n in (3, 47, *range(343, 402, 2)):  # past 343 rows threads split the gates inside a row
                many = mlp(x[:n])  # [n, H]
                assert all(torch.equal(many[i], alone[i]) for i in range(n)), n
    finally:
        torch.set_num_threads(before)
    w = mlp.gate_up_proj.weight.double()
    gate, up = (x.double() @ w.T + mlp.gate_up_proj.bias.double()).chunk(2, dim=-1)
    expected = (F.silu(gate) * up) @ mlp.down_proj.weight.double().T + mlp.down_proj.bias.double()
    torch.testing.assert_close(torch.stack(alone).double(), expected, rtol=1e-4, atol=1e-4)
