"""Where each activated expert runs, per layer and step, under each strategy the simulator compares.

A strategy owns the GPU tier's residency and answers, for one layer's request, where every expert runs: "gpu" (its
weights are on the GPU), "copy" (copied over the host link now, then run on the GPU) or "cpu" (run on the CPU from
RAM). Experts not on the GPU come from the RAM tier (`RamTier`), which may have to read them from disk first. The
engine's own objects decide wherever the engine has one: `ExpertCache` and the cache policies hold GPU residency,
`accelerator.place` is tiermoe's placement rule, `RefreshPlacement` is TIDE's.

| name      | GPU residency                                  | a non-resident expert                               |
|-----------|------------------------------------------------|-----------------------------------------------------|
| tiermoe   | engine's cache policy (lru), admit while room  | `accelerator.place`: copy if cheaper than CPU       |
| on-demand | LRU, every miss swapped in (transformers +     | always copied (swapped in)                          |
|           | accelerate / Mixtral-offloading style)         |                                                     |
| dali      | DALI's window policy (w=32, u=2 swaps)         | greedy CPU/GPU assignment, min max(T_gpu, T_cpu)    |
| optimal   | as dali                                        | exact 0-1 optimum of the same problem (milp)        |
| fiddler   | static: most popular experts (calibration)     | CPU                                                 |
| llamacpp  | static: all experts of layers >= N on GPU      | CPU (`--n-cpu-moe N`: the first N layers')          |
| tide      | TIDE refresh every tau steps (per-layer share) | CPU                                                 |
"""

from __future__ import annotations

from collections import Counter

from tiermoe.offload.placement.refresh import RefreshPlacement
from tiermoe.offload.policies import make_policy
from tiermoe.offload.tiers.cache import ExpertCache
from tiermoe.offload.tiers.placement_rule import Where, place
from tiermoe.sim import assign
from tiermoe.sim.costs import Pricing

Key = tuple[int, int]
GPU, COPY, CPU = "gpu", "copy", "cpu"


class Strategy:
    """GPU tier of one strategy (the base class: no GPU, everything on the CPU)."""

    name = "cpu"

    def __init__(self, price: Pricing, budget: int):
        self.price, self.budget = price, budget
        self.nbytes = price.shape.expert_bytes
        self.step = 0

    def assign(self, layer: int, experts: list[int], counts: list[int], base_gpu: float) -> dict[int, str]:
        """Where each of a layer's experts runs this step; `base_gpu`: GPU seconds already queued (dense part)."""
        return dict.fromkeys(experts, CPU)

    def swaps(self) -> list[Key]:
        """Experts the tier brought in outside a request since the last call (copied in the background)."""
        return []

    def begin_step(self, refresh: bool) -> None:
        """A diffusion step begins: whether it is a TIDE refresh step (only TIDE acts on it)."""

    def preload(self, keys: list[Key], usage: Counter) -> None:
        """Fill the GPU tier before the run: `keys` most used first (static strategies are placed already)."""


