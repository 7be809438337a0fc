"""The learned eviction policy: features and targets by hand, a hand-set MLP, training on a learnable trace, budget."""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermoe.offload.policies import POLICIES, LRUPolicy, make_policy
from tiermoe.offload.policies.learned import (
    DEFAULT_FEATURES,
    FEATURES,
    MLP,
    SHIPPED_WEIGHTS,
    LearnedConfig,
    LearnedPolicy,
    LearnedWeights,
)
from tiermoe.offload.policies.learned_features import LayerHistory, ReusePredictor
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.offload.tools.learned_train import TrainConfig, mine_layer, next_use_distance, train
from tiermoe.sim.cache_sim import Capacity, simulate
from tiermoe.sim.trace import Trace

REQUESTS = [[0, 1], [2, 0], [1, 3], [0, 2]]  # one layer, top-2, experts 0..3


def history_after(requests, config):
    h = LayerHistory(config)
    for step, experts in enumerate(requests):
        for e in experts:
            h.access(e, step)
    return h


def test_features_by_hand():
    # After the 4th request (clock 3), with a window of 3 requests (clocks 1..3):
    #   expert:            0      1      2      3
    #   last use (clock):  3      2      3      2
    #   uses before last:  1      0      1      -
    #   uses in window:    2      1      2      1     (max 2)
    #   uses ever:         3      2      2      1     (max 3)
    #   rank at last use:  0      0      1      1     (top-2: rank / 1)
    config = LearnedConfig(features=("recency", "frequency", "rank", "interval", "frequency_all"), window=3)
    x = history_after(REQUESTS, config).features(np.array([1, 3]))
    expected = [[1 / 2, 1 / 2, 0, 1 / 3, 2 / 3],
                [1 / 2, 1 / 2, 1, 0, 1 / 3]]
    np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_next_use_targets_by_hand():
    # Next request of each expert after t, minus t, clamped to 2 ("never" clamps too).
    d = next_use_distance(REQUESTS, horizon=2)
    assert d.tolist() == [[1, 2, 1, 2],
                          [2, 1, 2, 1],
                          [1, 2, 1, 2],
                          [2, 2, 2, 2]]


def test_mined_rows_are_candidates_with_scaled_targets():
    # Candidates: experts seen before and not in the request. t=0: none; t=1: 1; t=2: 0, 2; t=3: 1, 3.
    config = LearnedConfig(features=("recency",), horizon=2)
    rows = mine_layer(REQUESTS, config, rows=1000, rng=np.random.default_rng(0))
    np.testing.assert_allclose(rows.y, [1 / 2, 1 / 2, 1 / 2, 1, 1])
    np.testing.assert_allclose(rows.x[:, 0], [1 / 2, 1 / 2, 1 / 2, 1 / 2, 1 / 2])


def test_scale_free_features_by_hand():
    # After the 4th request, experts 0 and 2 (clock 3) were used since 1 and 3 (clock 2): stack depth 2 of 4 seen
    # experts, / (4 - 1). `reuse_rank` is the share of the other seen experts with a lower reuse prediction.
    h = history_after(REQUESTS, LearnedConfig(features=("stack", "reuse", "reuse_rank")))
    x = h.features(np.array([0, 1, 2, 3]))
    np.testing.assert_allclose(x[:, 0], [0, 2 / 3, 0, 2 / 3], rtol=1e-6)
    p = x[:, 1]
    np.testing.assert_allclose(x[:, 2], [(p < v).sum() / 3 for v in p], rtol=1e-6)


def test_prefill_warms_the_mined_history_without_rows():
    # Request 1 is a prefill token: it is in the history (recency of 0 and 2 counts it) but gives no rows.
    config = LearnedConfig(features=("recency",), horizon=2)
    rows = mine_layer(REQUESTS, config, rows=1000, rng=np.random.default_rng(0), mined=[True, False, True, True])
    np.testing.assert_allclose(rows.y, [1 / 2, 1 / 2, 1, 1])
    np.testing.assert_allclose(rows.x[:, 0], [1 / 2, 1 / 2, 1 / 2, 1 / 2])


