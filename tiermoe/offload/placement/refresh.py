"""TIDE's interval-based expert refresh (arXiv 2605.20179): which experts sit in the fast tier, and when that changes.

Within a diffusion block the same positions are denoised again and again, so consecutive steps route to nearly the
same experts. TIDE therefore does not re-place experts every step: at a *refresh* step it counts the tokens each
expert got in each layer and moves the fast tier toward the busiest experts; at the *reuse* steps in between the
placement is frozen, and a routed expert outside the fast tier is computed where it lives (CPU) or streamed through
without being admitted (RAM tier). Refreshes happen at every step of a request's first generated block, then every
`tau` steps of each block (its first step included).

NOTE: like a cache policy, `RefreshPlacement` is bookkeeping only (no weights): the live stores move tensors as the
`Move`s it returns say, and the tau solver replays the very same object over recorded routing to predict costs.
The decoder drives the refresh/reuse rhythm through `RefreshSchedule`, which tells the store before every step's
forward (`ExpertStore.begin_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tiermoe.errors import ConfigError

SizeOf = Callable[[int, int], int]  # (layer, expert) -> bytes


@dataclass(frozen=True, slots=True)
class Move:
    """What one refresh changed in one layer's fast set."""

    promote: tuple[int, ...] = ()  # experts brought into the fast tier, most tokens first
    demote: tuple[int, ...] = ()  # experts sent back to make room for them, fewest tokens first


class RefreshPlacement:
    """Per MoE layer, the set of experts in the fast tier, under `capacity` bytes per layer.

    A refresh ranks the layer's routed experts by tokens (most first, ties by id) and promotes them while they fit;
    when the layer is full, a resident is demoted only for an expert with strictly more tokens this step, coldest
    first (residents not routed this step count 0 tokens). So a refresh never promotes more than the capacity,
    demotes only what must make room, and never swaps equals (no churn on ties).
    """

    def __init__(self, capacity: int, size_of: SizeOf | None = None):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity  # bytes per layer (items when size_of is None)
        self.size_of = size_of or (lambda layer, expert: 1)
        self._fast: dict[int, dict[int, int]] = {}  # layer -> {expert: size}

    def fast(self, layer: int) -> frozenset[int]:
        """The layer's experts in the fast tier."""
        return frozenset(self._fast.get(layer, ()))

    def is_fast(self, layer: int, expert: int) -> bool:
        return expert in self._fast.get(layer, ())

    def used(self, layer: int) -> int:
        return sum(self._fast.get(layer, {}).values())

    def refresh(self, layer: int, tokens: Mapping[int, int]) -> Move:
        """Move the layer's fast set toward the experts with the most tokens this step; returns what moved."""
        fast = self._fast.setdefault(layer, {})
        room = self.capacity - sum(fast.values())
        coldest = sorted(fast, key=lambda e: (tokens.get(e, 0), -e))  # demotion order
        promote, demote = [], []
        for e in sorted((e for e in tokens if e not in fast), key=lambda e: (-tokens[e], e)):
            size = self.size_of(layer, e)
            if size > self.capacity:
                continue  # can never be in this tier
            freed = self._victims(coldest, tokens, tokens[e], size - room, layer)
            if freed is None:
                break  # later candidates have no more tokens (and, within a layer, the same size): none would fit
            for v in freed:
                room += fast.pop(v)
                demote.append(v)
            del coldest[:len(freed)]
            fast[e] = size
            room -= size
            promote.append(e)
        return Move(tuple(promote), tuple(demote))

    def _victims(self, coldest: list[int], tokens: Mapping[int, int], than: int, need: int,
                 layer: int) -> list[int] | None:
        """The coldest residents, each with fewer than `than` tokens, that free `need` bytes; None if impossible."""
        freed, i = [], 0
        while need > 0:
            if i == len(coldest) or tokens.get(coldest[i], 0) >= than:
                return None
            need -= self.size_of(layer, coldest[i])
            freed.append(coldest[i])
            i += 1
        return freed

    def drop(self, layer: int, expert: int) -> None:
        """Forget an expert the store could not keep (its read failed)."""
        self._fast.get(layer, {}).pop(expert, None)

    def copy(self) -> RefreshPlacement:
        """An independent placement in the same state (the solver replays candidates from the live state)."""
        twin = RefreshPlacement(self.capacity, self.size_of)
        twin._fast = {layer: dict(fast) for layer, fast in self._fast.items()}
        return twin


@dataclass(frozen=True, slots=True)
class DenoiseStep:
    """What the decoder tells the store before a denoising step's forward."""

    block: int  # generated block of the request, 0 = the first
    step: int  # denoising step within the block, 0 = the first
    refresh: bool  # True: update the placement from this step's routing; False: reuse it


Tau = int | str  # a refresh interval in steps, or "auto"


def check_tau(tau: Tau | None) -> None:
    """tau is None (no refresh placement), a positive int, or "auto"."""
    if tau is None or tau == "auto":
        return
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ConfigError(f"tau must be a positive number of steps or 'auto', got {tau!r}")


class RefreshSchedule:
    """One request's refresh rhythm: every step of its first generated block, then every `tau`-th step of a block.

    With tau "auto" the interval is asked of `solver` once the first block is done (its steps, all refreshes, are
    the routing statistics the solver needs). `store.begin_step` is told the outcome before each forward.
    """

    def __init__(self, tau: Tau, store, solver: Callable[[], int] | None = None):
        check_tau(tau)
        if tau == "auto" and solver is None:
            raise ConfigError("tau='auto' needs an expert store with a refresh placement (set an expert budget)")
        self.tau, self.store, self.solver = tau, store, solver
        self.refreshes = 0

    def begin_step(self, block: int, step: int) -> DenoiseStep:
        """Called by the decoder before the forward of `step` of generated block `block`."""
        if block > 0 and self.tau == "auto":
            self.tau = self.solver()
        refresh = block == 0 or step % self.tau == 0
        self.refreshes += refresh
        s = DenoiseStep(block, step, refresh)
        self.store.begin_step(s)
        return s

    @property
    def interval(self) -> int | None:
        """The interval in use after the first block (None while "auto" is still unsolved)."""
        return self.tau if isinstance(self.tau, int) else None
