"""How stable a layer's expert activations are across the denoising steps of a block (TIDE's premise).

Between step s and step s + lag of the same block, per MoE layer:
- Jaccard of the routed expert sets, |A & B| / |A | B|;
- cosine of the tokens-per-expert vectors (what a refresh ranks by; the TIDE paper reports ~0.985 at lag 1);
- top overlap: the share of step s's `top` busiest experts still among step s + lag's `top` busiest (what a fast
  tier of `top` experts refreshed at s keeps getting right).

Steps are StepRouting dicts (tiermoe.offload.placement.routing_log). A block's step 0 may also run other rows (LLaDA2
writes the previous block's final K/V, or the prompt, in the same forward), so `skip_first` leaves it out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tiermoe.offload.placement.routing_log import Block

Counts = Mapping[int, int]  # expert -> tokens


@dataclass(frozen=True, slots=True)
class Stability:
    """Means over the step pairs measured."""

    jaccard: float
    cosine: float
    top_overlap: float
    pairs: int  # (step, step + lag) pairs measured

    def to_dict(self) -> dict:
        return {"jaccard": self.jaccard, "cosine": self.cosine, "top_overlap": self.top_overlap,
                "pairs": self.pairs}


def jaccard(a: Counts, b: Counts) -> float:
    union = len(a.keys() | b.keys())
    return len(a.keys() & b.keys()) / union if union else 1.0


def cosine(a: Counts, b: Counts) -> float:
    dot = sum(n * b.get(e, 0) for e, n in a.items())
    norm = math.sqrt(sum(n * n for n in a.values()) * sum(n * n for n in b.values()))
    return dot / norm if norm else 1.0


def busiest(counts: Counts, k: int) -> set[int]:
    """The k experts with the most tokens (ties by id, as a refresh ranks them)."""
    return set(sorted(counts, key=lambda e: (-counts[e], e))[:k])


def top_overlap(a: Counts, b: Counts, k: int) -> float:
    top_a = busiest(a, k)
    return len(top_a & busiest(b, k)) / len(top_a) if top_a else 1.0


def layer_stability(blocks: list[Block], lag: int = 1, top: int = 8, skip_first: bool = False) -> dict[int, Stability]:
    """Per MoE layer, the mean similarity of steps `lag` apart within the same block."""
    sums: dict[int, list[float]] = {}  # layer -> [jaccard, cosine, top overlap, pairs]
    for block in blocks:
        steps = block[1:] if skip_first else block
        for s, t in zip(steps, steps[lag:], strict=False):
            for layer in s.keys() & t.keys():
                acc = sums.setdefault(layer, [0.0, 0.0, 0.0, 0])
                acc[0] += jaccard(s[layer], t[layer])
                acc[1] += cosine(s[layer], t[layer])
                acc[2] += top_overlap(s[layer], t[layer], top)
                acc[3] += 1
    return {layer: Stability(j / n, c / n, o / n, n) for layer, (j, c, o, n) in sorted(sums.items())}


def overall(per_layer: dict[int, Stability]) -> Stability:
    """Pair-weighted mean over layers."""
    n = sum(s.pairs for s in per_layer.values())
    if not n:
        return Stability(1.0, 1.0, 1.0, 0)
    return Stability(sum(s.jaccard * s.pairs for s in per_layer.values()) / n,
                     sum(s.cosine * s.pairs for s in per_layer.values()) / n,
                     sum(s.top_overlap * s.pairs for s in per_layer.values()) / n, n)
