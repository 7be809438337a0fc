"""Trace files: round trip, the shared traces, sequence splits and the recorder."""

import json
from pathlib import Path

import numpy as np
import pytest

from tiermoe.sim.trace import Trace, TraceRecorder

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"
SHARED_NAMES = ["olmoe-1b-7b-0924_decode_wikitext-mbpp", "qwen3-30b-a3b-q4km-top6_prefill-decode_bigmoeonedge",
                "gpt-oss-120b-q4km-top2_prefill-decode_bigmoeonedge"]


def small_trace() -> Trace:
    rng = np.random.default_rng(0)
    t, layers, k = 10, 3, 2
    experts = np.stack([rng.permutation(8)[:k] for _ in range(t * layers)]).reshape(t, layers, k)
    experts[1, 2] = -1  # a layer not computed for a prefill token
    return Trace(experts, rng.random((t, layers, k)), [0, 4, 7], [True, True, False, False, True, False, False,
                                                                   False, False, False],
                 np.arange(10), np.arange(100, 110), {"model": "tiny", "num_experts": 8},
                 {"seq_domain": np.array([0, 1, 1], np.int8)})


def assert_same(a: Trace, b: Trace) -> None:
    for name in ("experts", "weights", "seq_starts", "is_prefill", "positions", "token_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.extras.keys() == b.extras.keys()
    assert all(np.array_equal(a.extras[k], b.extras[k]) for k in a.extras)


def test_round_trip(tmp_path):
    trace = small_trace()
    npz, sidecar = trace.save(tmp_path / "tiny", {"source": "test"})
    assert npz.name == "tiny.npz" and sidecar.name == "tiny.json"
    back = Trace.load(tmp_path / "tiny.npz")
    assert_same(trace, back)
    meta = json.loads(sidecar.read_text())
    assert meta["model"] == "tiny" and meta["source"] == "test"
    assert (meta["num_layers"], meta["num_experts"], meta["top_k"], meta["num_tokens"]) == (3, 8, 2, 10)
    assert meta["arrays"]["experts"] == {"dtype": "int16", "shape": [10, 3, 2]}
    assert back.name == "tiny"


def test_num_experts_falls_back_to_largest_id():
    trace = small_trace()
    trace.meta.pop("num_experts")
    assert trace.num_experts == int(trace.experts.max()) + 1


def test_decode_rows_and_layer_requests_skip_uncomputed_entries():
    trace = small_trace()
    assert trace.decode_rows().tolist() == [2, 3, 5, 6, 7, 8, 9]
    requests = trace.layer_requests(2)
    assert requests[1] == [] and all(len(r) == 2 for i, r in enumerate(requests) if i != 1)


def test_split_by_sequences():
    trace = small_trace()
    first, rest = trace.split_by_sequences(0.34)  # round(0.34 * 3) = 1 sequence
    assert first.num_tokens == 4 and rest.num_tokens == 6 and rest.seq_starts.tolist() == [0, 3]
    assert rest.extras["seq_domain"].tolist() == [1, 1]
    picked, others = trace.split_by_sequences([2, 0])
    assert picked.seq_starts.tolist() == [0, 3] and picked.positions.tolist() == [7, 8, 9, 0, 1, 2, 3]
    assert others.positions.tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="out of range"):
        trace.split_by_sequences([3])


def test_recorder_writes_the_shared_layout(tmp_path):
    torch = pytest.importorskip("torch")
    rec = TraceRecorder()
    rows = []
    for seq in range(2):
        rec.begin_sequence()
        for pos in range(3):
            experts = torch.tensor([[seq, pos], [pos + 1, 7]])
            weights = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.bfloat16)
            rec.record(experts, weights, is_prefill=pos < 2, position=pos, token_id=10 * seq + pos)
            rows.append(experts.numpy())
    saved = rec.save(tmp_path / "rec", {"model": "tiny", "num_experts": 8})
    back = Trace.load(tmp_path / "rec.json")
    assert_same(saved, back)
    assert back.seq_starts.tolist() == [0, 3]
    assert np.array_equal(back.experts, np.stack(rows).astype(np.int16))
    assert back.weights[0, 0].tolist() == [0.75, 0.25]
    assert back.is_prefill.tolist() == [True, True, False] * 2
    assert back.token_ids.tolist() == [0, 1, 2, 10, 11, 12]
    assert back.meta["num_experts"] == 8


def test_recorder_rejects_ragged_rows():
    rec = TraceRecorder()
    rec.record(np.zeros((2, 2)), np.zeros((2, 2)), False, 0)
    with pytest.raises(ValueError, match="differs"):
        rec.record(np.zeros((3, 2)), np.zeros((3, 2)), False, 1)


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_reads_the_shared_traces(name, tmp_path):
    path = SHARED / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    trace = Trace.load(path)
    meta = json.loads((SHARED / f"{name}.json").read_text())
    assert trace.experts.shape == (meta["num_tokens"], meta["num_layers"], meta["top_k"])
    assert trace.num_experts == meta["num_experts"] and trace.num_sequences == meta["num_sequences"]
    assert trace.experts.max() < trace.num_experts
    if trace.num_tokens < 1000:  # the big one round-trips the same code path, only slower
        trace.save(tmp_path / name)
        assert_same(trace, Trace.load(tmp_path / name))
