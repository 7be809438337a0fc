"""The learned policy's inputs: one layer's request history, kept incrementally, and the feature rows it implies.

Every feature lies in [0, 1]. `stack` and `reuse_rank` are scale-free: shares of the layer's experts seen so far,
so they mean the same for any expert count, top-k and capacity. `reuse` comes from an online logistic regression
(`ReusePredictor`) over which experts the latest requests used; see tiermoe/offload/policies/learned.py for why it is
there.
T = requests of one layer (its clock), E = expert slots of the layer, F = features.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tiermoe.offload.policies.learned import LearnedConfig


def _sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.minimum(np.maximum(z, -30.0), 30.0)  # np.clip's values, without its dispatch cost (this runs per request)
    np.exp(np.negative(z, out=z), out=z)
    return np.divide(1.0, np.add(z, 1.0, out=z), out=z)


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
        self._inputs: deque[np.ndarray] = deque(maxlen=horizon + 1)  # rows of the latest inputs, newest last
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
        n = len(self._sets)  # the remembered inputs' rows move with the new row stride
        self._inputs = deque((self._rows(i) for i in range(n - len(self._inputs), n)), maxlen=self.horizon + 1)

    def observe(self, used: np.ndarray) -> None:
        """Takes the slots the newest request used: trains on the input whose label is now complete, then predicts."""
        self._sets.append(used)
        newest = len(self._sets) - 1
        self._inputs.append(self._shifted(used, newest) if self._inputs else self._rows(newest))
        if newest >= self.horizon:
            self._train(newest - self.horizon)
        self.p = _sigmoid(self._logits(self._inputs[-1]))

    def _rows(self, i: int) -> np.ndarray:
        """Rows of `weight` active for the input ending at the i-th remembered request."""
        return np.concatenate([self._sets[i - lag] + lag * self.size for lag in range(min(self.history, i + 1))])

    def _shifted(self, used: np.ndarray, newest: int) -> np.ndarray:
        """`_rows(newest)` from the previous input's rows: those one lag further back (the oldest request, past the
        history, dropped), after the newest request's own rows at lag 0."""
        previous = self._inputs[-1]
        if newest >= self.history:
            previous = previous[: len(previous) - len(self._sets[newest - self.history])]
        return np.concatenate([used, previous + self.size])

    def _logits(self, rows: np.ndarray) -> np.ndarray:
        return self.bias + self.weight.take(rows, axis=0).sum(axis=0)  # take: weight[rows], at less call cost

    def _train(self, i: int) -> None:
        rows = self._inputs[0]  # the input ending at request i = newest - horizon; rows are distinct
        weight = self.weight.take(rows, axis=0)  # [R, size]
        grad = _sigmoid(self.bias + weight.sum(axis=0))  # d(log loss)/d(logit) = p - label, label 1 if used next:
        grad[np.concatenate(list(itertools.islice(self._sets, i + 1, i + 1 + self.horizon)))] -= 1.0  # once each
        grad2, step = grad * grad, self.lr * grad
        g_weight = self._g_weight.take(rows, axis=0)
        g_weight += grad2
        self._g_weight[rows] = g_weight
        weight -= step / np.sqrt(g_weight)
        self.weight[rows] = weight
        self._g_bias += grad2
        self.bias -= step / np.sqrt(self._g_bias)


