"""What the engine is made of besides the model: the expert store a config asks for, and the EOS ids."""

from __future__ import annotations

import json
from pathlib import Path

from tiermoe.config import EngineConfig
from tiermoe.errors import ConfigError
from tiermoe.offload.accelerator import AcceleratorStore, profile_costs
from tiermoe.offload.budget import parse_budget
from tiermoe.offload.policies import POLICIES, make_policy
from tiermoe.offload.refresh_accelerator import RefreshAcceleratorStore
from tiermoe.offload.refresh_store import RefreshStore
from tiermoe.offload.static_store import STATIC, StaticStore
from tiermoe.offload.store import ExpertStore, ResidentStore, loaded_nbytes
from tiermoe.offload.tiered_store import TieredStore


def make_store(config: EngineConfig, index, model) -> ExpertStore:
    """All-resident store without a budget, else the RAM tier over the checkpoint files; under an accelerator tier
    when `gpu_expert_cache` is set."""
    dtype = config.torch_dtype
    total = sum(loaded_nbytes(spec, dtype) for spec in index.experts().values())
    layers = [b.layer for b in model.moe_blocks]
    if config.expert_cache is None:
        store = ResidentStore(index, dtype)
    elif config.tau is not None and config.gpu_expert_cache is None:  # TIDE with RAM as the fast tier
        store = RefreshStore(index, dtype, min(parse_budget(config.expert_cache, total), total), layers,
                             model.shape.top_k, config.io_threads, config.direct_io)
    elif config.cache_policy == STATIC:  # a calibrated set pinned in RAM, the rest streamed
        store = StaticStore.calibrated(index, dtype, min(parse_budget(config.expert_cache, total), total), layers,
                                       model.shape.top_k, config.io_threads, config.direct_io)
    else:
        store = TieredStore(index, dtype, min(parse_budget(config.expert_cache, total), total),
                            live_policy(config), [b.layer for b in model.moe_blocks], model.shape.top_k,
                            config.io_threads, config.direct_io)
    if config.gpu_expert_cache is None:
        return store
    device = config.torch_device
    if config.tau is not None:  # TIDE with the accelerator as the fast tier
        return RefreshAcceleratorStore(store, device, parse_budget(config.gpu_expert_cache, total), layers, dtype)
    return AcceleratorStore(store, device, parse_budget(config.gpu_expert_cache, total),
                            live_policy(config), profile_costs(device))


def cap_read_buffers(store: ExpertStore, nbytes: int) -> None:
    """Let the direct-I/O reader of a RAM tier keep at most `nbytes` of read buffers idle (one per I/O thread, what
    a memory plan reserves for reads in flight) instead of its default 256 MiB."""
    reader = getattr(store, "reader", None) or getattr(getattr(store, "host", None), "reader", None)
    if reader is not None:
        reader.pool.max_bytes = nbytes


def refuse_offloading(config: EngineConfig, model_type: str) -> None:
    """A model without routed experts (LLaDA) has nothing to offload: an option that would do nothing is refused."""
    given = [o for o in ("expert_cache", "gpu_expert_cache", "prefetch", "tau", "memory_limit") if config.given(o)]
    if given:
        raise ConfigError(f"{', '.join(given)}: expert offloading applies to models with routed experts, and "
                          f"{model_type} has none (all its weights stay resident)")


def live_policy(config: EngineConfig):
    """The configured cache policy; it must run without knowing the future."""
    name = config.cache_policy or "lru"
    if name not in POLICIES or POLICIES[name].needs_future:
        live = [n for n, p in sorted(POLICIES.items()) if not p.needs_future]
        raise ConfigError(f"cache_policy {name!r} cannot run live; choose one of {', '.join(live)}, or {STATIC} "
                          "(a calibrated set, RAM tier only)")
    return make_policy(name, **({} if config.learned_weights is None else {"weights": config.learned_weights}))


def eos_token_ids(folder: Path, config: dict, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