class CachedTier(Strategy):
    """GPU residency by an `ExpertCache` under a cache policy, as the engine's `AcceleratorStore` keeps it."""

    name = "tiermoe"
    policy = "lru"

    def __init__(self, price: Pricing, budget: int):
        super().__init__(price, budget)
        self.cache = ExpertCache(budget, make_policy(self.policy), size_of=lambda k: self.nbytes)
        self.costs = price.device_costs()
        self._swapped: list[Key] = []

    def assign(self, layer, experts, counts, base_gpu):
        self.step += 1
        for e in experts:  # every requested expert counts as used, wherever it runs
            self.cache.policy.on_access((layer, e), self.step)
        on_device = [(layer, e) for e in experts if (layer, e) in self.cache]
        out = {e: GPU for _, e in on_device}
        tokens = dict(zip(experts, counts, strict=True))
        rest = [(e, n) for e, n in tokens.items() if e not in out]
        base_gpu += sum(self.price.gpu_expert(tokens[e]) for e in out)
        out.update(self.place_rest(layer, rest, on_device, base_gpu))
        _, admitted, _ = self.cache.propose(self.step, [(layer, e) for e in experts])
        self._swapped += admitted
        return out

    def place_rest(self, layer: int, rest: list[tuple[int, int]], on_device: list[Key],
                   base_gpu: float) -> dict[int, str]:
        out = {}
        for e, n in rest:
            room = self.cache.used + self.nbytes <= self.budget
            if self.decide(n, room) is Where.HOST:
                out[e] = CPU
                continue
            _, admitted, _ = self.cache.admit([(layer, e)], self.step, on_device)
            out[e] = COPY if admitted else CPU
        return out

    def decide(self, tokens: int, room: bool) -> Where:
        return place(tokens, self.nbytes, self.price.shape.expert_flops, False, room, self.costs)

    def swaps(self) -> list[Key]:
        out, self._swapped = self._swapped, []
        return out

    def preload(self, keys: list[Key], usage: Counter) -> None:
        self.cache.admit(keys[: self.budget // self.nbytes], 0)


class OnDemand(CachedTier):
    name = "on-demand"

    def decide(self, tokens: int, room: bool) -> Where:
        return Where.PROMOTE


class DALI(CachedTier):
    """DALI: the window policy holds the GPU set (first uses fill free room); the rest is split CPU/GPU per step."""

    name = "dali"
    policy = "dali"

    def place_rest(self, layer, rest, on_device, base_gpu):
        p, out = self.price, {}
        free = []
        for e, n in rest:  # free room is filled on first use, as DALI's initial placement would
            if self.cache.used + self.nbytes <= self.budget:
                _, admitted, _ = self.cache.admit([(layer, e)], self.step, on_device)
                if admitted:
                    out[e] = COPY
                    continue
            free.append((e, n))
        base = base_gpu + sum(p.copy(self.nbytes) + p.gpu_expert(n) for e, n in rest if e in out)
        gpu = [p.copy(self.nbytes) + p.gpu_expert(n) for _, n in free]
        cpu = [p.cpu_expert(n) for _, n in free]
        for (e, _), x in zip(free, self.solve(gpu, cpu, [n for _, n in free], base), strict=True):
            out[e] = COPY if x else CPU
        return out

    def solve(self, gpu, cpu, tokens, base) -> list[bool]:
        return assign.greedy(gpu, cpu, tokens, base)


class Optimal(DALI):
    name = "optimal"

    def solve(self, gpu, cpu, tokens, base) -> list[bool]:
        return assign.optimal(gpu, cpu, base)


class StaticTier(Strategy):
    """A fixed GPU set chosen before the run; everything else on the CPU."""

    def __init__(self, price: Pricing, budget: int, resident: set[Key]):
        super().__init__(price, budget)
        self.resident = resident

    def assign(self, layer, experts, counts, base_gpu):
        return {e: GPU if (layer, e) in self.resident else CPU for e in experts}


class Fiddler(StaticTier):
    name = "fiddler"

    @classmethod
    def from_usage(cls, price: Pricing, budget: int, usage: Counter) -> Fiddler:
        """The most used experts (ties by key) that fit the budget."""
        fit = budget // price.shape.expert_bytes
        return cls(price, budget, {k for k, _ in sorted(usage.items(), key=lambda kv: (-kv[1], kv[0]))[:fit]})


class LlamaCpp(StaticTier):
    name = "llamacpp"

    @classmethod
    def split(cls, price: Pricing, budget: int, n_cpu_moe: int | None) -> LlamaCpp:
        """Experts of layers >= N on the GPU; N given, else the smallest whose GPU layers fit the budget."""
        s = price.shape
        per_layer = s.num_experts * s.expert_bytes
        n = n_cpu_moe if n_cpu_moe is not None else max(0, s.num_layers - budget // per_layer)
        tier = cls(price, budget, {(lay, e) for lay in range(n, s.num_layers) for e in range(s.num_experts)})
        tier.n_cpu_moe = n
        return tier


class TIDE(Strategy):
    """TIDE's interval refresh over the GPU tier: every `tau` requests of a layer, the layer's GPU share moves to
    that step's busiest experts (promotions copied); in between, a non-resident expert runs on the CPU."""

    name = "tide"

    def __init__(self, price: Pricing, budget: int, tau: int = 8):
        super().__init__(price, budget)
        self.tau = tau
        self.placement = RefreshPlacement(budget // max(price.shape.num_layers, 1), lambda lay, e: self.nbytes)
        self.requests: Counter = Counter()
        self.refreshing: bool | None = None  # a diffusion trace's step says; else every tau-th request of a layer

    def begin_step(self, refresh: bool) -> None:
        self.refreshing = refresh

    def preload(self, keys: list[Key], usage: Counter) -> None:
        """A first refresh of every layer from the calibration counts."""
        for layer in range(self.price.shape.num_layers):
            tokens = {e: n for (lay, e), n in usage.items() if lay == layer}
            self.placement.refresh(layer, tokens)

    def assign(self, layer, experts, counts, base_gpu):
        n = self.requests[layer]
        self.requests[layer] += 1
        if self.refreshing if self.refreshing is not None else n % self.tau == 0:
            move = self.placement.refresh(layer, dict(zip(experts, counts, strict=True)))
            promoted = set(move.promote)
            return {e: COPY if e in promoted else GPU if self.placement.is_fast(layer, e) else CPU for e in experts}
        return {e: GPU if self.placement.is_fast(layer, e) else CPU for e in experts}


STRATEGIES = ("tiermoe", "dali", "optimal", "fiddler", "llamacpp", "on-demand", "tide")
