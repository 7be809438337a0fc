"""Expert-set stability measures on hand-made steps, and the routing log fed by a real diffusion decode."""

import math

import pytest

from tests.decode.test_diffusion import LONG
from tiermoe import LLM, SamplingParams
from tiermoe.decode import diffusion
from tiermoe.decode.diffusion import DiffusionOptions
from tiermoe.offload.placement.refresh import DenoiseStep
from tiermoe.offload.placement.routing_log import RecordingStore, RoutingLog
from tiermoe.offload.placement.stability import cosine, jaccard, layer_stability, overall, top_overlap


def test_similarities_by_hand():
    a, b = {1: 3, 2: 1}, {1: 3, 3: 1}
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert cosine(a, b) == pytest.approx(9 / 10)
    assert top_overlap(a, b, 1) == 1.0 and top_overlap(a, b, 2) == 0.5
    assert jaccard({}, {}) == cosine({}, {}) == top_overlap({}, {}, 2) == 1.0


def test_layer_stability_pairs_steps_within_blocks_only():
    block1 = [{0: {1: 2}}, {0: {1: 2}}, {0: {2: 2}}]
    block2 = [{0: {5: 1}, 3: {1: 1}}, {0: {5: 1}, 3: {1: 1}}]
    per_layer = layer_stability([block1, block2])
    assert per_layer[0].pairs == 3 and per_layer[0].jaccard == pytest.approx(2 / 3)  # 1, 0 | 1
    assert per_layer[3].cosine == 1.0 and per_layer[3].pairs == 1
    assert layer_stability([block1], lag=2)[0].jaccard == 0.0
    assert layer_stability([block1], skip_first=True)[0].jaccard == 0.0  # only (step 1, step 2) is left
    assert overall(per_layer).jaccard == pytest.approx((2 / 3 * 3 + 1) / 4)


def test_routing_log_groups_steps_into_blocks():
    log = RoutingLog(keep=1)
    log.add(0, [1], [1])  # before any step: ignored
    for block, steps in enumerate([2, 3]):
        for s in range(steps):
            log.begin_step(DenoiseStep(block, s, True))
            log.add(2, [1, 4], [3, 1])
            log.add(2, [4], [1])  # a second call in the same step adds up
    assert log.blocks == [[{2: {1: 3, 4: 2}}] * 3]


def test_recording_store_sees_every_routed_token(folders):
    llm = LLM(folders["llada2_moe"])
    recorder = RecordingStore(llm.store)
    for block in llm.model.moe_blocks:
        block.store = recorder
    params = SamplingParams(temperature=0, max_tokens=16, block_length=8, steps=8, threshold=0.95)
    seq = llm._make_sequence(LONG, params)
    stats = diffusion.generate(llm.model, [seq], llm.tokenizer, llm.diffusion, DiffusionOptions(tau=1),
                               store=recorder)[seq.request_id]
    steps = [s for block in recorder.log.blocks for s in block]
    assert len(steps) == stats["nfe"] == stats["refresh_steps"]
    rows = stats["forward_rows"]
    top_k = llm.model.shape.top_k
    assert sum(sum(c.values()) for s in steps for c in s.values()) == rows * top_k * len(llm.model.moe_blocks)
    per_layer = layer_stability(recorder.log.blocks, skip_first=True)
    assert set(per_layer) == {b.layer for b in llm.model.moe_blocks}
    assert all(0 <= s.jaccard <= 1 and 0 <= s.cosine <= 1 + 1e-9 and not math.isnan(s.top_overlap)
               for s in per_layer.values())