def test_reuse_predictor_one_adagrad_step_by_hand():
    p = ReusePredictor(horizon=1, history=1, lr=0.1, size=3)
    p.observe(np.array([0]))
    np.testing.assert_allclose(p.p, [0.5, 0.5, 0.5])  # nothing learned yet
    p.observe(np.array([1]))
    # Trained on input {0} -> label {1}: gradient p - y = (0.5, -0.5, 0.5); AdaGrad's first step is lr * sign.
    np.testing.assert_allclose(p.weight[0], [-0.1, 0.1, -0.1], atol=1e-6)
    np.testing.assert_allclose(p.bias, [-0.1, 0.1, -0.1], atol=1e-6)
    # Prediction from input {1}: its weight row is untouched, so only the bias speaks.
    np.testing.assert_allclose(p.p, 1 / (1 + np.exp([0.1, -0.1, 0.1])), atol=1e-6)


def test_reuse_predictor_grows_without_forgetting():
    p = ReusePredictor(horizon=1, history=2, lr=0.1, size=3)
    for used in ([0], [1], [0, 2], [1]):
        p.observe(np.array(used))
    before = p.p.copy()
    p.grow(5)
    np.testing.assert_allclose(p.p[:3], before)
    np.testing.assert_allclose(p.p[3:], 0.5)
    p.observe(np.array([4]))  # a new slot takes part at once
    assert p.p.shape == (5,)


def one_minus_recency_mlp(hidden=4) -> MLP:
    """An MLP set by hand to output 1 - recency (feature 0): the oldest candidate scores highest."""
    w1 = np.zeros((1, hidden), np.float32)
    w1[0, 0] = -1
    b1 = np.zeros(hidden, np.float32)
    b1[0] = 1
    w3 = np.zeros(hidden, np.float32)
    w3[0] = 1
    return MLP(w1, b1, np.eye(hidden, dtype=np.float32), np.zeros(hidden, np.float32), w3, np.zeros(1, np.float32))


def lru_like_weights(num_layers=2) -> LearnedWeights:
    mlp = one_minus_recency_mlp()
    return LearnedWeights(LearnedConfig(features=("recency",)), [mlp] * num_layers, mlp)


@settings(max_examples=40, deadline=None)
@given(requests=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True), min_size=1, max_size=50),
       extra=st.integers(0, 4))
def test_hand_set_mlp_scoring_age_is_lru(requests, extra):
    capacity = max(map(len, requests)) + extra
    caches = [ExpertCache(capacity, LearnedPolicy(lru_like_weights(), layer=0)), ExpertCache(capacity, LRUPolicy())]
    for step, keys in enumerate(requests):
        learned, lru = (c.request(keys, step) for c in caches)
        assert learned == lru


def test_live_store_keys_pick_the_layers_mlp():
    weights = lru_like_weights(num_layers=2)
    weights.layers = [one_minus_recency_mlp(), one_minus_recency_mlp()]
    weights.layers[1] = dataclasses.replace(weights.layers[1], w3=-weights.layers[1].w3)  # evicts the most recent
    policy = LearnedPolicy(weights, num_layers=2)
    cache = ExpertCache(4, policy)
    for step, keys in enumerate([[(0, 0)], [(0, 1)], [(1, 0)], [(1, 1)]]):
        cache.request(keys, step)
    # Layer 0's candidates score 1 - recency >= 0, layer 1's -(1 - recency) <= 0: a layer-0 key goes, the older one.
    assert cache.request([(1, 2)], 4).evicted == [(0, 0)]
    assert weights.mlp_for(1, 2) is weights.layers[1]
    assert weights.mlp_for(1, 3) is weights.pooled  # another model's layer count: the pooled MLP
    assert weights.mlp_for(1, None) is weights.pooled


def periodic_trace(cycles: int, phase: int = 0) -> Trace:
    """One layer, top-2: pairs (0,1), (2,3), (4,5) in turn. With 4 slots LRU always evicts the pair needed next."""
    pairs = [[0, 1], [2, 3], [4, 5]]
    rows = [pairs[(t + phase) % 3] for t in range(3 * cycles)]
    experts = np.array(rows, np.int16)[:, None, :]
    n = len(rows)
    return Trace(experts, np.zeros(experts.shape, np.float16), np.array([0]), np.zeros(n, bool), np.arange(n),
                 meta={"num_experts": 6})


