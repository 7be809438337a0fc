"""Trace-driven cache simulation: replay routing traces through the same policy and cache objects the store uses.

Model of the replay (the rules the live store follows, minus the weights):
- one `ExpertCache` per MoE layer, keyed by expert id, each with its own policy object;
- its capacity is a share of that layer's experts: `floor(fraction * E + 0.5)` items (round half up, so 25% of 64 is
  16 and 12.5% of 60 is 8); a capacity below top-k is refused, naming the minimum, since a token needs its whole
  top-k set resident at once;
- a token's top-k set at a layer is one request (`step` = index of the token in the replayed rows), listed in router
  rank order; entries of -1 (layer not computed) are skipped;
- decode tokens only by default (`include_prefill` replays and counts prompt tokens too; `warmup_prefill` replays
  them, so each request's prompt warms the cache and the policy's history, but counts decode tokens only: one
  request per prompt token, or with `prefill_order` as the engine runs a prompt, one forward pass asking for its
  distinct experts in turns); caches start empty and persist across sequences, as a serving process's cache would;
- hit rate of a layer = hits / requested experts; the mean is the unweighted mean over layers.
Belady, being offline, is given the replayed rows of its own layer as its future. A policy that wants to know its
layer (`wants_layer`, e.g. the learned one) is told which one and how many there are.

A policy may propose keys to bring in ahead of use (`CachePolicy.proposals`, e.g. DALI's window swaps): after each
request the cache admits them (`ExpertCache.propose`, the request's keys pinned). Such a key requested later is a
hit; its load is counted apart as a prefetch, so loads = misses + prefetches is the I/O to compare, not hits alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from tiermoe.offload.policies import POLICIES, CachePolicy, make_policy
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.offload.tiers.fetch_order import fetch_order
from tiermoe.progress import progress
from tiermoe.sim.trace import Trace

# Orders a prompt's routing [T, K] into (distinct experts in the order to serve them, tokens per expert).
PrefillOrder = Callable[[np.ndarray], tuple[list[int], list[int]]]


@dataclass(frozen=True, slots=True)
class Capacity:
    """A cache size per layer: a share of the layer's experts, or a fixed number of experts."""

    fraction: float | None = None
    items: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.items is None):
            raise ValueError("give exactly one of fraction and items")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"capacity fraction must be in (0, 1], got {self.fraction}")
        if self.items is not None and self.items < 1:
            raise ValueError(f"capacity must be at least 1 expert, got {self.items}")

    @classmethod
    def parse(cls, text: str) -> Capacity:
        """'25%' -> a quarter of the experts, '0.25' -> the same, '16' -> 16 experts."""
        text = text.strip()
        try:
            if text.endswith("%"):
                return cls(fraction=float(text[:-1]) / 100)
            if "." in text:
                return cls(fraction=float(text))
            return cls(items=int(text))
        except ValueError as e:
            raise ValueError(f"bad capacity {text!r} ({e}); use e.g. 25%, 0.25 or 16") from None

    def items_for(self, num_experts: int) -> int:
        """Number of experts the cache of one layer holds."""
        if self.items is not None:
            return self.items
        return math.floor(self.fraction * num_experts + 0.5)

    @property
    def label(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else str(self.items)


@dataclass
class PolicyRun:
    """Hit rates of one policy at one capacity."""

    policy: str
    capacity: str  # as given, e.g. "25%"
    capacity_items: int  # experts per layer cache
    per_layer: list[float]  # hit rate of each MoE layer
    mean: float  # unweighted mean of per_layer
    hits: int  # over all layers
    requests: int  # requested experts over all layers
    prefetches: int = 0  # keys loaded on the policy's proposal, over all layers (extra loads beside the misses)
    prefetch_hits: int = 0  # prefetched keys requested before being evicted


@dataclass
class CacheSimResult:
    """Everything one `simulate` call measured."""

    trace: str  # trace file stem
    tokens: int  # replayed rows
    include_prefill: bool
    num_layers: int
    num_experts: int
    top_k: int
    runs: list[PolicyRun] = field(default_factory=list)
    warmup_prefill: bool = False  # prefill rows were replayed uncounted before their decode rows
    prefill_order: str | None = None  # ...as one forward pass per prompt, experts in this order (else per token)
    layout: str = "per-layer"  # a cache of `capacity` items per layer, or "global": one for all, as the live store

    def run(self, policy: str, capacity: str) -> PolicyRun:
        """The run of `policy` at the capacity labelled `capacity` (e.g. "25%")."""
        for r in self.runs:
            if r.policy == policy and r.capacity == capacity:
                return r
        raise KeyError((policy, capacity))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)


@dataclass(frozen=True, slots=True)
class LayerReplay:
    """What replaying one layer counted."""

    hits: int
    prefetches: int = 0  # keys admitted on the policy's proposal
    prefetch_hits: int = 0  # of those, requested while still resident


