"""FlashMoE's learned eviction policy: a small MLP predicts each resident expert's next-use distance.

FlashMoE (arXiv 2601.17063) scores eviction candidates with a tiny MLP over normalised recency, 1 / (t - last + 1),
and frequency (uses in a window / the layer's largest count in it), trained with MSE against Belady's next-use
distance mined from routing traces; the candidate predicted to be needed last is evicted. Time `t` counts the
requests of the candidate's own layer, so distances of different layers compare (each token requests each layer
once), which lets one policy serve the live store's single cache across layers.

NOTE: beside FlashMoE's two inputs this policy feeds the MLP one more, `reuse`: the probability that the expert is
requested within the next few requests of its layer, from a per-layer logistic regression over which experts the
last few requests used, learned online (from the past only) while the policy runs. It knows no expert by name and no
model in advance, so it carries over to models the MLP was not trained on. The inputs, the settings (a target
horizon of 8 requests) and one pooled MLP for every layer were chosen on validation prompts inside the training
half, where `reuse` took the policy from 22% to 44% of the LRU-to-Belady gap (bench/policy_heldout.py; the
candidates' scores are in bench/results/policy_heldout.md). Other inputs (`rank` at last use, the `interval` between
the last two uses, all-time `frequency_all`, and the scale-free `stack` depth and `reuse_rank`, shares of the
layer's experts) were candidates there and remain available to `policy train --features`.

T = requests of one layer (its clock), E = expert slots of the layer, F = features, H = hidden width.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tiermoe.offload.policies.base import CachePolicy, Key, VictimHeap, as_set, ranked_victim, split_key
from tiermoe.offload.policies.learned_features import FEATURES, SHARED_FEATURES, LayerHistory

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "assets" / "policies" / "learned.safetensors"

DEFAULT_FEATURES = ("recency", "frequency", "reuse")


@dataclass(frozen=True, slots=True)
class LearnedConfig:
    """Inputs of the MLP, how they are measured, and the target it is trained on."""

    features: tuple[str, ...] = DEFAULT_FEATURES  # names in FEATURES, in MLP input order
    window: int = 32  # requests of a layer over which `frequency` counts uses
    horizon: int = 8  # next-use distances are clamped here (in requests of the layer), then divided by it
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


@dataclass(frozen=True)
class MLP:
    """Two hidden ReLU layers and one output: the predicted next-use distance (scaled to [0, 1]) of each row."""

    w1: np.ndarray  # [F, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, H]
    b2: np.ndarray  # [H]
    w3: np.ndarray  # [H]
    b3: np.ndarray  # [1]

    _NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")

    def __post_init__(self) -> None:
        # What __call__ computes with (frozen, so these cannot go stale: `dataclasses.replace` makes a changed MLP).
        object.__setattr__(self, "_f64", tuple(getattr(self, n).astype(np.float64) for n in self._NAMES))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """[N, F] -> [N] float32.

        Computed in float64, rounded to float32 once: BLAS rounds a row differently by batch size and position, by
        about one float32 ulp, but only by ~1e-16 in float64, which the rounding absorbs. So a row scores the same
        in any batch: scoring a layer's experts together equals scoring each alone, and equal inputs tie.
        """
        w1, b1, w2, b2, w3, b3 = self._f64
        h = np.maximum(np.asarray(x, np.float64) @ w1 + b1, 0.0)  # [N, H]
        h = np.maximum(h @ w2 + b2, 0.0)  # [N, H]
        return (h @ w3 + b3[0]).astype(np.float32)  # [N]

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
        """Reads weights that `save` wrote; ValueError naming the problem if the file is missing, is not such a file,
        or holds MLPs whose shapes do not fit its config (inputs = its features, width = its `hidden`)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"learned-policy weights {path} do not exist")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except Exception as e:  # safetensors raises its own error type for a file that is not safetensors
            raise ValueError(f"{path} is not a safetensors file ({e})") from None
        if "config" not in meta:
            raise ValueError(f"{path} holds no learned-policy config in its metadata (not written by `policy train`?)")
        try:
            config = LearnedConfig.from_dict(json.loads(meta["config"]))
            num_layers, info = int(meta.get("num_layers", 0)), json.loads(meta.get("info", "{}"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} has a malformed learned-policy config: {e}") from None
        prefixes = ["pooled", *(f"layers.{i}" for i in range(num_layers))]
        for prefix in prefixes:
            _check_mlp(tensors, prefix, len(config.features), path)
        layers = [MLP.from_tensors(tensors, prefix) for prefix in prefixes[1:]]
        return cls(config, layers, MLP.from_tensors(tensors, "pooled"), info)


def _check_mlp(tensors: dict[str, np.ndarray], prefix: str, features: int, path: Path) -> None:
    """ValueError unless the MLP `prefix` is all there, takes `features` inputs and is as wide throughout."""
    w1 = tensors.get(f"{prefix}.w1")
    hidden = w1.shape[-1] if w1 is not None and w1.ndim == 2 else 0
    for name, shape in _mlp_shapes(features, hidden).items():
        tensor = tensors.get(f"{prefix}.{name}")
        if tensor is None or tensor.shape != shape:
            got = "missing" if tensor is None else f"of shape {list(tensor.shape)}"
            raise ValueError(f"{path}: tensor {prefix}.{name} is {got}, but an MLP over the config's {features} "
                             f"features, {hidden} wide, needs shape {list(shape)}")


def _mlp_shapes(features: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {"w1": (features, hidden), "b1": (hidden,), "w2": (hidden, hidden), "b2": (hidden,), "w3": (hidden,),
            "b3": (1,)}


@dataclass(eq=False)
class _LayerState:
    history: LayerHistory
    mlp: MLP
    slots: dict = field(default_factory=dict)  # expert -> slot in `history`
    resident: set = field(default_factory=set)  # keys
    scores: dict = field(default_factory=dict)  # slot -> prediction, of the slots scored since the layer's request
    unscored: set = field(default_factory=set)  # residents inserted since, to score before the next victim


class LearnedPolicy(CachePolicy):
    """Evicts the candidate whose predicted next-use distance is largest (the least recent among equals).

    `weights`: a path or `LearnedWeights` (default: the shipped weights). `layer`: the MoE layer of bare expert-id
    keys (the simulator's one policy per layer); keys `(layer, expert)` name their own. Every layer is served by the
    pooled MLP, trained on all layers' rows, except with weights trained `--per-layer`: then, given `num_layers`
    equal to the count they were trained for, each layer uses its own MLP (the simulator passes it; the live engine
    does not, so it runs the pooled MLP).

    NOTE: a layer's features only change when that layer is requested (its clock is its own). So the first victim
    needed after a request scores that layer's residents, and the request's own experts (resident right after, if
    missed), in one MLP call; their entries (-prediction, tick, key) serve every eviction until the layer's next
    request, from one heap over all layers (`ranked_victim`). A key inserted in between without a score (prefetched)
    is scored only once a victim is chosen among candidates that include it (the cache protects keys read ahead
    until the next request, by which their layer is usually requested and ranked whole), with the layer's other
    such keys, in one MLP call: a row scores the same in any batch (`MLP.__call__`), and a prefetch changes no
    other slot's features (except the layer-wide `SHARED_FEATURES`: then the layer is ranked again), so the victims
    are those of ranking the layer again at every insert.
    """

    wants_layer = True

    def __init__(self, weights: str | Path | LearnedWeights | None = None, layer: int | None = None,
                 num_layers: int | None = None):
        self.weights = weights if isinstance(weights, LearnedWeights) else LearnedWeights.load(
            SHIPPED_WEIGHTS if weights is None else weights)
        self.layer, self.num_layers = layer, num_layers
        self._layers: dict[int | None, _LayerState] = {}
        self._where: dict[Key, tuple[_LayerState, int]] = {}  # key -> its layer's state and its slot there
        self._ticks = itertools.count(1)
        self._last: dict[Key, int] = {}  # key -> tick of its latest access (ties go to the oldest)
        self._heap = VictimHeap()  # residents' (-predicted distance, tick, key)
        self._stale: set[_LayerState] = set()  # layers requested since their residents were scored
        self._unscored: set[_LayerState] = set()  # layers holding `unscored` keys
        # A prefetch marks its slot used: with a layer-wide feature that moves every slot's features.
        self._shared = bool(SHARED_FEATURES & set(self.weights.config.features))

    def _locate(self, key: Key) -> tuple[_LayerState, int]:
        where = self._where.get(key)
        if where is None:
            layer, expert = split_key(key, self.layer)
            state = self._layers.get(layer)
            if state is None:
                mlp = self.weights.mlp_for(layer, self.num_layers)
                state = self._layers[layer] = _LayerState(LayerHistory(self.weights.config), mlp)
            where = self._where[key] = (state, state.slots.setdefault(expert, len(state.slots)))
        return where

    def on_access(self, key: Key, step: int) -> None:
        """Feeds the use to its layer's history."""
        state, slot = self._where.get(key) or self._locate(key)
        state.history.access(slot, step)
        self._last[key] = next(self._ticks)
        self._stale.add(state)

    def on_insert(self, key: Key, step: int) -> None:
        """A key made resident without an access (prefetched) counts as just used."""
        state, slot = self._locate(key)
        touched = state.history.touch(slot)
        if key not in self._last:
            self._last[key] = next(self._ticks)
        state.resident.add(key)
        if state in self._stale:
            return
        score = None if touched else state.scores.get(slot)
        if score is not None:
            self._heap.push((-score, self._last[key], key))
        elif touched and self._shared:  # the layer's features moved
            self._stale.add(state)
        else:  # not scored with its layer, or its own features moved
            state.unscored.add(key)
            self._unscored.add(state)

    def on_evict(self, key: Key) -> None:
        """Drops the key from its layer's residents; the history describes routing, which goes on regardless."""
        state = self._locate(key)[0]
        state.resident.discard(key)
        state.unscored.discard(key)
        self._heap.discard(key)

    def victim(self, candidates: Iterable[Key], step: int) -> Key:
        """The candidate predicted to be needed last (see the class NOTE for how little this computes per call)."""
        candidates = as_set(candidates)
        for state in [s for s in self._unscored if s not in self._stale]:  # a stale layer is ranked whole below
            keys = [k for k in state.unscored if k in candidates]
            if keys:
                self._enter(state, list({self._where[k][1] for k in keys}), keys)
                state.unscored.difference_update(keys)
        self._unscored = {s for s in self._unscored if s.unscored}
        return ranked_victim(self._heap, self._stale, candidates, self._rank)

    def _rank(self, state: _LayerState) -> None:
        """Scores the layer's residents and its latest request's experts in one MLP call; enters the residents."""
        where = self._where
        slots = list({where[k][1] for k in state.resident}.union(state.history.current))
        state.scores = {}
        state.unscored.clear()
        self._enter(state, slots, state.resident)

    def _enter(self, state: _LayerState, slots: list[int], keys: Iterable[Key]) -> None:
        """Scores `slots` of the layer in one MLP call, keeps their scores, and enters `keys` (residents among them)."""
        where, last = self._where, self._last
        predicted = state.mlp(state.history.features(np.array(slots, np.int64))).tolist()
        scores = state.scores
        scores.update(zip(slots, predicted, strict=True))
        self._heap.push(*[(-scores[where[k][1]], last[k], k) for k in keys])

    def predict(self, keys: list[Key]) -> np.ndarray:
        """Predicted next-use distance of each key (scaled: 1 = the horizon or later), one MLP call per key."""
        out = []
        for key in keys:
            state, slot = self._locate(key)
            out.append(state.mlp(state.history.features(np.array([slot], np.int64)))[0])
        return np.array(out)
