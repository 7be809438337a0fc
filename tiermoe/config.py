"""Engine configuration, checked when constructed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tiermoe.errors import ConfigError
from tiermoe.models.sparse_spec import SparseAttention
from tiermoe.offload.placement.refresh import check_tau
from tiermoe.offload.tiers.budget import parse_budget

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(slots=True)
class EngineConfig:
    model: str | Path
    dtype: str = "float32"  # compute and resident-weight dtype: float32 or bfloat16
    max_model_len: int | None = None  # context limit; default: the model's max_position_embeddings
    threads: int | None = None  # torch intra-op threads; None = torch's default
    # Offloading. expert_cache=None keeps every expert resident once read; otherwise a RAM budget for routed
    # experts ("2GiB", "25%" of all expert bytes, or bytes) with the rest read from disk on demand.
    expert_cache: str | int | None = None
    cache_policy: str | None = None  # eviction policy (tiermoe.offload.policies.POLICIES); None: lru where one runs
    # Weights of cache_policy "learned" as `tiermoe policy train --out` writes them; None: the shipped weights.
    learned_weights: str | Path | None = None
    io_threads: int | None = None  # threads reading experts; None: 4, or top_k under a memory limit
    direct_io: bool = True  # O_DIRECT reads (the page cache would be RAM outside the budget)
    # Read the next MoE layer's predicted experts ahead: "residual" (DALI; needs `tiermoe calibrate`), "plain",
    # "affinity" (needs `tiermoe prefetch train`) or "off". None: plain wherever a cache policy places experts in RAM
    # (it helps there: bench/prefetch.py), else off.
    prefetch: str | None = None
    # Experts predicted per token. None: the prefetcher's own (1 for residual and plain, as DALI found best; the
    # count chosen on validation routing for affinity).
    prefetch_top_p: int | None = None
    # Accelerator: "cpu", "cuda" (or "cuda:N"), or "auto" (cuda when torch sees one). On an accelerator the dense
    # weights live there and `gpu_expert_cache` bytes of experts too; other experts run on the CPU or are promoted.
    device: str = "cpu"
    gpu_expert_cache: str | int | None = None
    # TIDE (diffusion models): re-place experts in the fast tier (gpu_expert_cache if set, else expert_cache) only
    # every `tau` denoising steps of a block, from that step's routing; "auto" solves tau from a cost model.
    # None: per-step caching by cache_policy.
    tau: int | str | None = None
    # A RAM limit for the whole engine ("650MB", bytes, or "auto": the cgroup's limit, else the RAM available): the
    # fixed footprint is measured after load and the rest becomes expert_cache (tiermoe.memory). None: no limit,
    # unless the cgroup's limit cannot hold the model resident, which then sizes the engine as "auto" would.
    memory_limit: str | int | None = None
    # Tokens one engine step may compute over all requests (longer prompts are prefilled in chunks). None: no cap,
    # or min(512, max_model_len) under a memory limit, which reserves their activations.
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256  # requests running at once; more wait their turn
    # Diffusion models: how requests share engine steps (tiermoe.engine.scheduler.DIFFUSION_POLICIES):
    # "fcfs-request" (one at a time), "fcfs" (batched, phase-blind) or "phase" (dLLM-Serve's phase-multiplexed).
    # None: "phase", or "fcfs-request" with tau. Autoregressive models batch continuously and refuse it.
    scheduler: str | None = None
    # Bytes of the paged KV cache shared by the running requests ("1GiB", bytes); a request that needs a block
    # when none is free preempts the latest one. None: what a memory limit reserves, else 1 GiB (at least one
    # max_model_len context).
    kv_cache_memory: str | int | None = None
    # Every row of a step computed as it would be alone (batch-invariant products and attention), so batching,
    # chunked prefill and preemption never change a request's tokens. False: torch's GEMM for large products.
    batch_invariant: bool = True
    # Block-diffusion models (llada2_moe): head-centric sparse attention (dLLM-Serve), "top_k=N": a block's light
    # denoising steps attend, per KV head, to the N prefix positions its first step attended to most. Approximate.
    # None: dense attention.
    sparse_attention: str | SparseAttention | None = None

    def __post_init__(self):
        self.model = Path(self.model)
        if not self.model.is_dir():
            raise ConfigError(f"model folder {self.model} does not exist")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.gpu_expert_cache is not None and self.torch_device.type != "cuda":
            raise ConfigError("gpu_expert_cache needs device='cuda' (or 'auto' on a machine with a GPU)")
        if self.prefetch_top_p is not None and self.prefetch_top_p < 1:
            raise ConfigError(f"prefetch_top_p must be >= 1, got {self.prefetch_top_p}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        for name in ("expert_cache", "gpu_expert_cache"):  # malformed or above 100%: refused before loading
            if getattr(self, name) is not None:
                try:
                    parse_budget(getattr(self, name), 0)
                except ConfigError as e:
                    raise ConfigError(f"{name}: {e}") from None
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.kv_cache_memory is not None:
            if str(self.kv_cache_memory).strip().endswith("%"):
                raise ConfigError(f"kv_cache_memory is a size (1GiB, 512MB) or bytes; got {self.kv_cache_memory!r}")
            parse_budget(self.kv_cache_memory, 0)
        self._check_memory_limit()
        if self.io_threads is not None and self.io_threads < 1:
            raise ConfigError(f"io_threads must be >= 1, got {self.io_threads}")
        self._check_tau()
        self._check_scheduler()
        self._check_static()
        if self.learned_weights is not None:
            self._check_learned_weights()
        self._check_offload_options()
        if self.sparse_attention is not None:
            self.sparse_attention = SparseAttention.parse(self.sparse_attention)

    @property
    def has_budget(self) -> bool:
        """Whether experts are offloaded: a RAM or accelerator budget, or a memory limit that sets one."""
        return not (self.expert_cache is None and self.gpu_expert_cache is None and self.memory_limit is None)

    def _check_memory_limit(self) -> None:
        if self.memory_limit is None:
            return
        if self.device != "cpu" or self.gpu_expert_cache is not None:
            raise ConfigError("memory_limit sizes the engine's RAM on CPU runs; with an accelerator give expert_cache "
                              "and gpu_expert_cache")
        if self.memory_limit != "auto":
            if str(self.memory_limit).strip().endswith("%"):
                raise ConfigError(f"memory_limit is a size (650MB, 2GiB), bytes, or 'auto'; got {self.memory_limit!r}")
            parse_budget(self.memory_limit, 0)

    def _check_learned_weights(self) -> None:
        from tiermoe.offload.policies.learned import LearnedWeights

        if self.cache_policy != "learned":
            policy = self.cache_policy or "lru"
            raise ConfigError(f"learned_weights are the learned cache policy's; cache_policy is {policy!r} "
                              "(set cache_policy='learned')")
        if not self.has_budget:
            raise ConfigError("learned_weights need an expert budget (expert_cache, memory_limit or gpu_expert_cache): "
                              "with every expert resident no cache policy runs")
        if self.tau is not None and self.gpu_expert_cache is None:
            raise ConfigError("learned_weights have no use with tau: TIDE's refresh places the experts, no cache "
                              "policy runs")
        try:
            LearnedWeights.load(self.learned_weights)
        except ValueError as e:
            raise ConfigError(f"learned_weights: {e}") from None
        self.learned_weights = Path(self.learned_weights)

    def _check_tau(self) -> None:
        check_tau(self.tau)
        if self.tau is not None and not self.has_budget:
            raise ConfigError("tau (TIDE's refresh interval) needs an expert budget: expert_cache, memory_limit or "
                              "gpu_expert_cache")

    def _check_scheduler(self) -> None:
        from tiermoe.engine.scheduler import DIFFUSION_POLICIES

        if self.scheduler is not None and self.scheduler not in DIFFUSION_POLICIES:
            raise ConfigError(f"scheduler must be one of {', '.join(DIFFUSION_POLICIES)}; got {self.scheduler!r}")
        if self.tau is not None and self.scheduler not in (None, "fcfs-request"):
            raise ConfigError(f"scheduler {self.scheduler!r} cannot run with tau: TIDE's refresh rhythm follows one "
                              "request's steps, so diffusion requests run one at a time (scheduler 'fcfs-request')")

    def _check_offload_options(self) -> None:
        """Placement options that would do nothing in the chosen setting are refused rather than ignored."""
        if not self.has_budget:
            why = "every expert stays resident without expert_cache or memory_limit"
        elif self.tau is not None and self.gpu_expert_cache is None:
            why = "with tau on the RAM tier TIDE's refresh places the experts"
        else:
            return
        given = [name for name in ("cache_policy", "prefetch") if self.given(name)]
        if given:
            raise ConfigError(f"{' and '.join(given)} would have no effect: {why}")

    def _check_static(self) -> None:
        """The static placement pins a calibrated set in the RAM budget: nothing else may place experts."""
        if self.cache_policy != "static":
            return
        if self.expert_cache is None and self.memory_limit is None:
            raise ConfigError("cache_policy 'static' needs an expert budget (expert_cache or memory_limit)")
        for name in ("tau", "gpu_expert_cache", "prefetch"):
            if self.given(name):
                raise ConfigError(f"cache_policy 'static' keeps a fixed calibrated set in RAM; it cannot be combined "
                                  f"with {name}")

    def given(self, name: str) -> bool:
        """Whether option `name` asks for something (prefetch "off" asks for nothing)."""
        return getattr(self, name) is not None and not (name == "prefetch" and self.prefetch == "off")

    @property
    def prefetcher(self) -> str | None:
        """The prefetcher that runs: as set, else plain wherever a cache policy places experts in RAM; None: none."""
        if self.prefetch is None:
            placed = self.expert_cache is not None and self.tau is None and self.cache_policy != "static"
            return "plain" if placed else None
        return None if self.prefetch == "off" else self.prefetch

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but torch sees no CUDA device")
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu, cuda[:N] or auto, got {self.device!r}")
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
