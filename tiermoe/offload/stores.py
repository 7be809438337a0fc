"""The expert store an engine runs, declared from its config: a host tier (RAM over the SSD, placed by a cache
policy, by TIDE's refresh, or by a calibrated static set; or everything resident) under an optional accelerator tier.

A new tier or placement is one entry in HOST_TIERS / DEVICE_TIERS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tiermoe.checkpoint import CheckpointIndex
from tiermoe.config import EngineConfig
from tiermoe.errors import ConfigError
from tiermoe.offload.placement.refresh_accelerator import RefreshAcceleratorStore
from tiermoe.offload.placement.refresh_store import RefreshStore
from tiermoe.offload.placement.static_store import STATIC, StaticStore
from tiermoe.offload.policies import POLICIES, CachePolicy, make_policy
from tiermoe.offload.tiers.accelerator import AcceleratorStore, profile_costs
from tiermoe.offload.tiers.budget import parse_budget
from tiermoe.offload.tiers.ram import TieredStore
from tiermoe.offload.tiers.store import ExpertStore, ResidentStore, loaded_nbytes


@dataclass(frozen=True)
class StoreArgs:
    """What every tier is built from."""

    config: EngineConfig
    index: CheckpointIndex
    dtype: torch.dtype
    layers: list[int]  # the model's MoE layers
    top_k: int
    total: int  # bytes of all experts in the compute dtype

    def budget(self, option: str) -> int:
        return min(parse_budget(getattr(self.config, option), self.total), self.total)

    def host(self, cls):
        """A RAM tier of class `cls` with the expert budget, reading with the configured I/O."""
        c = self.config
        return cls(self.index, self.dtype, self.budget("expert_cache"), self.layers, self.top_k, c.io_threads,
                   c.direct_io)


HOST_TIERS: dict[str, Callable[[StoreArgs], ExpertStore]] = {
    "resident": lambda a: ResidentStore(a.index, a.dtype),
    "refresh": lambda a: a.host(RefreshStore),  # TIDE with RAM as the fast tier
    "static": lambda a: a.host(StaticStore.calibrated),  # a calibrated set pinned in RAM, the rest streamed
    "policy": lambda a: TieredStore(a.index, a.dtype, a.budget("expert_cache"), live_policy(a.config), a.layers,
                                    a.top_k, a.config.io_threads, a.config.direct_io),
}

DEVICE_TIERS: dict[str, Callable[[StoreArgs, ExpertStore], ExpertStore]] = {
    "refresh": lambda a, host: RefreshAcceleratorStore(host, a.config.torch_device, a.budget("gpu_expert_cache"),
                                                       a.layers, a.dtype),  # TIDE with the accelerator as fast tier
    "policy": lambda a, host: AcceleratorStore(host, a.config.torch_device, a.budget("gpu_expert_cache"),
                                               live_policy(a.config), profile_costs(a.config.torch_device)),
}


def host_placement(config: EngineConfig) -> str:
    """Which HOST_TIERS entry the config asks for."""
    if config.expert_cache is None:
        return "resident"
    if config.tau is not None and config.gpu_expert_cache is None:
        return "refresh"
    return "static" if config.cache_policy == STATIC else "policy"


def make_store(config: EngineConfig, index: CheckpointIndex, layers: list[int], top_k: int) -> ExpertStore:
    """The host tier, under the accelerator tier when `gpu_expert_cache` is set."""
    total = sum(loaded_nbytes(spec, config.torch_dtype) for spec in index.experts().values())
    args = StoreArgs(config, index, config.torch_dtype, layers, top_k, total)
    store = HOST_TIERS[host_placement(config)](args)
    if config.gpu_expert_cache is None:
        return store
    return DEVICE_TIERS["refresh" if config.tau is not None else "policy"](args, store)


def live_policy(config: EngineConfig) -> CachePolicy:
    """The configured cache policy; it must run without knowing the future."""
    name = config.cache_policy or "lru"
    if name not in POLICIES or POLICIES[name].needs_future:
        live = [n for n, p in sorted(POLICIES.items()) if not p.needs_future]
        raise ConfigError(f"cache_policy {name!r} cannot run live; choose one of {', '.join(live)}, or {STATIC} "
                          "(a calibrated set, RAM tier only)")
    return make_policy(name, **({} if config.learned_weights is None else {"weights": config.learned_weights}))


def cap_read_buffers(store: ExpertStore, nbytes: int) -> None:
    """Let the direct-I/O reader of a RAM tier keep at most `nbytes` of read buffers idle (one per I/O thread, what
    a memory plan reserves for reads in flight) instead of its default 256 MiB."""
    reader = getattr(store, "reader", None) or getattr(getattr(store, "host", None), "reader", None)
    if reader is not None:
        reader.pool.max_bytes = nbytes