def test_trained_mlp_beats_lru_on_periodic_reuse():
    config = TrainConfig(LearnedConfig(features=("recency", "frequency"), horizon=4), rows_per_layer=2000, epochs=50)
    weights = train([periodic_trace(60)], config)
    result = simulate(periodic_trace(40, phase=1), ["lru", "learned", "belady"], [Capacity(items=4)],
                      policy_args={"learned": {"weights": weights}})
    lru, learned, belady = (result.run(p, "4").mean for p in ("lru", "learned", "belady"))
    assert lru == 0.0  # the cyclic pattern defeats LRU
    assert learned >= 0.9 * belady > 0.2


def test_save_load_round_trip(tmp_path):
    weights = lru_like_weights()
    weights.info = {"traces": ["x"]}
    path = weights.save(tmp_path / "w.safetensors")
    loaded = LearnedWeights.load(path)
    assert loaded.config == weights.config and loaded.info == weights.info and len(loaded.layers) == 2
    x = np.random.default_rng(0).random((5, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.pooled(x), weights.pooled(x))


def test_make_policy_loads_the_shipped_weights():
    assert POLICIES["learned"] is LearnedPolicy
    policy = make_policy("learned")
    assert isinstance(policy, LearnedPolicy) and SHIPPED_WEIGHTS.exists()
    assert policy.weights.config.features and all(f in FEATURES for f in policy.weights.config.features)
    assert 1000 < policy.weights.num_params < 100_000
    info = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    assert info["heldout"] and info["split"]["train_sequences"]
    for step, keys in enumerate([[0, 1], [2, 3], [0, 4]]):
        for k in keys:
            policy.on_access(k, step)
    assert np.isfinite(policy.predict([1, 2, 3])).all()


def test_defaults_are_the_shipped_policy():
    # `policy train` with its defaults trains what ships (the choice bench/policy_heldout.py made on validation).
    shipped = LearnedWeights.load(SHIPPED_WEIGHTS)
    info = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    assert shipped.config == LearnedConfig() and not shipped.layers
    assert info["train"] == {**TrainConfig().to_dict(), "seed": info["split"]["seed"]}


def test_unknown_feature_is_refused():
    with pytest.raises(ValueError, match="unknown learned-policy features"):
        LearnedConfig(features=("recency", "astrology"))


keys_strategy = st.tuples(st.integers(0, 2), st.integers(0, 7))


@settings(max_examples=40, deadline=None)
@given(requests=st.lists(st.lists(keys_strategy, min_size=1, max_size=3, unique=True), min_size=1, max_size=40),
       extra=st.integers(0, 5), bare=st.booleans())
def test_budget_invariant(requests, extra, bare):
    if bare:  # the simulator's keys: one layer, bare expert ids
        requests = [list(dict.fromkeys(e for _, e in r)) for r in requests]
    capacity = max(len(r) for r in requests) + extra
    cache = ExpertCache(capacity, LearnedPolicy(layer=0 if bare else None, num_layers=3))
    for step, keys in enumerate(requests):
        _, _, evicted = cache.request(keys, step)
        assert not set(evicted) & set(keys)
        assert cache.used <= capacity and all(k in cache for k in keys)
        _, admitted, _ = cache.propose(step, keys)
        assert not admitted  # the learned policy proposes nothing


def test_policy_train_command_writes_weights_and_heldout_report(tmp_path):
    from tiermoe.cli import build_parser
    from tiermoe.offload.tools import policy_cli

    trace = periodic_trace(40)
    trace.seq_starts = np.array([0, 60])  # two prompts: one trains, the other is held out
    npz, _ = trace.save(tmp_path / "periodic")
    out = tmp_path / "w.safetensors"
    args = ["train", "--trace", str(npz), "--out", str(out), "--rows-per-layer", "500", "--epochs", "2",
            "--capacity", "4"]
    assert policy_cli.main(args) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["traces"] == ["periodic"] and len(info["split"]["train_sequences"]["periodic"]) == 1
    (heldout,) = info["heldout"]
    assert heldout["sequences"] == 1 and set(heldout["capacities"]["4"]["hit_rate"]) == {"lru", "lfu", "learned",
                                                                                          "belady"}
    assert LearnedWeights.load(out).config.features == DEFAULT_FEATURES
    assert info["command"].startswith("tiermoe policy train --trace periodic.npz --split 0.5 --seed 0 ")
    assert "--horizon=8" in info["command"] and str(tmp_path) not in info["command"]
    parsed = build_parser().parse_args(["policy", *args])  # registered on the main CLI
    assert parsed.func is policy_cli.run_train


class ScoreEveryCandidate(LearnedPolicy):
    """The learned rule stated directly: every candidate scored alone (its own MLP call) at every eviction."""

    def victim(self, candidates, step):
        return max(candidates, key=lambda k: (float(self.predict([k])[0]), -self._last[k]))


def random_weights(features: tuple[str, ...], hidden: int = 8) -> LearnedWeights:
    """A random pooled MLP over `features`: scores unlike any trained one's, to check ranking against."""
    rng = np.random.default_rng(0)
    shapes = [(len(features), hidden), (hidden,), (hidden, hidden), (hidden,), (hidden,), (1,)]
    return LearnedWeights(LearnedConfig(features=features), [], MLP(*(rng.standard_normal(s).astype(np.float32)
                                                                      for s in shapes)))


# the shipped weights, and a layer-wide feature (`stack`: a prefetch moves every slot's) beside per-slot ones
WEIGHTS = [None, random_weights(("recency", "frequency", "reuse", "stack"))]


@settings(max_examples=40, deadline=None)
@given(requests=st.lists(st.lists(keys_strategy, min_size=1, max_size=4, unique=True), min_size=1, max_size=60),
       extra=st.integers(0, 6), prefetch=st.lists(keys_strategy, max_size=60), which=st.sampled_from([0, 1]))
def test_ranked_victims_match_scoring_every_candidate(requests, extra, prefetch, which):
    # A real MLP (the reuse predictor and all), one cache over three layers as the live store keeps it, with keys
    # brought in without an access (prefetch) between requests.
    capacity = max(map(len, requests)) + extra
    weights = WEIGHTS[which] if WEIGHTS[which] is not None else LearnedWeights.load(SHIPPED_WEIGHTS)
    caches = [ExpertCache(capacity, cls(weights, num_layers=3)) for cls in (LearnedPolicy, ScoreEveryCandidate)]
    for step, keys in enumerate(requests):
        ranked, direct = (c.request(keys, step) for c in caches)
        assert ranked == direct
        if step < len(prefetch):
            assert caches[0].admit([prefetch[step]], step, keys) == caches[1].admit([prefetch[step]], step, keys)


def test_mlp_scores_a_row_alike_in_any_batch():
    # Float32 BLAS rounds a row by its batch's size and its place in it; the policy scores a layer's experts
    # together and must rank them as if each were scored alone, and equal rows must tie.
    mlp = LearnedWeights.load(SHIPPED_WEIGHTS).pooled
    x = np.random.default_rng(0).random((257, len(DEFAULT_FEATURES))).astype(np.float32)
    x[200:] = x[0]
    batch = mlp(x)
    assert batch.dtype == np.float32
    assert [mlp(x[i: i + 1])[0] for i in range(len(x))] == batch.tolist()
    assert np.array_equal(mlp(x[::-3]), batch[::-3]) and len(set(batch[200:].tolist() + [batch[0]])) == 1


class CountingPolicy(LearnedPolicy):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scored: list[list] = []  # keys entered by each MLP call

    def _enter(self, state, slots, keys):
        self.scored.append(sorted(keys))
        super()._enter(state, slots, keys)


def test_keys_read_ahead_are_scored_only_once_they_may_be_evicted():
    # Reading ahead into a layer used to rank the layer again at each eviction that followed; the keys read ahead
    # are protected until the next request, so nothing needs their score before then.
    policy = CountingPolicy(num_layers=2)
    cache = ExpertCache(6, policy)
    cache.request([(0, 0), (0, 1), (0, 2)], 0)
    cache.request([(1, 0), (1, 1), (1, 2)], 1)
    cache.request([(0, 0), (0, 1), (0, 3)], 2)  # one miss: ranks both layers
    assert list(map(len, policy.scored)) == [3, 3]  # each layer's residents
    policy.scored.clear()
    _, admitted, evicted = cache.admit([(1, 5), (1, 6)], 2, [(0, 0), (0, 1), (0, 3)])
    assert admitted == [(1, 5), (1, 6)] and len(evicted) == 2 and policy.scored == []
    # the next request's eviction may take a key read ahead once no other candidate is left: it is scored then
    _, misses, evicted = cache.request([(0, e) for e in range(4, 9)], 3)
    assert len(misses) == 5 and len(set(evicted) & {(1, 5), (1, 6)}) == 1
    assert [(1, 5), (1, 6)] in policy.scored
