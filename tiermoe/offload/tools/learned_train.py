"""Training the learned eviction policy: mine (features, next-use distance) rows from routing traces, fit the MLPs.

Mining replays each layer's requests through the very `LayerHistory` the policy keeps at run time, so the rows the
MLP learns from are the rows it is later asked about. After each request, every expert of the layer that was used
before and is not in the request (a possible eviction candidate) gives one row; its target is Belady's next-use
distance, in requests of that layer, clamped to `horizon` and divided by it (never used again = 1).

Training is torch on one thread; the result is plain numpy (`LearnedWeights`), which is all the policy needs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from tiermoe.offload.policies.learned import MLP, LearnedConfig, LearnedWeights
from tiermoe.offload.policies.learned_features import LayerHistory
from tiermoe.progress import progress
from tiermoe.sim.trace import Trace


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """What to learn and how long: the policy's inputs and target, and the MLP fit."""

    policy: LearnedConfig = field(default_factory=LearnedConfig)
    # Also fit one MLP per MoE layer (used on models of the trained layer count) beside the pooled one that serves
    # every layer. Off: on validation the pooled MLP did as well (bench/policy_heldout.py).
    per_layer: bool = False
    rows_per_layer: int = 100_000  # rows mined per layer and trace (steps are subsampled to about this many)
    epochs: int = 8
    batch: int = 1024
    lr: float = 3e-3  # Adam
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rows_per_layer", "epochs", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "policy": self.policy.to_dict()}


@dataclass
class Rows:
    """Training rows of one layer."""

    x: np.ndarray  # [N, F] float32 features
    y: np.ndarray  # [N] float32 scaled next-use distance

    @classmethod
    def concat(cls, parts: Sequence[Rows]) -> Rows:
        return cls(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))

    def sample(self, n: int, rng: np.random.Generator) -> Rows:
        if len(self.y) <= n:
            return self
        i = rng.choice(len(self.y), n, replace=False)
        return Rows(self.x[i], self.y[i])


def next_use_distance(requests: Sequence[Sequence[int]], horizon: int) -> np.ndarray:
    """[T, E] int: requests from t until expert e is requested again after t, clamped to `horizon`."""
    num = max((max(r) for r in requests if r), default=-1) + 1
    used = np.zeros((len(requests), num), bool)
    for t, r in enumerate(requests):
        used[t, r] = True
    t = np.arange(len(requests))[:, None]
    at = np.where(used, t, len(requests) + horizon)  # a use, or "never" far enough to clamp
    first_from = np.minimum.accumulate(at[::-1], axis=0)[::-1]  # first use at or after t
    after = np.concatenate([first_from[1:], np.full((1, num), len(requests) + horizon)])  # first use after t
    return np.minimum(after - t, horizon)


def mine_layer(requests: Sequence[Sequence[int]], config: LearnedConfig, rows: int,
               rng: np.random.Generator, mined: Sequence[bool] | None = None) -> Rows:
    """Rows of one layer's requests (expert ids; empty requests, i.e. layer not computed, are skipped).

    `mined[t]` False replays request t into the history without taking rows after it (a prefill token warming the
    history, as it warms the cache before decode); default: rows after every request.
    """
    keep_mined = [m for r, m in zip(requests, mined, strict=True) if len(r)] if mined is not None else None
    requests = [list(r) for r in requests if len(r)]
    if not requests:
        return Rows(np.zeros((0, len(config.features)), np.float32), np.zeros(0, np.float32))
    dist = next_use_distance(requests, config.horizon)
    per_step = max(1.0, float(np.mean([dist.shape[1] - len(r) for r in requests])))
    steps = len(requests) if keep_mined is None else max(1, sum(keep_mined))
    keep = rng.random(len(requests)) < min(1.0, rows / (per_step * steps))
    if keep_mined is not None:
        keep &= np.array(keep_mined, bool)
    history = LayerHistory(config, size=dist.shape[1])
    xs, ys = [], []
    for t, experts in enumerate(requests):
        for e in experts:
            history.access(e, t)
        if keep[t]:
            seen = history.seen()[: dist.shape[1]]
            seen[experts] = False
            slots = np.flatnonzero(seen)
            if len(slots):
                xs.append(history.features(slots))
                ys.append(dist[t, slots] / config.horizon)
    if not xs:
        return Rows(np.zeros((0, len(config.features)), np.float32), np.zeros(0, np.float32))
    return Rows(np.concatenate(xs), np.concatenate(ys).astype(np.float32))


