"""What a simulated run is asked (`SimConfig`), what it gives back (`SimResult`), and the expert budgets of GPU
and RAM a configuration leaves on a machine (`budgets`); tiermoe.sim.machine_sim runs it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tiermoe.sim import strategies as S
from tiermoe.sim.hardware import Hardware
from tiermoe.sim.model_shape import ModelShape

HOST_RESERVE = 2 << 30  # RAM left to the OS and the engine's own buffers when the expert budget is derived from --ram


@dataclass(frozen=True, slots=True)
class SimConfig:
    strategy: str = "tiermoe"
    gpu_memory: int | None = None  # bytes of GPU memory the engine may use (None: the profile's; 0: no GPU)
    ram: int | None = None  # bytes of RAM the engine may use (None: the profile's)
    expert_cache: int | None = None  # RAM bytes for experts (None: `ram` less the dense weights and a reserve)
    cache_policy: str = "lru"  # the RAM tier's policy (the engine's cache_policy)
    batch: int = 1
    phase: str = "decode"  # "decode" or "prefill"
    prefetch: str = "off"  # "off" or "oracle"
    threads: int | None = None  # CPU threads (None: all cores)
    n_cpu_moe: int | None = None  # llamacpp: layers whose experts stay on the CPU (None: as few as fit)
    tau: int = 8  # tide: refresh interval in steps
    io_threads: int = 4  # the engine's io_threads: reads the RAM tier streams at once
    sequences: int | None = None  # replay only the first N sequences
    max_tokens: int | None = None  # decode rows per sequence
    prompt_tokens: int = 32  # a trace without prefill rows: the first N rows of a sequence stand for its prompt
    calibration: float = 0.1  # fiddler: share of the sequences (the first) whose routing counts choose its set
    warmup: int = 0  # replay the first N sequences untimed (caches warm, as a serving process's would be)
    # Warm start: the tiers start full, the most used experts of the calibration share first (the RAM tier takes
    # every expert when they all fit, as an all-resident engine whose experts were read before timing; the GPU
    # tier of a dynamic strategy starts where fiddler's static set is, then adapts).
    preload: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in S.STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(S.STRATEGIES)}")
        if self.phase not in ("decode", "prefill"):
            raise ValueError(f"phase must be 'decode' or 'prefill', got {self.phase!r}")
        if self.prefetch not in ("off", "oracle"):
            raise ValueError(f"prefetch must be 'off' or 'oracle', got {self.prefetch!r}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")


@dataclass
class SimResult:
    """What one simulated run did and how long it took."""

    strategy: str
    hardware: str
    model: str
    phase: str
    batch: int
    tokens: int  # decode: generated tokens; prefill: prompt tokens
    seconds: float
    tokens_per_s: float
    gpu_expert_budget: int
    ram_expert_budget: int
    hits: int  # RAM tier, as the live store counts them
    misses: int
    streamed: int
    prefetched: int
    bytes_read: int
    placements: dict[str, int] = field(default_factory=dict)  # gpu / copy / cpu
    busy_s: dict[str, float] = field(default_factory=dict)  # per resource
    notes: list[str] = field(default_factory=list)
    evictions: int = 0  # RAM tier: residents freed (the policy's, the stream window's, TIDE's demotions)

    def to_dict(self) -> dict:
        return asdict(self)


def budgets(hw: Hardware, shape: ModelShape, cfg: SimConfig) -> tuple[int, int, bool]:
    """(GPU expert bytes, RAM expert bytes, whether a GPU is used). The GPU holds the dense weights first."""
    gpu_total = 0 if hw.gpu is None else int(hw.gpu.memory_gib * 2**30) if cfg.gpu_memory is None else cfg.gpu_memory
    use_gpu = gpu_total > 0
    gpu_experts = max(0, gpu_total - shape.dense_bytes - (1 << 30)) if use_gpu else 0  # 1 GiB: KV, activations
    if use_gpu and gpu_total < shape.dense_bytes:
        raise ValueError(f"{gpu_total / 2**30:.1f} GiB of GPU memory does not hold the model's dense weights "
                         f"({shape.dense_bytes / 2**30:.1f} GiB)")
    ram_total = int(hw.ram_gib * 2**30) if cfg.ram is None else cfg.ram
    on_host = 0 if use_gpu and not hw.gpu.unified else shape.dense_bytes
    ram_experts = cfg.expert_cache if cfg.expert_cache is not None else ram_total - on_host - HOST_RESERVE
    return gpu_experts, min(max(ram_experts, 0), shape.total_expert_bytes), use_gpu