def replay_layer(requests: Sequence[Sequence[int]], capacity: int, policy: CachePolicy) -> int:
    """Replays one layer's requests (step = list index) through a fresh cache; returns the number of hits."""
    return replay_layer_counts(requests, capacity, policy).hits


def replay_layer_counts(requests: Sequence[Sequence[int]], capacity: int, policy: CachePolicy,
                        counted: Sequence[bool] | None = None) -> LayerReplay:
    """Like `replay_layer`, also admitting the policy's proposals after each request and counting those loads.

    `counted[step]` False replays a request without counting it (a warm-up: its hits, prefetches and prefetch hits
    are left out); default: every request counts.
    """
    cache = ExpertCache(capacity, policy)
    hits = prefetches = prefetch_hits = 0
    prefetched: set = set()  # admitted on proposal and not requested since
    for step, keys in enumerate(requests):
        if not keys:
            continue
        out = cache.request(keys, step)
        ahead = sum(1 for k in out.hits if k in prefetched)  # hits on keys brought in on a proposal
        prefetched.difference_update(keys)
        prefetched.difference_update(out.evicted)
        _, admitted, evicted = cache.propose(step, keys)
        prefetched.difference_update(evicted)
        prefetched.update(admitted)
        if counted is None or counted[step]:
            hits, prefetch_hits, prefetches = hits + len(out.hits), prefetch_hits + ahead, prefetches + len(admitted)
    return LayerReplay(hits, prefetches, prefetch_hits)


def _policy_for(name: str, requests: Sequence[Sequence[int]], layer: int = 0, num_layers: int = 1,
                kwargs: dict | None = None) -> CachePolicy:
    cls = POLICIES.get(name.lower())
    kw = dict(kwargs or {})
    if cls is not None and cls.needs_future:
        kw["future"] = requests
    if cls is not None and cls.wants_layer:
        kw.update(layer=layer, num_layers=num_layers)
    return make_policy(name, **kw)


def _check_capacity(items: int, label: str, top_k: int, num_experts: int) -> None:
    if items > num_experts:
        raise ValueError(f"capacity {label} is more than the trace's {num_experts} experts per layer")
    if items < top_k:
        raise ValueError(f"capacity {label} gives {items} experts per layer, below top-k {top_k}: a token needs its "
                         f"whole top-k set resident at once, so the minimum capacity is {top_k} experts")


def batched_prefill_requests(trace: Trace, layer: int, items: int, order: PrefillOrder = fetch_order
                             ) -> tuple[list[list[int]], list[bool]]:
    """One layer's requests with each sequence's prefill run as the engine runs it, and which of them count.

    The engine computes a prompt in one forward pass: a layer asks for the prompt's distinct experts in `order`
    (the engine's: `fetch_order`, by the latest token using each), served in turns of at most `items` experts when
    they do not fit at once; the turns warm the cache uncounted, then the sequence's decode rows follow one request
    each.
    """
    requests: list[list[int]] = []
    counted: list[bool] = []
    for start, end in trace.sequence_bounds():
        prefill = trace.is_prefill[start:end]
        experts, _ = order(trace.experts[start:end][prefill, layer, :])
        turns = [experts[i: i + items] for i in range(0, len(experts), items)]
        decode = trace.layer_requests(layer, np.arange(start, end)[~prefill])
        requests += turns + decode
        counted += [False] * len(turns) + [True] * len(decode)
    return requests, counted


def replay_global(trace: Trace, items: int, policy: CachePolicy) -> tuple[list[int], list[int]]:
    """Per layer (hits, requests) of decode rows through one cache for all layers holding `items` x L experts, as
    the live store keeps them (`RamTier`: one byte budget, every expert the same size, the scan-resistant horizon,
    requests in the engine's order); each sequence's prompt, if any, warms it in one uncounted pass."""
    from tiermoe.sim.machine_sim import MachineSim
    from tiermoe.sim.ram_tier import RamTier

    layers = trace.num_layers
    tier = RamTier(items * layers, policy, lambda k: 1, layers, trace.top_k, 1)
    hits, requests = [0] * layers, [0] * layers
    for start, end in trace.sequence_bounds():
        prefill = trace.is_prefill[start:end]
        passes = [(np.arange(start, end)[prefill], False)] if prefill.any() else []
        passes += [(np.array([row]), True) for row in np.arange(start, end)[~prefill]]
        for rows, counted in passes:
            for layer in range(layers):
                experts, _ = MachineSim.order(trace.experts[rows, layer])
                served = tier.fetch(layer, experts)
                if counted:
                    hits[layer] += sum(len(s.hits) for s in served)
                    requests[layer] += len(experts)
    return hits, requests