def mine_trace(trace: Trace, config: LearnedConfig, rows: int, seed: int = 0) -> list[Rows]:
    """Rows of every MoE layer of a trace's decode tokens; the history runs through the whole trace, prefill tokens
    included (they warm it, as they warm the engine's cache, but give no rows), as a serving process's cache does."""
    every = np.arange(trace.num_tokens)
    decode = ~trace.is_prefill
    return [mine_layer(trace.layer_requests(layer, every), config, rows, np.random.default_rng([seed, layer]), decode)
            for layer in progress(range(trace.num_layers), desc=f"mining {trace.name or 'trace'}", unit="layer")]


def fit_mlp(rows: Rows, config: TrainConfig) -> MLP:
    """MSE fit of a fresh MLP to `rows` (torch, one thread, seeded)."""
    import torch

    torch.set_num_threads(1)  # the machine is shared; this is a small model
    torch.manual_seed(config.seed)
    hidden = config.policy.hidden
    net = torch.nn.Sequential(torch.nn.Linear(rows.x.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    x, y = torch.from_numpy(rows.x), torch.from_numpy(rows.y)
    for _ in progress(range(config.epochs), desc="fitting the MLP", unit="epoch"):
        for idx in torch.randperm(len(y)).split(config.batch):
            loss = torch.nn.functional.mse_loss(net(x[idx]).squeeze(-1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = [p.detach().numpy().astype(np.float32) for p in net.parameters()]
    return MLP(w[0].T.copy(), w[1], w[2].T.copy(), w[3], w[4][0].copy(), w[5])


def train(traces: Sequence[Trace], config: TrainConfig | None = None, log=None) -> LearnedWeights:
    """Per-layer MLPs for the layer count of the first trace (from the traces that have it) and a pooled MLP over
    all layers of all traces."""
    config = config or TrainConfig()
    if not traces:
        raise ValueError("training the learned policy needs at least one trace")
    start = time.perf_counter()
    mined = [mine_trace(t, config.policy, config.rows_per_layer, config.seed) for t in traces]
    _log(log, f"mined {sum(len(r.y) for m in mined for r in m)} rows in {time.perf_counter() - start:.1f}s")
    weights = fit_weights(mined, traces[0].num_layers, config, log)
    weights.info.update(traces=[t.name for t in traces], train_seconds=round(time.perf_counter() - start, 1))
    return weights


def fit_weights(mined: Sequence[Sequence[Rows]], num_layers: int, config: TrainConfig, log=None) -> LearnedWeights:
    """MLPs from mined rows (per trace, per layer): the pooled one from a sample of all rows and, with
    `config.per_layer`, layer i's MLP from the traces with `num_layers` layers."""
    layers = []
    for layer in range(num_layers if config.per_layer else 0):
        layers.append(fit_mlp(Rows.concat([m[layer] for m in mined if len(m) == num_layers]), config))
        _log(log, f"layer {layer}: fitted")
    rng = np.random.default_rng(config.seed)
    pooled = fit_mlp(Rows.concat([r for m in mined for r in m]).sample(config.rows_per_layer * 2, rng), config)
    info = {"num_layers": num_layers, "rows": int(sum(len(r.y) for m in mined for r in m)),
            "train": config.to_dict()}
    return LearnedWeights(config.policy, layers, pooled, info)


def split_sequences(trace: Trace, fraction: float, seed: int = 0) -> tuple[Trace, Trace, list[int]]:
    """A seeded random `fraction` of the trace's sequences (prompts) and the rest; also the chosen indices.

    Random rather than the first ones because traces are often stored grouped by dataset.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"split fraction must be in [0, 1], got {fraction}")
    n = trace.num_sequences
    chosen = sorted(np.random.default_rng(seed).permutation(n)[: int(np.floor(fraction * n + 0.5))].tolist())
    first, rest = trace.split_by_sequences(chosen)
    return first, rest, chosen


def _log(log, msg: str) -> None:
    if log is not None:
        log(msg)
