"""Cache eviction policies: small objects with one interface (`base.CachePolicy`), driven alike by the live
store and the simulator. One registry: a new policy is one module here and one line in POLICIES."""

from __future__ import annotations

from typing import Any

from tiermoe.offload.policies.base import CachePolicy, Key
from tiermoe.offload.policies.classic import BeladyPolicy, LFUPolicy, LRUPolicy
from tiermoe.offload.policies.dali import DALIPolicy
from tiermoe.offload.policies.learned import LearnedPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "belady": BeladyPolicy,
    "dali": DALIPolicy,
    "learned": LearnedPolicy,
}

__all__ = ["POLICIES", "BeladyPolicy", "CachePolicy", "DALIPolicy", "Key", "LFUPolicy", "LRUPolicy", "LearnedPolicy",
           "make_policy"]


def make_policy(name: str, **kw: Any) -> CachePolicy:
    """Builds the policy registered as `name` (case-insensitive) with keyword arguments `kw`."""
    cls = POLICIES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown cache policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    return cls(**kw)
