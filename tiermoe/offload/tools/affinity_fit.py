"""Fitting the affinity prefetcher's table on routing traces, choosing its settings, and measuring its predictions.

Counts, per pair of consecutive MoE layers of every token (and per pair of consecutive tokens of a request: its last
MoE layer, then the next token's first), how often expert i at the first layer comes with expert j at the second.
P(j | i) = (count(i, j) + smoothing * freq(j)) / (count(i) + smoothing), where freq(j) is the share of tokens whose
second layer picked j: a row seen rarely leans on how popular j is overall.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tiermoe.offload.policies import make_policy
from tiermoe.offload.prefetch import COMBINE, AffinityTable
from tiermoe.sim.ram_tier import RamTier
from tiermoe.sim.trace import Trace

# the validation grids
SMOOTHING = (0.0, 1.0, 10.0, 100.0)
MIN_PROB = (0.3, 0.4, 0.5, 0.6, 0.7)
BUDGETS = (0.25, 0.5)  # cache sizes (shares of all experts) at which reads ahead are weighed
POLICIES = ("lru", "dali", "learned")  # ...under each of these cache policies (they keep different experts resident)
REPLAY_TOKENS = 1024  # validation tokens replayed through the cache to weigh them (a replay is slow Python)


@dataclass
class PairCounts:
    """Co-occurrence counts of the L layer pairs (pair l: layer l -> l + 1; pair L-1: the last layer -> the next
    token's first)."""

    joint: np.ndarray  # [L, E, E] float64: tokens where i was picked at the pair's first layer and j at its second
    first: np.ndarray  # [L, E]: tokens where i was picked at the first layer
    second: np.ndarray  # [L, E]: tokens where j was picked at the second layer
    tokens: np.ndarray  # [L]: tokens counted per pair

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts(self.joint + other.joint, self.first + other.first, self.second + other.second,
                          self.tokens + other.tokens)

    def probs(self, smoothing: float) -> torch.Tensor:
        """[L, E, E] P(j at the second layer | i at the first), smoothed towards j's frequency."""
        freq = self.second / np.maximum(self.tokens, 1)[:, None]  # [L, E]
        num = self.joint + smoothing * freq[:, None, :]
        den = (self.first + smoothing)[:, :, None]
        return torch.from_numpy(np.where(den > 0, num / np.maximum(den, 1e-12), freq[:, None, :])).float()


def pairs(trace: Trace) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer pair: (chosen at its first layer [N, K], chosen at its second [N, K]) over the trace's rows where
    both layers were computed; the last pair joins consecutive rows of one request."""
    x = trace.experts.astype(np.int64)  # [T, L, K]
    out = []
    for layer in range(trace.num_layers - 1):
        a, b = x[:, layer], x[:, layer + 1]
        ok = (a >= 0).all(1) & (b >= 0).all(1)
        out.append((a[ok], b[ok]))
    same_request = np.ones(len(x), bool)
    same_request[trace.seq_starts] = False  # row r follows row r - 1 in its request unless r starts one
    rows = np.flatnonzero(same_request[1:]) + 1  # [N] rows with a predecessor
    a, b = x[rows - 1, -1], x[rows, 0]
    ok = (a >= 0).all(1) & (b >= 0).all(1)
    out.append((a[ok], b[ok]))
    return out


def count(trace: Trace) -> PairCounts:
    """The co-occurrence counts of one trace."""
    e = trace.num_experts
    joint, first, second, tokens = [], [], [], []
    for a, b in pairs(trace):
        flat = (a[:, :, None] * e + b[:, None, :]).ravel()  # [N*K*K] index of (i, j)
        joint.append(np.bincount(flat, minlength=e * e).reshape(e, e))
        first.append(np.bincount(a.ravel(), minlength=e))
        second.append(np.bincount(b.ravel(), minlength=e))
        tokens.append(len(a))
    return PairCounts(*(np.array(v, dtype=np.float64) for v in (joint, first, second, tokens)))


def quality(table: AffinityTable, traces: Sequence[Trace]) -> dict:
    """Precision (predicted experts the next layer picked) and recall (picked experts that were predicted) of the
    table's prediction over the traces' layer pairs: overall, within a token (pairs 0..L-2), across tokens (the last
    pair), and per pair."""
    return _summary(_ranked(table, traces), table.top_p, table.min_prob)


@dataclass
class Ranked:
    """Per layer pair, over the traces' tokens: each token's next-layer experts ranked by score (all of them)."""

    scores: list[np.ndarray]  # [N, E] per pair, best first
    hit: list[np.ndarray]  # [N, E] bool per pair: the next layer picked that expert
    top_k: int


def _ranked(table: AffinityTable, traces: Sequence[Trace]) -> Ranked:
    pair_data = [pairs(t) for t in traces]
    scores, hit = [], []
    for pair in range(table.probs.shape[0]):
        a = np.concatenate([d[pair][0] for d in pair_data])
        b = np.concatenate([d[pair][1] for d in pair_data])
        values, experts = table.scores(pair, torch.from_numpy(a)).sort(dim=-1, descending=True)  # [N, E]
        scores.append(values.numpy())
        hit.append((experts.numpy()[:, :, None] == b[:, None, :]).any(-1))
    return Ranked(scores, hit, traces[0].top_k)


def _summary(r: Ranked, top_p: int, min_prob: float) -> dict:
    """Precision and recall at `top_p` predicted experts per token scoring at least `min_prob`."""
    kept = [s[:, :top_p] >= min_prob for s in r.scores]
    hits = np.array([(h[:, :top_p] & k).sum() for h, k in zip(r.hit, kept, strict=True)], dtype=np.float64)
    predicted = np.array([k.sum() for k in kept], dtype=np.float64)
    tokens = np.array([len(s) for s in r.scores], dtype=np.float64)

    def pr(sl: slice) -> dict:
        return {"precision": float(hits[sl].sum() / max(predicted[sl].sum(), 1)),
                "recall": float(hits[sl].sum() / max(tokens[sl].sum() * r.top_k, 1)),
                "predicted_per_token": float(predicted[sl].sum() / max(tokens[sl].sum(), 1)),
                "tokens": int(tokens[sl].sum())}

    return {**pr(slice(None)), "within_token": pr(slice(0, -1)), "next_token": pr(slice(-1, None)),
            "per_pair": [pr(slice(i, i + 1)) for i in range(len(hits))]}


def f1(q: dict) -> float:
    p, r = q["precision"], q["recall"]
    return 2 * p * r / (p + r) if p + r else 0.0


def prefetch_value(table: AffinityTable, traces: Sequence[Trace], fraction: float,
                   settings: Sequence[tuple[int, float]], policy: str = "lru") -> list[dict]:
    """Per (top_p, min_prob) setting of the table: replays the traces (batch 1, one request per MoE layer and token)
    through the RAM tier's bookkeeping with a `policy` cache of `fraction` of all experts and the table's prefetch,
    as the live store runs them. Counts the misses left, the reads ahead, and those the next request of their layer
    used (`useful`): a useful read ahead hides a miss's latency, any other costs a read of disk time."""
    layers, experts = traces[0].num_layers, traces[0].num_experts
    ranked = [_all_rows(table, t) for t in traces]  # per trace: experts [T, L, E] best first, their scores
    out = []
    for top_p, min_prob in settings:
        counts = {"top_p": top_p, "min_prob": min_prob, "misses": 0, "prefetched": 0, "useful": 0, "requests": 0}
        for trace, (order, scores) in zip(traces, ranked, strict=True):
            tier = RamTier(max(int(fraction * layers * experts), trace.top_k), make_policy(policy), lambda k: 1,
                           layers, trace.top_k, 1)
            ahead: dict[int, set[int]] = {}  # layer -> experts read ahead for its next request
            for t, row in enumerate(trace.experts.astype(np.int64)):
                for layer in range(layers):
                    chosen = set(row[layer][row[layer] >= 0].tolist())
                    if not chosen:
                        continue
                    guess = order[t, layer, :top_p][scores[t, layer, :top_p] >= min_prob].tolist()
                    served = tier.fetch(layer, sorted(chosen), ((layer + 1) % layers, guess))
                    counts["useful"] += len(ahead.pop(layer, set()) & chosen)
                    ahead[(layer + 1) % layers] = {e for _, e in served[0].prefetch}
                    counts["misses"] += sum(len(s.misses) + len(s.streamed) for s in served)
                    counts["prefetched"] += len(served[0].prefetch)
                    counts["requests"] += 1
        out.append(counts)
    return out


def _first_tokens(traces: Sequence[Trace], tokens: int) -> list[Trace]:
    """The traces' first whole sequences holding about `tokens` rows in all (at least one sequence)."""
    out = []
    for trace in traces:
        ends = [end for _, end in trace.sequence_bounds()]
        keep = max(1, sum(end <= tokens for end in ends))
        out.append(trace.select_sequences(range(keep)))
        tokens -= ends[keep - 1]
        if tokens <= 0:
            break
    return out


def _all_rows(table: AffinityTable, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Every row's and layer's next-layer experts, best first, and their scores: [T, L, E] each."""
    ids = torch.from_numpy(trace.experts.astype(np.int64))  # [T, L, K]
    values, order = torch.stack([table.scores(layer, ids[:, layer]) for layer in range(trace.num_layers)],
                                1).sort(dim=-1, descending=True)
    return order.numpy(), values.numpy()


def choose(fit: PairCounts, validation: Sequence[Trace], top_p: int | None = None, smoothing: float | None = None,
           combine: str | None = None, min_prob: float | None = None,
           budgets: Sequence[float] = BUDGETS, policies: Sequence[str] = POLICIES) -> tuple[dict, list[dict]]:
    """The table's settings, chosen on `validation` routing (a setting given is kept):

    1. smoothing and combine: the best F1 of precision and recall at top-p = top_k (how well the table ranks);
    2. top-p and min_prob: the most reads ahead used minus those not used, over cached replays of the first
       REPLAY_TOKENS validation tokens at `budgets` (shares of all experts) under each of `policies`
       (`prefetch_value`): the reads ahead are worth their disk time.

    Returns the settings and every candidate's scores."""
    top_k = validation[0].top_k
    tried, best = [], None
    for s, c in itertools.product([smoothing] if smoothing is not None else SMOOTHING,
                                  [combine] if combine is not None else COMBINE):
        q = _summary(_ranked(AffinityTable(fit.probs(s), top_k, c), validation), top_k, 0.0)
        tried.append({"smoothing": s, "combine": c, "top_p": top_k, "min_prob": 0.0, "precision": q["precision"],
                      "recall": q["recall"], "f1": f1(q)})
        if best is None or tried[-1]["f1"] > best["f1"]:
            best = tried[-1]
    s, c = best["smoothing"], best["combine"]
    grid = list(itertools.product([top_p] if top_p is not None else sorted({2, 4, top_k}),
                                  [min_prob] if min_prob is not None else MIN_PROB))
    if len(grid) == 1:  # both given: nothing to weigh
        return {"top_p": grid[0][0], "smoothing": s, "combine": c, "min_prob": grid[0][1]}, tried
    table = AffinityTable(fit.probs(s), top_k, c)
    replayed = _first_tokens(validation, REPLAY_TOKENS)
    cases = [(b, policy) for b in budgets for policy in policies]
    replays = [prefetch_value(table, replayed, b, grid, policy) for b, policy in cases]
    best = None
    for i, (p, m) in enumerate(grid):
        value = [v[i] for v in replays]
        net = sum(2 * v["useful"] - v["prefetched"] for v in value) / sum(v["requests"] for v in value)
        tried.append({"smoothing": s, "combine": c, "top_p": p, "min_prob": m, "net_per_request": net,
                      "replays": {f"{policy} {b}": v for (b, policy), v in zip(cases, value, strict=True)}})
        if best is None or net > best["net_per_request"]:
            best = tried[-1]
    return {k: best[k] for k in ("top_p", "smoothing", "combine", "min_prob")}, tried