class LayerHistory:
    """One layer's requests, kept incrementally, and the feature rows they imply for any of its expert slots.

    `access(slot, step)` is called for each expert of a request, in router rank order; the first access with a new
    `step` opens the next request (the layer's clock advances). Accesses are written to the arrays together, when
    features are next read or the next request opens. Features describe the layer after the latest request, which is
    when the cache asks for a victim. An access arriving after features were read in the same request still updates
    counts and recency.
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
        self._in_current: set[int] = set()
        self._array: np.ndarray | None = None  # _current as an array, once made
        self._written = 0  # entries of _current already written to the arrays
        # prev, rank and total only serve the features that read them: kept up to date only then.
        self._extras = bool({"rank", "interval", "frequency_all"} & set(config.features))
        self._window: deque[np.ndarray] = deque()  # slots of the requests before it, within the window
        self._settled = True  # the latest request has been handed to the reuse predictor
        self.reuse = (ReusePredictor(config.reuse_horizon, config.reuse_history, config.reuse_lr, size)
                      if {"reuse", "reuse_rank"} & set(config.features) else None)

    @property
    def size(self) -> int:
        return len(self.last)

    @property
    def current(self) -> list[int]:
        """Slots of the latest request, in rank order."""
        return self._current

    def access(self, slot: int, step: int) -> None:
        """Records a use of `slot` by the request at `step`."""
        if step != self.step:
            self._open(step)
        if slot >= self.size:
            self._grow(slot + 1)
        if slot in self._in_current:
            return  # listed twice in one request
        self._in_current.add(slot)
        self._current.append(slot)
        self._settled = False

    def touch(self, slot: int) -> bool:
        """A slot made resident without a use (prefetched): it counts as used now for recency, not for counts.
        Returns whether that changed anything (the slot had never been used)."""
        if slot >= self.size:
            self._grow(slot + 1)
        if slot in self._in_current or self.last[slot] >= 0:
            return False
        self.last[slot] = max(self.clock, 0)
        return True

    def seen(self) -> np.ndarray:
        """[size] bool: the slots used (or touched) so far."""
        self._write()
        return self.last >= 0

    def features(self, slots: np.ndarray) -> np.ndarray:
        """[len(slots), F] float32 rows, in the order of `config.features`."""
        self._settle()
        out = np.empty((len(slots), len(self.config.features)), np.float32)
        for i, name in enumerate(self.config.features):
            out[:, i] = FEATURES[name](self, slots)
        return out

    def _current_array(self) -> np.ndarray:
        """The latest request's slots as an array, made once unless the request grows."""
        if self._array is None or len(self._array) != len(self._current):
            self._array = np.array(self._current, np.int64)
        return self._array

    def _write(self) -> None:
        """Writes the latest request's accesses not yet in the arrays (distinct slots, so fancy indexing is safe)."""
        start, end = self._written, len(self._current)
        if start == end:
            return
        s = self._current_array()[start:]
        if self._extras:
            self.prev[s] = self.last[s]
            self.rank[s] = np.arange(start, end)
            self.total[s] += 1
        self.last[s] = self.clock
        self.count[s] += 1
        self._written = end

    def _open(self, step: int) -> None:
        self._settle()
        if self.clock >= 0:
            self._window.append(self._current_array())
        while len(self._window) >= self.config.window:  # the new request is the window's last
            self.count[self._window.popleft()] -= 1
        self.step, self.clock = step, self.clock + 1
        self._current, self._in_current, self._array, self._written = [], set(), None, 0

    def _settle(self) -> None:
        self._write()
        if not self._settled:
            self._settled = True
            self.top_k = max(self.top_k, len(self._current))
            if self.reuse is not None:
                self.reuse.observe(self._current_array())

    def _grow(self, size: int) -> None:
        size = max(size, 2 * self.size)
        pad = size - self.size
        self.last = np.pad(self.last, (0, pad), constant_values=-1)
        self.prev = np.pad(self.prev, (0, pad), constant_values=-1)
        self.rank, self.count, self.total = (np.pad(a, (0, pad)) for a in (self.rank, self.count, self.total))
        if self.reuse is not None:
            self.reuse.grow(size)


def _recency(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    # A slot prefetched before the layer's first request is marked used at clock 0 while the clock is still -1.
    return 1.0 / np.maximum(h.clock + 1 - h.last.take(s), 1)


def _frequency(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return h.count.take(s) / max(int(h.count.max()), 1)


def _reuse(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return h.reuse.p.take(s)


def _reuse_rank(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    p = h.reuse.p[: h.size][h.last >= 0]
    below = np.searchsorted(np.sort(p), h.reuse.p[s], side="left")
    return below / max(len(p) - 1, 1)


def _rank(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return h.rank[s] / max(h.top_k - 1, 1)


def _interval(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    prev = h.prev[s]
    return np.where(prev >= 0, 1.0 / (h.last[s] - prev + 1), 0.0)


def _stack(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    last = h.last[h.last >= 0]
    newer = len(last) - np.searchsorted(np.sort(last), h.last[s], side="right")
    return newer / max(len(last) - 1, 1)


def _frequency_all(h: LayerHistory, s: np.ndarray) -> np.ndarray:
    return h.total[s] / max(int(h.total.max()), 1)


#: Features whose value for one slot depends on which other slots were ever used (or prefetched).
SHARED_FEATURES = frozenset({"stack", "reuse_rank"})

#: Feature name -> function of (history, slots); every value lies in [0, 1].
FEATURES: dict[str, Callable[[LayerHistory, np.ndarray], np.ndarray]] = {
    "recency": _recency,  # 1 / (t - last use + 1)
    "frequency": _frequency,  # uses in the window / the layer's largest count in the window
    "reuse": _reuse,  # online-predicted P(used within reuse_horizon requests)
    "rank": _rank,  # router rank at the latest use / (k - 1)
    "interval": _interval,  # 1 / (gap between the two latest uses + 1), 0 if used once
    "frequency_all": _frequency_all,  # uses ever / the layer's largest
    "stack": _stack,  # share of the layer's seen experts used since (LRU stack depth / experts seen)
    "reuse_rank": _reuse_rank,  # share of the layer's seen experts with a lower `reuse`
}
