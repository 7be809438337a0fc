"""Hardware profiles: what a machine's GPU, CPU, RAM, link and disk can do, as data the simulator prices work with.

A profile is one JSON file (the presets live in `tiermoe/sim/hardware/`, each with the sources of its figures):

    name, description, ram_gib, dram_gbs, sources
    cpu   {name, cores, gemv_gbs {threads: GB/s}, gemm_gflops {threads: GFLOP/s}, call_us,
           engine-measured (optional): kernel_gbs {dtype: {row length: {rows: GB/s}}}, linear_us / swiglu_us
           {dtype: {rows: us}}, attention {decode_us, decode_gflops, block_us, block_gflops},
           engine {expert_us, batch_expert_us, layer_us, block_layer_us, layer_row_us, step_us, denoise_us, logit_ns,
           read_us, read_wait, sample_ns, group_us, single_us (optional)},
           cold_mib, attention_cold, engine_cold (optional: the same measured with every kernel call streaming
           cold_mib MiB first; attention with its keys and values from beyond the caches), long_gbs {dtype: {row
           length: {rows: GB/s}}} (optional: a product's bytes beyond LONG_FROM), store {kind: {request_us, key_us,
           read_us, evict_us, refresh_us, load_us, expert_bytes, read_slowdown (policies)}} (optional: the RAM
           tier's own costs, tiermoe.sim.store_probe), grouped_us {dtype: {rows: us}} (optional: the grouped
           expert kernel's fixed cost per expert)}
    gpu   {name, memory_gib, bf16_tflops, mem_gbs, link_gbs, link, unified, launch_us} or null (no GPU)
    ssd   {name, seq_read_gbs, rand_read_gbs, read_iops, rand_read_qd1_gbs (optional),
           read_latency_us, read_latency_qd1_us (optional, 0)}

`gemv_gbs` is the rate the CPU streams weights through a matrix-vector product (batch-1 decode is bound by it),
`gemm_gflops` its matrix-matrix rate (prefill, large batches), `call_us` the fixed cost of one operator call (what
dominates small models in an eager engine). `rand_read_gbs` is for MiB-sized random reads a few in flight (one
expert per read, as the stores issue them). `tiermoe profile` measures this machine into a profile
(`measure_this_machine`).

A measured profile also holds the engine's own costs (tiermoe.sim.engine_probe, one thread): its kernels' rates by
dtype, row length and rows of activations, their fixed cost per call, its attention core as fixed cost + FLOP rate,
and its fixed costs per routed expert, layer, row, forward and logit; the disk's reads as a fixed time per read plus
bytes at `rand_read_gbs` (`read_latency_us`). The simulator then prices a step as the engine spends it
(tiermoe.sim.costs). The presets leave them out (their figures are vendors' and reviewers', not this engine's): they
are priced with the GEMV rate and operator-call counts, reads at the bandwidth alone.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from tiermoe.sim.cache_cold import COLD_MIB, KV_RING_MIB

GB = 1e9
LONG_FROM = 2 << 20  # a product's bytes beyond this many stream at the profile's `long_gbs` (a head, a projection)


@dataclass(frozen=True, slots=True)
class CPUProfile:
    name: str
    cores: int
    gemv_gbs: dict[int, float]  # threads -> GB/s of weights streamed through a GEMV
    gemm_gflops: dict[int, float]  # threads -> GFLOP/s of a large matrix-matrix product
    call_us: float = 2.0  # fixed cost of one operator call, microseconds
    # the engine's own costs at one thread (None: not measured, priced from the figures above)
    kernel_gbs: dict[str, dict[int, dict[int, float]]] | None = None  # dtype -> row length -> rows -> GB/s
    linear_us: dict[str, dict[int, float]] | None = None  # dtype -> rows -> fixed us of one linear kernel call
    swiglu_us: dict[str, dict[int, float]] | None = None  # ... of one fused expert kernel call
    attention: dict[str, float] | None = None  # decode_us, decode_gflops, block_us, block_gflops
    engine: dict[str, float] | None = None  # fixed costs, see tiermoe.sim.engine_probe.engine_overheads
    # fixed costs measured again with each kernel call streaming `cold_mib` MiB through the caches first, as a real
    # model's products do, and attention with its keys and values read from beyond the caches, as a real model's
    # forward leaves them (None, 0: not measured; costs are then taken as measured above)
    cold_mib: float = 0.0
    attention_cold: dict[str, float] | None = None
    engine_cold: dict[str, float] | None = None
    # dtype -> row length -> rows -> GB/s of a product's bytes beyond LONG_FROM (None: at `kernel_gbs`)
    long_gbs: dict[str, dict[int, dict[int, float]]] | None = None
    # the RAM tier's own costs per store kind (a cache policy's name, or "tide"), see tiermoe.sim.store_probe
    # (None: not measured; a read then costs the model's thread `engine["read_us"]`)
    store: dict[str, dict[str, float]] | None = None
    # dtype -> rows -> fixed us per expert of the grouped kernel (a batched forward's experts in one call; None: not
    # measured, each expert priced as a `swiglu_us` call)
    grouped_us: dict[str, dict[int, float]] | None = None

    def __post_init__(self) -> None:
        for table in ("gemv_gbs", "gemm_gflops"):
            value = {int(k): float(v) for k, v in getattr(self, table).items()}
            if not value:
                raise ValueError(f"cpu.{table} needs at least one thread count")
            object.__setattr__(self, table, dict(sorted(value.items())))
        for table in ("kernel_gbs", "long_gbs"):  # JSON keys are strings
            if getattr(self, table) is not None:
                object.__setattr__(self, table, {d: {int(k): _ints(v) for k, v in by_k.items()}
                                                 for d, by_k in getattr(self, table).items()})
        for table in ("linear_us", "swiglu_us", "grouped_us"):
            if getattr(self, table) is not None:
                object.__setattr__(self, table, {d: _ints(v) for d, v in getattr(self, table).items()})
        engine_measured = (self.kernel_gbs, self.linear_us, self.swiglu_us, self.attention, self.engine)
        if any(v is None for v in engine_measured) and any(v is not None for v in engine_measured):
            raise ValueError("cpu: kernel_gbs, linear_us, swiglu_us, attention and engine go together "
                             "(`tiermoe profile` measures them all)")

    @property
    def engine_measured(self) -> bool:
        """Whether the profile holds the engine's own costs (a `tiermoe profile` of this engine)."""
        return self.kernel_gbs is not None

    def cold_share(self, nbytes: int) -> float:
        """How far toward the cold fixed costs a model whose kernel calls stream `nbytes` each is priced: its
        bytes over the cold measurement's (linear in between), 1 beyond it, 0 without cold ones."""
        if not self.cold_mib or self.engine_cold is None or self.attention_cold is None:
            return 0.0
        return min(nbytes / (self.cold_mib * 2**20), 1.0)

    def kv_cold_share(self, forward_bytes: int) -> float:
        """How far toward the cold attention a model is priced whose forwards stream `forward_bytes` between two
        reads of a layer's keys and values: over the bytes read between two reads of a pair in the cold measurement
        (cache_cold.KV_RING_MIB; linear in between), 1 beyond, 0 without cold measurements."""
        if self.attention_cold is None:
            return 0.0
        return min(forward_bytes / (KV_RING_MIB * 2**20), 1.0)

    def gemv_bandwidth(self, threads: int) -> float:
        """Bytes/s at `threads` threads (the nearest measured count at or below it)."""
        return _at(self.gemv_gbs, threads) * GB

    def gemm_flops(self, threads: int) -> float:
        return _at(self.gemm_gflops, threads) * GB


