"""FlashMoE's learned eviction policy: a small MLP per layer predicts each resident expert's next-use distance.

FlashMoE (arXiv 2601.17063) scores eviction candidates with a tiny MLP over normalised recency, 1 / (t - last + 1),
and frequency (uses in a window / the layer's largest count in it), trained with MSE against Belady's next-use
distance mined from routing traces; the candidate predicted to be needed last is evicted. Time `t` counts the
requests of the candidate's own layer, so distances of different layers compare (each token requests each layer
once), which lets one policy serve the live store's single cache across layers.

NOTE: beside FlashMoE's two inputs this policy feeds the MLP one more, `reuse`: the probability that the expert is
requested within the next few requests of its layer, from a per-layer logistic regression over which experts the
last few requests used, learned online (from the past only) while the policy runs. It knows no expert by name and no
model in advance, so it carries over to models the MLP was not trained on; on held-out OLMoE prompts it is what takes
the learned policy from about 30% to about 50% of the LRU-to-Belady gap (see bench/policy_heldout.py). Other inputs
(`rank` at last use, the `interval` between the last two uses, all-time `frequency_all`) are kept for ablations.

T = requests of one layer (its clock), E = expert slots of the layer, F = features, H = hidden width.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tiermoe.offload.policies import POLICIES, CachePolicy, Key, split_key

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "policies" / "learned.safetensors"

DEFAULT_FEATURES = ("recency", "frequency", "reuse")


@dataclass(frozen=True, slots=True)
class LearnedConfig:
    """Inputs of the MLP, how they are measured, and the target it is trained on."""

    features: tuple[str, ...] = DEFAULT_FEATURES  # names in FEATURES, in MLP input order
    window: int = 32  # requests of a layer over which `frequency` counts uses
    horizon: int = 16  # next-use distances are clamped here (in requests of the layer), then divided by it
    reuse_horizon: int = 4  # `reuse` predicts a use within this many requests...
    reuse_history: int = 4  # ...from which experts this many latest requests used
    reuse_lr: float = 0.1  # AdaGrad step of the `reuse` predictor
    hidden: int = 32  # width of the MLP's two hidden layers

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise ValueError(f"unknown learned-policy features {unknown}; known: {', '.join(FEATURES)}")
        for name in ("window", "horizon", "reuse_horizon", "reuse_history", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"LearnedConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.reuse_lr <= 0:
            raise ValueError(f"LearnedConfig.reuse_lr must be positive, got {self.reuse_lr}")

    def to_dict(self) -> dict:
        return {**asdict(self), "features": list(self.features)}

    @classmethod
    def from_dict(cls, d: dict) -> LearnedConfig:
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        return cls(**known)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


class ReusePredictor:
    """Online logistic regression: P(slot used within the next `horizon` requests | slots of the last `history`).

    The input is sparse (which slots each of the last `history` requests used), so a prediction sums `history * k`
    rows of `weight` (row `lag * size + slot`: slot used `lag` requests before). Each input is trained on once, when
    its `horizon` following requests have been seen, with AdaGrad steps (no schedule to tune per model). It starts
    knowing nothing: p = 0.5 everywhere.
    """

    def __init__(self, horizon: int, history: int, lr: float, size: int = 64):
        self.horizon, self.history, self.lr, self.size = horizon, history, lr, size
        self.weight = np.zeros((history * size, size))  # [lag * size + slot used, slot predicted]
        self.bias = np.zeros(size)
        self._g_weight = np.full((history * size, size), 1e-8)  # AdaGrad sums of squared gradients
        self._g_bias = np.full(size, 1e-8)
        self._sets: deque[np.ndarray] = deque(maxlen=horizon + history)  # slots of recent requests, newest last
        self.p = np.full(size, 0.5)  # prediction after the newest request

    def grow(self, size: int) -> None:
        """Makes room for slots up to `size` (new slots start untrained)."""
        pad = size - self.size
        if pad <= 0:
            return
        def padded(a: np.ndarray, value: float) -> np.ndarray:
            a = a.reshape(self.history, self.size, self.size)
            return np.pad(a, ((0, 0), (0, pad), (0, pad)), constant_values=value).reshape(-1, size)

        self.weight, self._g_weight = padded(self.weight, 0.0), padded(self._g_weight, 1e-8)
        self.bias = np.pad(self.bias, (0, pad))
        self._g_bias = np.pad(self._g_bias, (0, pad), constant_values=1e-8)
        self.p = np.pad(self.p, (0, pad), constant_values=0.5)
        self.size = size

    def observe(self, used: np.ndarray) -> None:
        """Takes the slots the newest request used: trains on the input whose label is now complete, then predicts."""
        self._sets.append(used)
        newest = len(self._sets) - 1
        if newest >= self.horizon:
            self._train(newest - self.horizon)
        self.p = _sigmoid(self._logits(self._rows(newest)))

    def _rows(self, i: int) -> np.ndarray:
        """Rows of `weight` active for the input ending at the i-th remembered request."""
        return np.concatenate([self._sets[i - lag] + lag * self.size for lag in range(min(self.history, i + 1))])

    def _logits(self, rows: np.ndarray) -> np.ndarray:
        return self.bias + self.weight[rows].sum(axis=0)

    def _train(self, i: int) -> None:
        rows = self._rows(i)
        label = np.zeros(self.size)
        for used in itertools.islice(self._sets, i + 1, i + 1 + self.horizon):
            label[used] = 1.0
        grad = _sigmoid(self._logits(rows)) - label  # d(log loss)/d(logit) for every predicted slot
        self._g_weight[rows] += grad * grad
        self.weight[rows] -= self.lr * grad / np.sqrt(self._g_weight[rows])
        self._g_bias += grad * grad
        self.bias -= self.lr * grad / np.sqrt(self._g_bias)


class LayerHistory:
    """One layer's requests, kept incrementally, and the feature rows they imply for any of its expert slots.

    `access(slot, step)` is called for each expert of a request, in router rank order; the first access with a new
    `step` opens the next request (the layer's clock advances). Features describe the layer after the latest request,
    which is when the cache asks for a victim. An access arriving after features were read in the same request still
    updates counts and recency, but the `reuse` predictor, which has taken that request's set, does not see it.
    """

    def __init__(self, config: LearnedConfig, size: int = 64):
        self.config = config
        self.last = np.full(size, -1, np.int64)  # clock of each slot's latest use, -1 if never used
        self.prev = np.full(size, -1, np.int64)  # clock of the use before that
        self.rank = np.zeros(size)  # position in its latest request (0 = router's top choice)
        self.count = np.zeros(size, np.int64)  # uses within the last `window` requests
        self.total = np.zeros(size, np.int64)  # uses ever
        self.clock = -1  # index of the latest request
        self.top_k = 1  # largest request seen
        self.step: int | None = None  # the caller's step of the latest request
        self._current: list[int] = []  # slots of the latest request, rank order
        self._window: deque[list[int]] = deque()  # slots of the requests before it, within the window
        self._settled = True  # the latest request has been handed to the reuse predictor
        self.reuse = (ReusePredictor(config.reuse_horizon, config.reuse_history, config.reuse_lr, size)
                      if "reuse" in config.features else None)

    @property
    def size(self) -> int:
        return len(self.last)

    def access(self, slot: int, step: int) -> None:
        """Records a use of `slot` by the request at `step`."""
        if step != self.step:
            self._open(step)
        if slot >= self.size:
            self._grow(slot + 1)
        if self.last[slot] == self.clock:
            return  # listed twice in one request
        self.prev[slot], self.last[slot] = self.last[slot], self.clock
        self.rank[slot] = len(self._current)
        self.count[slot] += 1
        self.total[slot] += 1
        self._current.append(slot)
        self._settled = False

    def touch(self, slot: int) -> None:
        """A slot made resident without a use (prefetched): it counts as used now for recency, not for counts."""
        if slot >= self.size:
            self._grow(slot + 1)
        if self.last[slot] < 0:
            self.last[slot] = max(self.clock, 0)

    def features(self, slots: np.ndarray) -> np.ndarray:
        """[len(slots), F] float32 rows, in the order of `config.features`."""
        self._settle()
        return np.stack([FEATURES[name](self, slots) for name in self.config.features], axis=1).astype(np.float32)

    def _open(self, step: int) -> None:
        self._settle()
        if self.clock >= 0:
            self._window.append(self._current)
        while len(self._window) >= self.config.window:  # the new request is the window's last
            np.subtract.at(self.count, self._window.popleft(), 1)
        self.step, self.clock, self._current = step, self.clock + 1, []

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            self.top_k = max(self.top_k, len(self._current))
            if self.reuse is not None:
                self.reuse.observe(np.array(self._current, np.int64))

    def _grow(self, size: int) -> None:
        size = max(size, 2 * self.size)
        pad = size - self.size
        self.last = np.pad(self.last, (0, pad), constant_values=-1)
        self.prev = np.pad(self.prev, (0, pad), constant_values=-1)
        self.rank, self.count, self.total = (np.pad(a, (0, pad)) for a in (self.rank, self.count, self.total))
        if self.reuse is not None:
            self.reuse.grow(size)


def _recency(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return 1.0 / (h.clock - h.last[s] + 1)


def _frequency(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return h.count[s] / max(int(h.count.max()), 1)


def _reuse(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return h.reuse.p[s]


def _rank(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return h.rank[s] / max(h.top_k - 1, 1)


def _interval(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    prev = h.prev[s]
    return np.where(prev >= 0, 1.0 / (h.last[s] - prev + 1), 0.0)


def _frequency_all(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return h.total[s] / max(int(h.total.max()), 1)


#: Feature name -> function of (history, slots); every value lies in [0, 1].
FEATURES: dict[str, Callable[[LayerHistory, np.ndarray], np.ndarray]] = {
    "recency": _recency,  # 1 / (t - last use + 1)
    "frequency": _frequency,  # uses in the window / the layer's largest count in the window
    "reuse": _reuse,  # online-predicted P(used within reuse_horizon requests)
    "rank": _rank,  # router rank at the latest use / (k - 1)
    "interval": _interval,  # 1 / (gap between the two latest uses + 1), 0 if used once
    "frequency_all": _frequency_all,  # uses ever / the layer's largest
}


@dataclass
class MLP:
    """Two hidden ReLU layers and one output: the predicted next-use distance (scaled to [0, 1]) of each row."""

    w1: np.ndarray  # [F, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, H]
    b2: np.ndarray  # [H]
    w3: np.ndarray  # [H]
    b3: np.ndarray  # [1]

    _NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """[N, F] -> [N]."""
        h = np.maximum(x @ self.w1 + self.b1, 0.0)
        h = np.maximum(h @ self.w2 + self.b2, 0.0)
        return h @ self.w3 + self.b3[0]

    @property
    def num_params(self) -> int:
        return sum(getattr(self, n).size for n in self._NAMES)

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{n}": np.ascontiguousarray(getattr(self, n), np.float32) for n in self._NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], prefix: str) -> MLP:
        return cls(*(tensors[f"{prefix}.{n}"].astype(np.float32) for n in cls._NAMES))


@dataclass
class LearnedWeights:
    """Trained MLPs: one per MoE layer of the model they were trained for, and one pooled over all its layers."""

    config: LearnedConfig
    layers: list[MLP]  # per MoE layer, in layer order
    pooled: MLP  # trained on every layer's rows: serves the layers of other models
    info: dict = field(default_factory=dict)  # training facts (traces, split, budget), saved in the file's metadata

    def mlp_for(self, layer: int | None, num_layers: int | None) -> MLP:
        """The layer's own MLP when the model has the layer count these were trained for, else the pooled one."""
        if num_layers == len(self.layers) and isinstance(layer, int) and 0 <= layer < num_layers:
            return self.layers[layer]
        return self.pooled

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.layers) + self.pooled.num_params

    def save(self, path: str | Path) -> Path:
        """Writes the MLPs as safetensors, with the config and info as JSON in its metadata."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self.pooled.tensors("pooled")
        for i, mlp in enumerate(self.layers):
            tensors.update(mlp.tensors(f"layers.{i}"))
        meta = {"config": json.dumps(self.config.to_dict()), "num_layers": str(len(self.layers)),
                "info": json.dumps(self.info)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LearnedWeights:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        if "config" not in meta:
            raise ValueError(f"{path} holds no learned-policy config in its metadata")
        layers = [MLP.from_tensors(tensors, f"layers.{i}") for i in range(int(meta.get("num_layers", 0)))]
        return cls(LearnedConfig.from_dict(json.loads(meta["config"])), layers, MLP.from_tensors(tensors, "pooled"),
                   json.loads(meta.get("info", "{}")))


@dataclass
class _LayerState:
    history: LayerHistory
    mlp: MLP
    slots: dict = field(default_factory=dict)  # expert key -> slot in `history`
    scored: list = field(default_factory=list)  # keys of this layer holding a score in the policy's memo

    def slot(self, expert: Key) -> int:
        s = self.slots.get(expert)
        if s is None:
            s = self.slots[expert] = len(self.slots)
        return s


class LearnedPolicy(CachePolicy):
    """Evicts the candidate whose predicted next-use distance is largest (the least recent among equals).

    `weights`: a path or `LearnedWeights` (default: the shipped weights). `layer`: the MoE layer of bare expert-id
    keys (the simulator's one policy per layer); keys `(layer, expert)` name their own. `num_layers`: the model's MoE
    layer count; each layer uses its own MLP when it equals the count the weights were trained for, else (or when
    not given) the pooled MLP, which was trained on all layers and knows no layer in particular. So the live store
    picks each layer's MLP from key[0] when built with `make_policy("learned", num_layers=...)`; a plain
    `make_policy("learned")` serves every layer with the pooled MLP (about as good on held-out OLMoE prompts).
    """

    wants_layer = True

    def __init__(self, weights: str | Path | LearnedWeights | None = None, layer: int | None = None,
                 num_layers: int | None = None):
        self.weights = weights if isinstance(weights, LearnedWeights) else LearnedWeights.load(
            SHIPPED_WEIGHTS if weights is None else weights)
        self.layer, self.num_layers = layer, num_layers
        self._layers: dict[int | None, _LayerState] = {}
        self._ticks = itertools.count(1)
        self._last: dict[Key, int] = {}  # key -> tick of its latest access (ties go to the oldest)
        # (prediction, -tick) per key. A layer's features only change when that layer is requested (its clock is
        # its own), so a request invalidates its layer's scores only: with one cache across layers (the live
        # store) a victim call then scores the candidates of one layer, not all of them.
        self._scores: dict[Key, tuple[float, int]] = {}

    def _locate(self, key: Key) -> tuple[_LayerState, int]:
        layer, expert = split_key(key, self.layer)
        state = self._layers.get(layer)
        if state is None:
            mlp = self.weights.mlp_for(layer, self.num_layers)
            state = self._layers[layer] = _LayerState(LayerHistory(self.weights.config), mlp)
        return state, state.slot(expert)

    def on_access(self, key: Key, step: int) -> None:
        """Feeds the use to its layer's history."""
        state, slot = self._locate(key)
        state.history.access(slot, step)
        self._last[key] = next(self._ticks)
        if state.scored:
            for k in state.scored:
                self._scores.pop(k, None)
            state.scored.clear()

    def on_insert(self, key: Key, step: int) -> None:
        """A key made resident without an access (prefetched) counts as just used."""
        state, slot = self._locate(key)
        state.history.touch(slot)
        if key not in self._last:
            self._last[key] = next(self._ticks)
        self._scores.pop(key, None)

    def on_evict(self, key: Key) -> None:
        """Nothing to forget: the history describes routing, which goes on whether the key is resident or not."""
        self._scores.pop(key, None)

    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        """The candidate predicted to be needed last. One batched MLP call per layer scores the candidates without a
        valid score; scores stay valid until their layer is requested again."""
        if not isinstance(candidates, Collection):
            candidates = list(candidates)
        scores = self._scores
        todo = [k for k in candidates if k not in scores]
        if todo:
            for state, keys, values in self._predict_by_layer(todo):
                scores.update((k, (v, -self._last.get(k, 0))) for k, v in zip(keys, values.tolist(), strict=True))
                state.scored += keys
        return max(candidates, key=scores.__getitem__)

    def predict(self, keys: list[Key]) -> np.ndarray:
        """Predicted next-use distance of each key (scaled: 1 = the horizon or later)."""
        out = dict(itertools.chain.from_iterable(zip(k, v.tolist(), strict=True)
                                                 for _, k, v in self._predict_by_layer(keys)))
        return np.array([out[k] for k in keys])

    def _predict_by_layer(self, keys: list[Key]) -> list[tuple[_LayerState, list[Key], np.ndarray]]:
        """(layer state, its keys, their predictions) per layer among `keys`: one MLP call per layer."""
        groups: dict[int, tuple[_LayerState, list[Key], list[int]]] = {}
        for key in keys:
            state, slot = self._locate(key)
            group = groups.get(id(state))
            if group is None:
                group = groups[id(state)] = (state, [], [])
            group[1].append(key)
            group[2].append(slot)
        return [(state, ks, state.mlp(state.history.features(np.array(slots, np.int64))))
                for state, ks, slots in groups.values()]


POLICIES["learned"] = LearnedPolicy
