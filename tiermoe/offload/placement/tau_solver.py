"""Choosing TIDE's refresh interval tau: the one whose predicted I/O plus compute time for a block is least.

The routing statistics are a recorded block: each step's tokens per expert per layer, as measured at the refresh
steps of a request's first generated block (every step of it is one). For each candidate tau the solver replays
that block through a copy of the live `RefreshPlacement` -- refreshing at steps 0, tau, 2 tau, ... and reusing in
between -- and prices what the placement does with the cost model:

- refresh: every promoted expert moves into the fast tier once (disk read for the RAM tier, host -> device copy
  for an accelerator);
- every step, a routed expert in the fast tier is computed there; one outside it is computed on the CPU, and on
  the RAM tier it must first be streamed from disk (read, used, dropped) -- the I/O a stale placement costs.

A short tau pays for moves (and, on the RAM tier, re-reads of experts demoted too eagerly); a long one pays for
routed experts the placement no longer covers. Replaying the placement itself, rather than a closed-form drift
model, prices exactly the moves the store would make (ties, capacity, uneven counts) on the routing measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tiermoe.offload.placement.costs import TierCosts
from tiermoe.offload.placement.refresh import RefreshPlacement, SizeOf
from tiermoe.offload.placement.routing_log import Block

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # intervals tried; tau >= a block's steps means once per block


@dataclass(frozen=True, slots=True)
class BlockModel:
    """How one expert's work is priced."""

    costs: TierCosts
    size_of: SizeOf  # (layer, expert) -> bytes of its weights
    itemsize: int  # bytes per weight: an expert does 2 FLOP per weight per token
    fast_tier: str = "ram"  # "ram": misses are read from disk; "device": the fast tier is an accelerator
    # (layer, expert) -> bytes a disk read of it transfers (RAM tier): the checkpoint's, which are fewer than the
    # loaded ones when it is stored narrower than the compute dtype (bf16 run in fp32). None: size_of.
    read_size: SizeOf | None = None

    def __post_init__(self):
        if self.fast_tier not in ("ram", "device"):
            raise ValueError(f"fast_tier must be 'ram' or 'device', got {self.fast_tier!r}")

    def move_s(self, layer: int, expert: int) -> float:
        """Bringing one expert into the fast tier: a disk read (RAM tier) or a copy of its loaded weights (device)."""
        if self.fast_tier == "ram":
            return (self.read_size or self.size_of)(layer, expert) / self.costs.io_bandwidth
        return self.size_of(layer, expert) / self.costs.device.copy_bandwidth

    def cpu_s(self, tokens: int, nbytes: int) -> float:
        return self.costs.device.cpu_time(tokens, nbytes, 2.0 * nbytes / self.itemsize)

    def device_s(self, tokens: int, nbytes: int) -> float:
        return tokens * 2.0 * nbytes / self.itemsize / self.costs.device.device_flops


@dataclass(slots=True)
class Prediction:
    """Predicted seconds of one block's expert work."""

    io_s: float = 0.0  # disk reads (RAM tier) or host -> device copies
    cpu_s: float = 0.0  # experts computed on the CPU
    device_s: float = 0.0  # experts computed on the accelerator

    @property
    def total(self) -> float:
        return self.io_s + self.cpu_s + self.device_s


@dataclass(frozen=True, slots=True)
class TauChoice:
    tau: int
    predicted: dict[int, Prediction] = field(default_factory=dict)  # candidate tau -> its prediction

    def to_dict(self) -> dict:
        return {"tau": self.tau, "predicted_s": {t: p.total for t, p in self.predicted.items()}}


Prices = list[dict[int, dict[int, tuple[float, float, float]]]]  # step -> layer -> expert -> (move, cpu, device) s


def prices(block: Block, m: BlockModel) -> Prices:
    """What each routed expert of each step would cost moved, on the CPU, or on the device (the same for every
    tau, so computed once)."""
    out = []
    for step in block:
        out.append({layer: {e: _price(m, layer, e, n) for e, n in tokens.items()} for layer, tokens in step.items()})
    return out


def _price(m: BlockModel, layer: int, e: int, tokens: int) -> tuple[float, float, float]:
    nbytes = m.size_of(layer, e)
    return m.move_s(layer, e), m.cpu_s(tokens, nbytes), m.device_s(tokens, nbytes)


def predict(block: Block, tau: int, start: RefreshPlacement, m: BlockModel, priced: Prices | None = None) -> Prediction:
    """Replay `block` with refreshes every `tau` steps from a copy of `start`; price what happens."""
    priced = priced or prices(block, m)
    placement, out = start.copy(), Prediction()
    for t, step in enumerate(block):
        for layer, tokens in step.items():
            cost = priced[t][layer]
            if t % tau == 0:
                out.io_s += sum(cost[e][0] for e in placement.refresh(layer, tokens).promote)
            fast = placement.fast(layer)
            for e, (move, cpu, device) in cost.items():
                if m.fast_tier == "ram":  # computed on the CPU either way; outside the fast set, streamed first
                    out.cpu_s += cpu
                    out.io_s += 0.0 if e in fast else move
                elif e in fast:
                    out.device_s += device
                else:
                    out.cpu_s += cpu
    return out


def candidates(steps: int, taus: tuple[int, ...] = CANDIDATES) -> list[int]:
    """The intervals worth comparing on a block of `steps` steps (all taus >= steps behave alike)."""
    return sorted({t for t in taus if t < steps} | {max(steps, 1)})


def choose_tau(block: Block, start: RefreshPlacement, m: BlockModel,
               taus: tuple[int, ...] = CANDIDATES) -> TauChoice:
    """The candidate with the least predicted time; among (numerically) equal ones the longest interval, which
    refreshes least."""
    priced = prices(block, m)
    predicted = {t: predict(block, t, start, m, priced) for t in candidates(len(block), taus)}
    best = min(p.total for p in predicted.values())
    tau = max(t for t, p in predicted.items() if p.total <= best * (1 + 1e-9))
    return TauChoice(tau, predicted)