def simulate(trace: Trace, policies: Sequence[str], capacities: Sequence[Capacity],
             include_prefill: bool = False, policy_args: dict[str, dict] | None = None,
             warmup_prefill: bool = False, prefill_order: PrefillOrder | None = None,
             layout: str = "per-layer") -> CacheSimResult:
    """Hit rates of every policy at every capacity on `trace` (see the module docstring for the rules).

    `policy_args` maps a policy name to extra constructor arguments, e.g. {"learned": {"weights": path}}.
    `warmup_prefill` replays the prefill rows too but counts decode rows only (`tokens` counts those); it changes
    nothing when `include_prefill` already counts every row. `prefill_order` (the engine's is `fetch_order`) warms
    the cache with each prompt as the engine computes it, one forward pass asking for the prompt's experts in that
    order (`batched_prefill_requests`); None replays one request per prompt token.

    `layout` "per-layer" (the rules of the module docstring: a cache per layer of `capacity` items) or "global": the
    live store's layout, one cache for every layer under one budget of `capacity` x L experts (`replay_global`;
    decode rows counted, prompts warm it as the engine's prefill pass).
    """
    if layout not in ("per-layer", "global"):
        raise ValueError(f"cache layout must be 'per-layer' or 'global', got {layout!r}")
    if layout == "global":
        return _simulate_global(trace, policies, capacities, policy_args)
    policy_args = {k.lower(): v for k, v in (policy_args or {}).items()}
    for name in policies:
        if name.lower() not in POLICIES:
            make_policy(name)  # raises the ValueError listing the known policies
    if prefill_order is not None and include_prefill:
        raise ValueError("prefill_order warms the cache with the prompts uncounted; include_prefill counts them")
    warmup_prefill = warmup_prefill or prefill_order is not None
    rows = np.arange(trace.num_tokens) if include_prefill or warmup_prefill else trace.decode_rows()
    counted = None if include_prefill or not warmup_prefill else ~trace.is_prefill[rows]
    result = CacheSimResult(trace.name, len(rows) if counted is None else int(counted.sum()), include_prefill,
                            trace.num_layers, trace.num_experts, trace.top_k, warmup_prefill=warmup_prefill,
                            prefill_order=getattr(prefill_order, "__name__", None))
    sizes = [(cap.label, cap.items_for(trace.num_experts)) for cap in capacities]
    for label, items in sizes:
        _check_capacity(items, label, trace.top_k, trace.num_experts)
    if prefill_order is None:  # the same replay at every capacity
        per_token = [(trace.layer_requests(layer, rows), counted) for layer in range(trace.num_layers)]
        replays = {items: per_token for _, items in sizes}
    else:  # a prompt's turns depend on the capacity
        replays = {items: [batched_prefill_requests(trace, layer, items, prefill_order)
                           for layer in range(trace.num_layers)] for _, items in sizes}
    requested = {items: [sum(len(r) for r, c in zip(reqs, mask, strict=True) if c) if mask is not None
                         else sum(map(len, reqs)) for reqs, mask in layers] for items, layers in replays.items()}
    bar = progress(total=len(policies) * len(sizes) * trace.num_layers, desc="simulating", unit="layer")
    for name in policies:
        for label, items in sizes:
            kw = policy_args.get(name.lower())
            layers = replays[items]
            bar.set_postfix_str(f"{name} {label}")
            counts = []
            for layer, (reqs, mask) in enumerate(layers):
                counts.append(replay_layer_counts(reqs, items, _policy_for(name, reqs, layer, len(layers), kw), mask))
                bar.update()
            hits = [c.hits for c in counts]
            rates = [h / n if n else 0.0 for h, n in zip(hits, requested[items], strict=True)]
            result.runs.append(PolicyRun(name.lower(), label, items, rates, float(np.mean(rates)) if rates else 0.0,
                                         sum(hits), sum(requested[items]), sum(c.prefetches for c in counts),
                                         sum(c.prefetch_hits for c in counts)))
    bar.close()
    return result


def _simulate_global(trace: Trace, policies: Sequence[str], capacities: Sequence[Capacity],
                     policy_args: dict[str, dict] | None) -> CacheSimResult:
    policy_args = {k.lower(): v for k, v in (policy_args or {}).items()}
    result = CacheSimResult(trace.name, int((~trace.is_prefill).sum()), False, trace.num_layers, trace.num_experts,
                            trace.top_k, warmup_prefill=bool(trace.is_prefill.any()), prefill_order="fetch_order",
                            layout="global")
    for name in policies:
        for cap in capacities:
            items = cap.items_for(trace.num_experts)
            _check_capacity(items, cap.label, trace.top_k, trace.num_experts)
            kw = dict(policy_args.get(name.lower()) or {})
            if POLICIES.get(name.lower()) is not None and POLICIES[name.lower()].needs_future:
                raise ValueError(f"{name} needs the future of one cache per layer; use the per-layer layout")
            hits, requests = replay_global(trace, items, make_policy(name, **kw))
            rates = [h / n if n else 0.0 for h, n in zip(hits, requests, strict=True)]
            result.runs.append(PolicyRun(name.lower(), cap.label, items, rates, float(np.mean(rates)), sum(hits),
                                         sum(requests)))
    return result