@dataclass(frozen=True, slots=True)
class GPUProfile:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense tensor-core rate
    mem_gbs: float  # device memory bandwidth
    link_gbs: float  # pinned host -> device copies
    link: str = ""
    unified: bool = False  # shares RAM with the CPU: no copy needed, RAM bandwidth shared
    launch_us: float = 5.0  # fixed cost of one kernel launch


@dataclass(frozen=True, slots=True)
class SSDProfile:
    name: str
    seq_read_gbs: float
    rand_read_gbs: float  # MiB-sized random reads, a few in flight
    read_iops: float  # 4 KiB random reads per second
    rand_read_qd1_gbs: float | None = None  # the same reads one at a time (None: half of rand_read_gbs)
    read_latency_us: float = 0.0  # fixed time per read besides its bytes at rand_read_gbs (a few in flight)
    read_latency_qd1_us: float = 0.0  # ... one at a time, besides its bytes at qd1_read_gbs

    @property
    def qd1_read_gbs(self) -> float:
        return self.rand_read_qd1_gbs or self.rand_read_gbs / 2


@dataclass(frozen=True, slots=True)
class Hardware:
    """One machine."""

    name: str
    ram_gib: float
    dram_gbs: float
    cpu: CPUProfile
    ssd: SSDProfile
    gpu: GPUProfile | None = None
    description: str = ""
    sources: list[str] = field(default_factory=list)
    measured: str | None = None  # when `tiermoe profile` measured it (None for a preset)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Hardware:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown hardware profile fields {unknown}; known: {sorted(known)}")
        gpu = d.get("gpu")
        return cls(**{**d, "cpu": CPUProfile(**d["cpu"]), "ssd": SSDProfile(**d["ssd"]),
                      "gpu": GPUProfile(**gpu) if gpu else None})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def _ints(table: dict) -> dict[int, float]:
    return dict(sorted((int(k), float(v)) for k, v in table.items()))


