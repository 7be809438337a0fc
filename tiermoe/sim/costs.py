"""Seconds of each piece of work on a given machine and model: an expert on the CPU or GPU, a copy, a disk read, a
layer's dense part, the head. All from a `Hardware` profile and a `ModelShape`; no measurement here.

A matrix product is priced as the slower of streaming its weights and doing its FLOPs, plus a fixed cost per
operator call (the eager engine's dispatch, a GPU kernel launch): small models on a CPU are call-bound, batch-1
decode bandwidth-bound, prefill compute-bound. A profile that measured this engine's own costs (`tiermoe profile`)
prices the CPU's work the engine's way instead (tiermoe.sim.engine_costs); reads are a fixed time plus bytes at the
disk's rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiermoe.offload.tiers.placement_rule import DeviceCosts
from tiermoe.sim.engine_costs import EngineCosts
from tiermoe.sim.hardware import GB, Hardware
from tiermoe.sim.model_shape import ModelShape

EXPERT_CALLS = 2  # operator calls per expert on the engine's decode path (fused gate|up, then down)
LAYER_CALLS = 14  # per layer besides the experts: norms, q/k/v/o, rotary, attention, router, top-k, residuals
STEP_CALLS = 12  # per forward pass: embedding, final norm, head, sampling, bookkeeping
GPU_EFFICIENCY = 0.5  # share of the vendor's peak tensor FLOP/s that expert-sized GEMMs reach (estimate)
RESIDENT = "resident"  # the store kind of an engine holding every expert: its costs are in the engine's own


@dataclass(slots=True)
class Pricing:
    hw: Hardware
    shape: ModelShape
    threads: int
    # derived once (the simulator prices every expert of every step)
    cpu_bw: float = 0.0  # bytes/s a GEMV streams at `threads` threads
    cpu_flops: float = 0.0
    call_s: float = 0.0
    gpu_flops: float = 0.0
    expert_bytes: int = 0
    expert_flops: float = 0.0  # per token
    engine: EngineCosts | None = None  # the engine's own CPU costs, when the profile measured them

    def __post_init__(self) -> None:
        self.cpu_bw = self.hw.cpu.gemv_bandwidth(self.threads)
        self.cpu_flops = self.hw.cpu.gemm_flops(self.threads)
        self.call_s = self.hw.cpu.call_us * 1e-6
        self.gpu_flops = self.hw.gpu.bf16_tflops * 1e12 * GPU_EFFICIENCY if self.hw.gpu else 0.0
        self.expert_bytes = self.shape.expert_bytes
        self.expert_flops = self.shape.expert_flops
        if self.hw.cpu.engine_measured:
            self.engine = EngineCosts(self.hw.cpu, self.shape, self.threads)

    def cpu_expert(self, tokens: int, batched: bool | None = None) -> float:
        """A routed expert on the CPU for `tokens` tokens; `batched`: in a forward of several rows (default: when
        the expert has several)."""
        if self.engine is not None:
            return self.engine.expert(tokens, tokens > 1 if batched is None else batched)
        return EXPERT_CALLS * self.call_s + max(self.expert_bytes / self.cpu_bw,
                                                tokens * self.expert_flops / self.cpu_flops)

    def gpu_expert(self, tokens: int) -> float:
        g = self.hw.gpu
        return EXPERT_CALLS * g.launch_us * 1e-6 + max(self.expert_bytes / (g.mem_gbs * GB),
                                                       tokens * self.expert_flops / self.gpu_flops)

    def copy(self, nbytes: int) -> float:
        """Host -> device copy (nothing to copy with unified memory)."""
        g = self.hw.gpu
        return 0.0 if g.unified else nbytes / (g.link_gbs * GB)

    def read(self, nbytes: int, depth_one: bool = False) -> float:
        """One expert-sized random read among several in flight, or alone (`depth_one`): the profile's fixed time
        per read plus the bytes at its bandwidth."""
        ssd = self.hw.ssd
        if depth_one:
            return ssd.read_latency_qd1_us * 1e-6 + nbytes / (ssd.qd1_read_gbs * GB)
        return ssd.read_latency_us * 1e-6 + nbytes / (ssd.rand_read_gbs * GB)

    def extra_group(self, experts: int) -> float:
        """A group of `experts` a batched layer computes beyond its first (measured profiles only)."""
        return self.engine.extra_group(experts) if self.engine is not None else 0.0

    def read_cpu(self, kind: str = "lru") -> float:
        """The engine's own CPU time per expert read besides the read (its store's Python, under the interpreter
        lock the model's thread needs too): measured profiles only. With the store's costs measured, the model
        thread's part (submitting the read, installing it) and an I/O thread's Python (`load_us`) for store
        `kind`; else the profile's lump `read_us`."""
        store = self.store(kind)
        if store is not None:
            return (store["read_us"] + store["load_us"]) * 1e-6
        return self.hw.cpu.engine.get("read_us", 0.0) * 1e-6 if self.engine is not None else 0.0

    def store(self, kind: str) -> dict[str, float] | None:
        """The RAM tier's own costs (tiermoe.sim.store_probe) for store `kind`, a cache policy's name or "tide", when
        the profile measured them; a kind not measured is priced as LRU's store, the resident store as nothing more
        than the engine's fixed costs hold."""
        costs = self.hw.cpu.store if self.engine is not None and kind != RESIDENT else None
        return (costs.get(kind) or costs.get("lru")) if costs else None

    def request(self, kind: str, keys: int, evictions: int, refresh: bool) -> float:
        """The model thread's work in the RAM tier for one request of `keys` experts, before its reads are issued:
        the policy's bookkeeping, `evictions` freed, a TIDE refresh (0 without the store's costs measured)."""
        c = self.store(kind)
        if c is None:
            return 0.0
        return (c["request_us"] + keys * c["key_us"] + evictions * c["evict_us"] + refresh * c["refresh_us"]) * 1e-6

    def read_slowdown(self, kind: str) -> float:
        """How many times as long the model thread's expert compute takes while store `kind`'s reads are in flight
        (tiermoe.sim.store_probe's `read_slowdown`, measured on the store; 1 where not measured)."""
        store = self.store(kind)
        return store.get("read_slowdown", 1.0) if store else 1.0

    def read_wait(self) -> float:
        """Share of the model thread's compute that a read issued meanwhile waits before its I/O thread starts it
        (the engine's kernels hold the interpreter lock): measured profiles only."""
        return self.hw.cpu.engine.get("read_wait", 0.0) if self.engine is not None else 0.0

    def dense_layer(self, tokens: int, context: int, on_gpu: bool, seqs: list[tuple[int, int]] | None = None,
                    block: bool = False) -> float:
        """A layer's attention, router and shared experts for `tokens` new tokens attending to `context` each
        (`seqs`: (rows, context) per sequence, when known; `block`: a block-diffusion forward)."""
        if self.engine is not None and not on_gpu:
            return self.engine.moe_layer(seqs or [(tokens, context)], block)
        s = self.shape
        weights = s.layer_params * s.dtype_bytes
        kv = tokens * context * s.kv_dim * s.dtype_bytes
        flops = 2.0 * s.layer_params * tokens + 2.0 * tokens * context * s.kv_dim
        if on_gpu:
            g = self.hw.gpu
            return LAYER_CALLS * g.launch_us * 1e-6 + max((weights + kv) / (g.mem_gbs * GB), flops / self.gpu_flops)
        return LAYER_CALLS * self.call_s + max((weights + kv) / self.cpu_bw, flops / self.cpu_flops)

    def dense_mlp_layers(self, tokens: int, on_gpu: bool, seqs: list[tuple[int, int]] | None = None,
                         block: bool = False) -> float:
        """The layers with a dense MLP instead of experts (DeepSeek's and LLaDA2's first): their weights' time (and,
        priced the engine's way, their fixed costs and attention)."""
        if self.engine is not None and not on_gpu:
            return self.engine.dense_layers(seqs or [(tokens, tokens)], block)
        s = self.shape
        nbytes, flops = s.extra_layer_params * s.dtype_bytes, 2.0 * s.extra_layer_params * tokens
        if not nbytes:
            return 0.0
        if on_gpu:
            return max(nbytes / (self.hw.gpu.mem_gbs * GB), flops / self.gpu_flops)
        return max(nbytes / self.cpu_bw, flops / self.cpu_flops)

    def head(self, rows: int, on_gpu: bool, requests: int = 1, diffusion: bool = False) -> float:
        """Final norm, lm_head on the rows that need logits, sampling (or a diffusion step's prediction for each of
        the forward's `requests`)."""
        if self.engine is not None and not on_gpu:
            return self.engine.head(rows, requests, diffusion)
        s = self.shape
        nbytes, flops = s.vocab * s.hidden * s.dtype_bytes, 2.0 * s.vocab * s.hidden * rows
        if on_gpu:
            g = self.hw.gpu
            return STEP_CALLS * g.launch_us * 1e-6 + max(nbytes / (g.mem_gbs * GB), flops / self.gpu_flops)
        return STEP_CALLS * self.call_s + max(nbytes / self.cpu_bw, flops / self.cpu_flops)

    def device_costs(self) -> DeviceCosts:
        """The engine's placement cost model (`tiermoe.offload.tiers.accelerator.place`) for this machine."""
        g = self.hw.gpu
        link = float("inf") if g.unified else g.link_gbs * GB
        return DeviceCosts(self.cpu_flops, self.cpu_bw, link, self.gpu_flops)
