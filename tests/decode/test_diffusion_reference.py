"""The diffusion decoders against plain re-implementations of the public generate() loops, step by step.

LLaDA2: `LLaDA2MoeModelLM.generate` of inclusionAI/LLaDA2.0-mini's modeling_llada2_moe.py. LLaDA: `generate` of
ML-GSAI/LLaDA's generate.py (low-confidence remasking, no classifier-free guidance). The loops below recompute the
whole sequence at every step with the engine's model, whose forward tests/models/test_llada.py checks against the
modeling files; what is compared here is the decoding: the (position, token) pairs committed at each step, the
number of forwards (NFE) and the final tokens.

Two deliberate differences are kept in these loops as in the engine: temperature 0 takes the argmax (LLaDA2's
reference samples from the softmax even then, a known bug), and the mask token is never predicted (a random tiny
model might predict it; a trained one does not).
"""

import pytest
import torch

from tests.tiny_diffusion_models import MASK_ID
from tiermoe import SamplingParams
from tiermoe.decode import diffusion
from tiermoe.decode.diffusion import Canvas, DiffusionOptions
from tiermoe.decode.kv_cache import KVCache
from tiermoe.models.layers import ForwardBatch, SeqSlice

MID = [3, 17, 42, 9, 77]  # ends in the middle of an 8-block
EDGE = [12, 99, 31, 7, 54, 23, 70, 2]  # ends on an 8-block boundary


def full_logits(llm, ids: torch.Tensor, block: int | None) -> torch.Tensor:
    """The model over the whole sequence (block-causal attention when `block`), no cache: [L, V] fp32."""
    with torch.inference_mode():
        n = ids.shape[0]
        batch = ForwardBatch(torch.arange(n), [SeqSlice(KVCache(n), 0, n, 0)], attn_block=block)
        logits = llm.model.logits(llm.model(ids, batch))
    return logits.index_fill(1, torch.tensor([MASK_ID]), float("-inf"))