def _at(table: dict[int, float], threads: int) -> float:
    below = [t for t in table if t <= threads]
    return table[max(below)] if below else table[min(table)]


def presets() -> list[str]:
    """Names of the shipped profiles."""
    folder = resources.files("tiermoe.sim") / "hardware"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_hardware(name_or_path: str | Path) -> Hardware:
    """A preset by name (`rtx4090`) or a profile file (`tiermoe profile --out FILE` writes one)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ValueError(f"hardware profile {path} not found")
        text = path.read_text()
    else:
        if str(name_or_path) not in presets():
            raise ValueError(f"unknown hardware {name_or_path!r}: give a profile file or one of {', '.join(presets())}")
        text = (resources.files("tiermoe.sim") / "hardware" / f"{name_or_path}.json").read_text()
    try:
        return Hardware.from_dict(json.loads(text))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"hardware profile {name_or_path} is malformed: {e}") from None


# --- measuring this machine --------------------------------------------------------------------------------------


def measure_this_machine(disk_dir: Path | None = None, read_bytes: int = 1 << 20, name: str = "this-machine",
                         file_mib: int = 256, kernel_mib: int = 128, disk_file: Path | None = None,
                         store_model: Path | None = None, policies=("lru", "dali")) -> Hardware:
    """Measures this machine (one to two minutes): per thread count, CPU GEMV over more weights than the caches hold
    and GEMM with the engine's cost probe (`tiermoe.offload.tiers.accelerator.profile_costs`); per-call overhead, DRAM
    copy rate, and the disk (`measure_disk`: `disk_file` if given, else a file written in `disk_dir`); at one
    thread, the engine's own kernels (over `kernel_mib` MiB of weights), attention and fixed costs
    (tiermoe.sim.engine_probe), hot and with each kernel call streaming weights through the caches; the RAM tier's
    own costs with each of `policies` on `store_model`'s checkpoint (default: the shipped model) and TIDE's on the
    shipped diffusion model (tiermoe.sim.store_probe)."""
    import torch

    from tiermoe.offload.tiers.accelerator import profile_costs
    from tiermoe.sim.engine_probe import attention_costs, engine_overheads, kernel_rates
    from tiermoe.sim.store_probe import store_costs

    threads0 = torch.get_num_threads()
    counts = sorted({1, *(2**i for i in range(1, 8) if 2**i <= (os.cpu_count() or 1)), os.cpu_count() or 1})
    gemv, gemm = {}, {}
    try:
        for t in counts:
            torch.set_num_threads(t)
            gemv[t], gemm[t] = _streamed_gemv() / GB, profile_costs(torch.device("cpu")).cpu_flops / GB
        torch.set_num_threads(threads0)
        call_us = _call_overhead_us()
        torch.set_num_threads(1)  # the engine's own costs, at one thread (other counts scale as the GEMV does)
        kernel_gbs, linear_us, swiglu_us, long_gbs, grouped_us = kernel_rates(total=kernel_mib << 20)
        attn, fixed = attention_costs(), engine_overheads()
        attn_cold, fixed_cold = attention_costs(cold=True), engine_overheads(cold_mib=COLD_MIB)
        store = store_costs(store_model, policies=policies)
    finally:
        torch.set_num_threads(threads0)
    dram = _copy_rate() / GB
    return Hardware(name, ram_gib=round(_ram_bytes() / 2**30, 1), dram_gbs=round(dram, 2),
                    cpu=CPUProfile(_cpu_name(), os.cpu_count() or 1, gemv, gemm, round(call_us, 2), kernel_gbs,
                                   linear_us, swiglu_us, attn, fixed, COLD_MIB, attn_cold, fixed_cold, long_gbs,
                                   store, grouped_us),
                    ssd=measure_disk(disk_file or disk_dir, read_bytes, file_mib),
                    gpu=_measure_gpu(), description="measured by `tiermoe profile`",
                    sources=["measured on this machine by `tiermoe profile` (tiermoe.sim.hardware)"],
                    measured=time.strftime("%Y-%m-%d %H:%M:%S"))


def measure_disk(where: Path | None, read_bytes: int = 1 << 20, file_mib: int = 256) -> SSDProfile:
    """The disk's direct reads (seconds): sequential, `read_bytes` reads at random offsets 4 in flight (issued and
    waited for together, as the stores issue a layer's misses) and one at a time, each as a fixed time per read plus
    bytes at a rate (from two read sizes), 4 KiB IOPS. `where`: a file to read (a checkpoint's expert file: the
    reads the engine makes, where they land), else a directory to write a `file_mib` MiB file in (None: the
    system's temporary one)."""
    if where is not None and Path(where).is_file():
        return _disk_profile(Path(where), read_bytes, "disk holding " + str(where))
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        probe = Path(tmp) / "probe.bin"
        _write_random(probe, file_mib << 20)
        return _disk_profile(probe, read_bytes, "disk holding " + str(where or tempfile.gettempdir()))


def _disk_profile(path: Path, read_bytes: int, name: str) -> SSDProfile:
    from tiermoe.offload.placement.costs import IO_DEPTH, io_bandwidth

    total = min(path.stat().st_size, 256 << 20)
    seq = io_bandwidth(path, 8 << 20, threads=1, total=total) / GB
    rand, lat = _reads(path, read_bytes, IO_DEPTH, total)
    qd1, lat1 = _reads(path, read_bytes, 1, total // 2)
    iops = io_bandwidth(path, 4096, threads=IO_DEPTH, total=4 << 20) / 4096
    return SSDProfile(name, round(seq, 3), round(rand, 3), round(iops), round(qd1, 3), round(lat, 1), round(lat1, 1))


def _reads(path: Path, read_bytes: int, depth: int, total: int, small: int = 64 << 10) -> tuple[float, float]:
    """(GB/s, fixed us per read) of direct reads at random offsets `depth` in flight, from the time per read at
    `small` bytes and at `read_bytes`: t(n) = fixed + n / rate (the engine reads experts from ~100 KB to MiBs, where
    the fixed part matters); when the two do not separate, the large reads' bandwidth and no fixed time."""
    if read_bytes <= small:
        return _random_reads(path, read_bytes, depth, total) / GB, 0.0
    per = [statistics.median(n / _random_reads(path, n, depth, total * n // read_bytes, seed) for seed in range(3))
           for n in (small, read_bytes)]  # the disk is shared: medians
    slope = (per[1] - per[0]) / (read_bytes - small)
    fixed = per[0] - small * slope
    if slope <= 0 or fixed < 0:
        return read_bytes / per[1] / GB, 0.0
    return 1 / slope / GB, fixed * 1e6


def _random_reads(path: Path, nbytes: int, depth: int, total: int, seed: int = 0) -> float:
    """Bytes/s of direct reads of `nbytes` at random page-aligned offsets of `path`, `depth` issued together and
    waited for together, `total` bytes in all."""
    import random

    from tiermoe.offload.placement.costs import read_rate
    from tiermoe.offload.tiers.direct_io import PAGE

    span = max(path.stat().st_size - nbytes, 0) // PAGE
    rng = random.Random(seed)
    return read_rate(path, [rng.randint(0, span) * PAGE for _ in range(max(depth, total // max(nbytes, 1)))], nbytes,
                     depth)


def _streamed_gemv(total: int = 256 << 20, each: int = 4 << 20) -> float:
    """Bytes/s of GEMVs over `total` bytes of fp32 weights, more than any cache holds (the engine's probe uses one
    matrix, which may stay in the last-level cache; experts streamed per token do not)."""
    import torch

    rows = each // 4 // 1024
    ws = [torch.randn(rows, 1024) for _ in range(total // each)]
    x = torch.randn(1, 1024)
    return total / _best(lambda: [x @ w.T for w in ws], reps=3)


def _copy_rate(nbytes: int = 256 << 20) -> float:
    """Bytes/s moved by a large copy, which reads and writes every byte."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best(lambda: dst.copy_(src))


def _call_overhead_us() -> float:
    """Microseconds of one tiny matrix-vector call: the per-operator floor of an eager engine."""
    import torch

    w, x = torch.randn(64, 64), torch.randn(1, 64)
    n = 2000
    return _best(lambda: [x @ w.T for _ in range(n)]) / n * 1e6


def _best(fn, reps: int = 5, pick=min) -> float:
    """The fastest (or `pick` of the) seconds of `reps` runs of `fn` after a warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return pick(times)


def _write_random(path: Path, nbytes: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(nbytes >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def _measure_gpu() -> GPUProfile | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from tiermoe.offload.tiers.accelerator import profile_costs

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    c = profile_costs(dev)
    x = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    bw = 2 * x.numel() / _best(lambda: (y.copy_(x), torch.cuda.synchronize())) / GB
    return GPUProfile(props.name, round(props.total_memory / 2**30, 1), c.device_flops / 1e12, round(bw, 1),
                      round(c.copy_bandwidth / GB, 2), "measured")


def _ram_bytes() -> int:
    try:
        return int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"
