"""Recording routing traces in the shared format, and replaying them."""

import numpy as np
import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.errors import ConfigError
from tiermoe.sim.trace import Trace

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [5, 9], [44, 45, 46]]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def recorded(tiny_models, tmp_path_factory):
    llm = LLM(tiny_models("qwen2_moe"))
    path = tmp_path_factory.mktemp("trace") / "run"
    outputs = llm.generate(PROMPTS, GREEDY, record_trace=path)
    return llm, outputs, Trace.load(path)


def test_recorded_trace_has_the_shared_layout(recorded):
    llm, outputs, trace = recorded
    moe_layers = len(llm.model.moe_blocks)  # qwen2_moe tiny config has a dense layer 1
    # every prompt token, and every generated token but the last (never fed back), went through the model
    rows = [len(p) + len(o.outputs[0].token_ids) - 1 for p, o in zip(PROMPTS, outputs, strict=True)]
    assert trace.experts.shape == (sum(rows), moe_layers, llm.model.shape.top_k)
    assert trace.experts.dtype == np.int16 and trace.weights.dtype == np.float16
    assert trace.seq_starts.tolist() == [0, rows[0], rows[0] + rows[1]]
    assert trace.is_prefill.sum() == sum(len(p) for p in PROMPTS)
    first = trace.token_ids[: rows[0]].tolist()
    assert first == PROMPTS[0] + outputs[0].outputs[0].token_ids[:-1]
    assert trace.positions[: rows[0]].tolist() == list(range(rows[0]))
    assert trace.meta["num_experts"] == 8 and trace.meta["model_type"] == "qwen2_moe"
    assert ((trace.experts >= 0) & (trace.experts < 8)).all()


def test_replaying_a_recorded_trace_reproduces_the_run(recorded, tmp_path):
    llm, outputs, trace = recorded
    trace.save(tmp_path / "again")  # a save/load round trip on the way
    replayed = llm.replay(tmp_path / "again", use_tqdm=False)
    assert [o.outputs[0].token_ids for o in replayed] == [o.outputs[0].token_ids for o in outputs]
    assert replayed[0].stats["routing"].startswith("replayed from")


def test_replay_forces_the_traced_experts(tiny_models, recorded, tmp_path):
    _, _, trace = recorded
    k = trace.top_k
    experts = np.broadcast_to(np.arange(k, dtype=np.int16), trace.experts.shape).copy()  # always experts 0..k-1
    Trace(experts, trace.weights, trace.seq_starts, trace.is_prefill, trace.positions, trace.token_ids,
          dict(trace.meta)).save(tmp_path / "forced")
    fresh = LLM(tiny_models("qwen2_moe"))
    fresh.replay(tmp_path / "forced", sequences=[1], use_tqdm=False)
    assert fresh.store.resident and {e for _, e in fresh.store.resident} == set(range(k))


def test_replay_refuses_a_trace_of_another_shape(tiny_models, recorded, tmp_path):
    _, _, trace = recorded
    other = LLM(tiny_models("mixtral"))
    trace.save(tmp_path / "t")
    with pytest.raises(ConfigError, match=r"trace has 2 MoE layers x top-2; the model has 3 x top-2"):
        other.replay(tmp_path / "t")