def spread(n: int, steps: int) -> list[int]:
    """Both references' get_num_transfer_tokens: n split over steps, the remainder to the first steps."""
    return [n // steps + (i < n % steps) for i in range(steps)]


def committed(chosen: torch.Tensor, offset: int, tokens: torch.Tensor) -> set[tuple[int, int]]:
    return {(offset + i, int(tokens[i])) for i in chosen.nonzero().squeeze(1).tolist()}


def llada2_reference(llm, prompt, gen_length, block_length, steps, threshold, minimal_topk=1):
    """generate() of modeling_llada2_moe.py at temperature 0 -> (generated tokens, committed pairs per forward)."""
    steps = min(steps, gen_length // minimal_topk)
    num_blocks = -(-(len(prompt) + gen_length) // block_length)
    x = torch.full((num_blocks * block_length,), MASK_ID)
    x[: len(prompt)] = torch.tensor(prompt)
    schedule, log = spread(block_length, steps), []
    for block in range(len(prompt) // block_length, num_blocks):
        lo, hi = block * block_length, (block + 1) * block_length
        for step in range(steps):
            active = x[lo:hi] == MASK_ID  # [B]
            if not active.any():
                break
            confidence, tokens = full_logits(llm, x[:hi], block_length)[lo:hi].softmax(-1).max(-1)  # [B], [B]
            confidence = torch.where(active, confidence, float("-inf"))
            chosen = confidence > threshold
            if chosen.sum() < schedule[step]:
                chosen = torch.zeros_like(active)
                chosen[torch.topk(confidence, min(schedule[step], int(active.sum()))).indices] = True
            x[lo:hi][chosen] = tokens[chosen]
            log.append(committed(chosen, lo, tokens))
    return x[len(prompt): len(prompt) + gen_length].tolist(), log


def llada_reference(llm, prompt, gen_length, block_length, steps):
    """generate() of LLaDA's generate.py at temperature 0, low-confidence remasking -> (tokens, pairs per forward)."""
    assert gen_length % block_length == 0  # as the reference requires
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    x = torch.tensor(prompt + [MASK_ID] * gen_length)
    log = []
    for block in range(num_blocks):
        lo, hi = len(prompt) + block * block_length, len(prompt) + (block + 1) * block_length
        for k in spread(int((x[lo:hi] == MASK_ID).sum()), steps // num_blocks):
            masked = x == MASK_ID  # [L]
            confidence, tokens = full_logits(llm, x, None).double().softmax(-1).max(-1)  # [L], [L]
            confidence[hi:] = float("-inf")
            confidence = torch.where(masked, confidence, float("-inf"))
            chosen = torch.zeros_like(masked)
            chosen[torch.topk(confidence, k).indices] = True
            x[chosen] = tokens[chosen]
            log.append(committed(chosen, 0, tokens))
    return x[len(prompt):].tolist(), log


def engine(llm, prompt, monkeypatch, **params):
    """The engine's (tokens, committed pairs per step, diffusion stats) for one request, K/V cache on."""
    log = []
    original = Canvas.commit

    def spy(self, positions, tokens):
        log.append({(int(p), int(t)) for p, t in zip(positions, tokens, strict=True)})
        original(self, positions, tokens)

    monkeypatch.setattr(Canvas, "commit", spy)
    seq = llm._make_sequence(prompt, SamplingParams(temperature=0, ignore_eos=True, **params))
    stats = diffusion.generate(llm.model, [seq], llm.tokenizer, llm.diffusion, DiffusionOptions())
    return seq.output_ids, log, stats[seq.request_id]


@pytest.mark.parametrize("threshold", [0.95, 0.3])
@pytest.mark.parametrize("steps", [4, 8, 12], ids=["fewer-steps", "steps=block", "more-steps"])
@pytest.mark.parametrize("prompt, max_tokens", [(MID, 16), (MID, 13), (MID, 11), (EDGE, 16), (EDGE, 13)],
                         ids=["mid-x16", "mid-x13", "mid-to-edge", "edge-x16", "edge-x13"])
def test_llada2_commits_what_the_reference_commits_at_every_step(llada2, monkeypatch, prompt, max_tokens, steps,
                                                                    threshold):
    expected, expected_log = llada2_reference(llada2, prompt, max_tokens, 8, steps, threshold)
    tokens, log, stats = engine(llada2, prompt, monkeypatch, max_tokens=max_tokens, block_length=8, steps=steps,
                                threshold=threshold)
    assert log == expected_log
    assert stats["nfe"] == len(expected_log) and tokens == expected


@pytest.mark.parametrize("min_commit", [2, 3])
def test_llada2_min_commit_only_caps_the_steps_as_minimal_topk_does(llada2, monkeypatch, min_commit):
    """minimal_topk caps steps at gen_length // minimal_topk; it is no floor on the tokens committed per step."""
    expected, expected_log = llada2_reference(llada2, MID, 16, 8, 8, 0.95, min_commit)
    tokens, log, stats = engine(llada2, MID, monkeypatch, max_tokens=16, block_length=8, steps=8,
                                min_commit=min_commit)
    assert log == expected_log and tokens == expected
    assert min(len(step) for step in log) == 1  # the schedule's single commits are kept
    capped = llada2_reference(llada2, MID, 4, 8, 8, 0.95, min_commit)[1]
    _, log, stats = engine(llada2, MID, monkeypatch, max_tokens=4, block_length=8, steps=8, min_commit=min_commit)
    assert log == capped and stats["nfe"] <= stats["blocks"] * (4 // min_commit)  # 4 // min_commit steps per block


def test_llada2_denoises_the_whole_last_block_as_the_reference(llada2, monkeypatch):
    """32 tokens after a 2-token prompt span two 32-blocks (blocks start at position 0): the reference denoises all
    62 open positions, one per step when nothing crosses the threshold, though only 32 are returned."""
    prompt = [3, 17]
    expected, expected_log = llada2_reference(llada2, prompt, 32, 32, 32, 1.0)
    tokens, log, stats = engine(llada2, prompt, monkeypatch, max_tokens=32, block_length=32, steps=32, threshold=1.0)
    assert log == expected_log and tokens == expected
    assert stats["nfe"] == len(expected_log) == 30 + 32 and stats["committed"] == 62 and stats["blocks"] == 2
    # prompt + max_tokens = 32: one block, in 28 steps (steps capped at 30 spread 32 commits as 2, 2, 1, 1, ...)
    expected_log = llada2_reference(llada2, prompt, 30, 32, 32, 1.0)[1]
    _, log, stats = engine(llada2, prompt, monkeypatch, max_tokens=30, block_length=32, steps=32, threshold=1.0)
    assert log == expected_log and stats["nfe"] == len(expected_log) == 28 and stats["blocks"] == 1


@pytest.mark.parametrize("max_tokens, block_length, steps", [(16, 8, 4), (16, 8, 16), (16, 8, 32), (24, 8, 6),
                                                             (8, 8, 8)],
                         ids=["fewer-steps", "steps=block", "more-steps", "three-blocks", "one-block"])
@pytest.mark.parametrize("prompt", [MID, EDGE], ids=["mid", "edge"])
def test_llada_commits_what_the_reference_commits_at_every_step(llada, monkeypatch, prompt, max_tokens, block_length,
                                                                steps):
    """Steps past the block's positions commit nothing in the reference (which still runs the model); the engine
    skips them, so only their forwards are missing."""
    expected, expected_log = llada_reference(llada, prompt, max_tokens, block_length, steps)
    tokens, log, stats = engine(llada, prompt, monkeypatch, max_tokens=max_tokens, block_length=block_length,
                                steps=steps)
    assert log == [step for step in expected_log if step] and tokens == expected
    assert stats["nfe"] == sum(1 for step in expected_log if step)
    assert len(expected_log) == steps and stats["nfe"] == min(steps, max_tokens)


def test_llada_block_longer_than_the_generation_is_the_generation(llada, monkeypatch):
    """max_tokens not a multiple of block_length (the reference asserts it is): one block of 13 equals the reference
    with block_length = gen_length = 13."""
    expected, expected_log = llada_reference(llada, MID, 13, 13, 5)
    tokens, log, stats = engine(llada, MID, monkeypatch, max_tokens=13, block_length=32, steps=5)
    assert log == expected_log and tokens == expected and stats["nfe"] == 5
