"""Event-level simulation of the engine on a hardware profile: a routing trace replayed layer by layer, step by step.

Four resources work in parallel, each a queue (work starts when the resource is free and its inputs are ready):
the CPU (one queue: torch's threads work on one operator at a time), the GPU, the host -> device link, and the
disk (reads issued together share its bandwidth, first in first out). Per MoE layer of a forward pass:

1. the dense part (attention, router, shared experts) runs on the main device (the GPU when the strategy uses one,
   else the CPU), after the previous layer;
2. the strategy (`tiermoe.sim.strategies`) says where each routed expert runs; the experts not on the GPU are asked
   of the RAM tier (`RamTier`: the live store's bookkeeping), whose misses are read from disk all at once and whose
   streamed experts go through the store's window (a read starts once the one before it was computed);
3. as in `TieredStore._collect`, resident experts are computed first, then each read as it lands (on the CPU, or
   copied over the link and run on the GPU); GPU-resident experts run on the GPU meanwhile; an expert computed on
   the CPU while reads are in flight takes the store's measured `read_slowdown` times as long for that part;
4. the prefetch of the next layer (`--prefetch oracle`: the trace's own next-layer top-1 experts, an upper bound
   on a router-based predictor) and policy swaps are read after the layer's demand reads.
The layer ends when its last expert is done; the head runs after the last layer. Decode steps of a batch run the
B sequences' next rows together (distinct experts with token counts); a prefill is one pass over the prompt rows.

A diffusion trace (rows grouped by forward, tiermoe.sim.trace) is replayed forward by forward as recorded, every
sequence of it, batched as the engine batched them; before each forward the tiers are told whether it is a TIDE
refresh step (as the engine's store is told by the last request that began a step: the forward's last one). With
strategy `tide` and no GPU, TIDE places the RAM tier (`RefreshRamTier`, the engine's `RefreshStore`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from tiermoe.offload.policies import make_policy
from tiermoe.offload.tiers.fetch_order import fetch_order
from tiermoe.sim import strategies as S
from tiermoe.sim.costs import RESIDENT, Pricing
from tiermoe.sim.hardware import Hardware
from tiermoe.sim.model_shape import ModelShape
from tiermoe.sim.ram_tier import RamTier, RefreshRamTier, Served
from tiermoe.sim.sim_config import SimConfig, SimResult, budgets
from tiermoe.sim.trace import Trace


@dataclass(slots=True)
class Clocks:
    """When each resource is next free, and how long each was busy."""

    cpu: float = 0.0
    gpu: float = 0.0
    link: float = 0.0
    disk: float = 0.0
    busy: Counter = field(default_factory=Counter)

    def run(self, resource: str, ready: float, seconds: float) -> float:
        """Queue `seconds` of work on `resource` once `ready`; returns when it ends."""
        end = max(getattr(self, resource), ready) + seconds
        setattr(self, resource, end)
        self.busy[resource] += seconds
        return end

    def run_beside(self, resource: str, ready: float, seconds: float, until: float, slowdown: float) -> float:
        """`run`, the part of the work done before `until` (while another resource works) taking `slowdown` times
        as long."""
        start = max(getattr(self, resource), ready)
        return self.run(resource, start, _slowed(seconds, max(until - start, 0.0), slowdown))

    def stretch(self, resource: str, since: float, until: float, slowdown: float) -> float:
        """The work `resource` was given from `since` to when it is next free, up to `until`, found to have run
        `slowdown` times as long (it ran beside work queued after it): its clock moves on; returns when it is free."""
        end = getattr(self, resource)
        work = max(min(end, until) - since, 0.0)
        extra = _slowed(work, max(until - since, 0.0), slowdown) - work
        if extra > 0.0:
            setattr(self, resource, end + extra)
            self.busy[resource] += extra
        return end + max(extra, 0.0)


def _slowed(seconds: float, window: float, slowdown: float) -> float:
    """Wall seconds of `seconds` of work whose first `window` wall seconds run `slowdown` times slower."""
    if slowdown <= 1.0 or window <= 0.0:
        return seconds
    return seconds * slowdown if seconds * slowdown <= window else window + seconds - window / slowdown


class MachineSim:
    """One strategy on one machine over one trace (see the module docstring)."""

    def __init__(self, trace: Trace, shape: ModelShape, hw: Hardware, cfg: SimConfig):
        if (trace.num_layers, trace.num_experts) != (shape.num_layers, shape.num_experts):
            raise ValueError(f"trace {trace.name} has {trace.num_layers} MoE layers x {trace.num_experts} experts, "
                             f"model shape {shape.name} {shape.num_layers} x {shape.num_experts}")
        self.trace, self.shape, self.hw, self.cfg = trace, shape, hw, cfg
        self.price = Pricing(hw, shape, cfg.threads or hw.cpu.cores)
        self.gpu_budget, self.ram_budget, self.use_gpu = budgets(hw, shape, cfg)
        self.notes: list[str] = []
        self.tier = self._strategy()
        size = shape.expert_bytes
        if cfg.strategy == "tide" and not self.use_gpu:
            self.ram = RefreshRamTier(self.ram_budget, lambda k: size, shape.num_layers, trace.top_k, size,
                                      cfg.io_threads)
        else:
            self.ram = RamTier(self.ram_budget, make_policy(cfg.cache_policy), lambda k: size, shape.num_layers,
                               trace.top_k, size, io_threads=cfg.io_threads)
        self.store_kind = self._store_kind()
        self.read_cpu = self.price.read_cpu(self.store_kind)
        self.slowdown = self.price.read_slowdown(self.store_kind)  # expert compute while reads are in flight
        self.clock = Clocks()
        self.inflight: dict[tuple[int, int], float] = {}  # prefetched key -> when its read lands
        self.placements: Counter = Counter()
        self.bytes_read = 0
        self.batched = False  # the current forward has several rows

    def _store_kind(self) -> str:
        """Which store's own costs the RAM tier pays: "resident" when it starts with every expert (the engine's
        all-resident store, whose costs the engine's probe counts), "tide" under TIDE, else its cache policy's."""
        if self.cfg.preload and self.ram_budget >= self.shape.total_expert_bytes:
            return RESIDENT
        return "tide" if isinstance(self.ram, RefreshRamTier) else self.cfg.cache_policy

    def _strategy(self) -> S.Strategy:
        cfg, price, budget = self.cfg, self.price, self.gpu_budget
        if not self.use_gpu:
            if cfg.strategy == "tide":
                self.notes.append("no GPU: TIDE places the RAM tier (the engine's RefreshStore)")
            elif cfg.strategy not in ("tiermoe", "on-demand"):
                self.notes.append(f"no GPU: {cfg.strategy} runs every expert on the CPU, as tiermoe does")
            return S.Strategy(price, 0)
        if cfg.strategy == "fiddler":
            return S.Fiddler.from_usage(price, budget, self._calibration_usage())
        if cfg.strategy == "llamacpp":
            tier = S.LlamaCpp.split(price, budget, cfg.n_cpu_moe)
            self.notes.append(f"llamacpp: --n-cpu-moe {tier.n_cpu_moe}")
            return tier
        if cfg.strategy == "tide":
            return S.TIDE(price, budget, cfg.tau)
        cls = {"tiermoe": S.CachedTier, "on-demand": S.OnDemand, "dali": S.DALI, "optimal": S.Optimal}
        return cls[cfg.strategy](price, budget)

    def _calibration_usage(self) -> Counter:
        n = max(1, int(self.trace.num_sequences * self.cfg.calibration))
        ids = self.trace.experts[: self.trace.sequence_bounds()[n - 1][1]]  # [T, L, K]
        usage = Counter()
        for layer in range(ids.shape[1]):
            e, c = np.unique(ids[:, layer][ids[:, layer] >= 0], return_counts=True)
            usage.update({(layer, int(a)): int(b) for a, b in zip(e, c, strict=True)})
        return usage

    # --- replay ------------------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        tokens, seconds = 0, 0.0
        if self.cfg.preload:
            usage = self._calibration_usage()
            keys = [(lay, e) for lay in range(self.shape.num_layers) for e in range(self.shape.num_experts)]
            keys.sort(key=lambda k: -usage.get(k, 0))  # stable: unused ones in layer order
            self.ram.cache.admit(keys, 0)
            self.tier.preload(keys, usage)
        diffusion = "forward" in self.trace.extras
        batches = [] if diffusion else self._batches()
        for batch in batches[: self.cfg.warmup]:
            self.replay(batch)
        self.ram.counts = type(self.ram.counts)()
        self.placements.clear()
        self.bytes_read = 0
        self.clock.busy.clear()
        if diffusion:
            tokens, seconds = self.replay_forwards()
        for batch in batches[self.cfg.warmup:]:
            n, s = self.replay(batch)
            tokens, seconds = tokens + n, seconds + s
        c = self.ram.counts
        return SimResult(self.cfg.strategy, self.hw.name, self.shape.name, self.cfg.phase, self.cfg.batch, tokens,
                         seconds, tokens / seconds if seconds else 0.0, self.gpu_budget, self.ram_budget, c.hits,
                         c.misses, c.streamed, c.prefetched, self.bytes_read, dict(self.placements),
                         dict(self.clock.busy), self.notes, c.evictions)

    def replay(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, float]:
        """One batch of sequences: their prompts in one pass, then their decode steps; returns the tokens and
        seconds of the configured phase."""
        tokens = 0
        prompts = [rows[0] for rows in batch]
        start = self.clock_now()
        if any(len(p) for p in prompts):  # a prompt's rows attend to half of it on average
            self.forward(np.concatenate(prompts), [(len(p), len(p) // 2 + 1) for p in prompts if len(p)],
                         rows_needing_logits=len(batch))
        if self.cfg.phase == "prefill":
            return sum(len(p) for p in prompts), self.clock_now() - start
        start = self.clock_now()
        decode = [rows[1] for rows in batch]
        for j in range(max(len(d) for d in decode)):
            step = np.array([d[j] for d in decode if j < len(d)])
            keys = [int(self.trace.positions[r]) + 1 for r in step]  # the trace's positions: what each row attends
            self.forward(step, [(1, k) for k in keys], rows_needing_logits=len(step))
            tokens += len(step)
        return tokens, self.clock_now() - start

    def replay_forwards(self) -> tuple[int, float]:
        """A diffusion trace: its forwards in order, each over its recorded rows; returns the requests' output tokens
        and the seconds of the whole run."""
        t, x = self.trace, self.trace.extras
        order = np.argsort(x["forward"], kind="stable")  # [T]: rows by forward, a forward's sequences in order
        mask = t.meta.get("mask_token_id")
        start = self.clock_now()
        for rows in np.split(order, np.flatnonzero(np.diff(x["forward"][order])) + 1):
            last = rows[-1]
            refresh = bool(x["denoise_block"][last] == 0 or x["denoise_step"][last] % self.cfg.tau == 0)
            self.ram.begin_step(refresh)
            self.tier.begin_step(refresh)
            masked = len(rows) if mask is None or t.token_ids is None else int((t.token_ids[rows] == mask).sum())
            seq = np.searchsorted(t.seq_starts, rows, side="right")  # [n] each row's request
            seqs = [(int((seq == q).sum()), int(t.positions[rows[seq == q]].max()) + 1) for q in np.unique(seq)]
            self.forward(rows, seqs, rows_needing_logits=masked, block=True)
        return int(x["seq_output_tokens"].sum()), self.clock_now() - start

    def clock_now(self) -> float:
        c = self.clock
        return max(c.cpu, c.gpu)

    def _batches(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per batch of sequences, each sequence's (prompt rows, decode rows)."""
        bounds = self.trace.sequence_bounds()[: self.cfg.sequences]
        has_prefill = bool(self.trace.is_prefill.any())
        seqs = []
        for a, b in bounds:
            rows = np.arange(a, b)
            if has_prefill:
                prompt, decode = rows[self.trace.is_prefill[a:b]], rows[~self.trace.is_prefill[a:b]]
            else:  # a decode-only trace: its first rows stand for the prompt
                cut = min(self.cfg.prompt_tokens, len(rows) - 1) if self.cfg.phase == "prefill" else 0
                prompt, decode = rows[:cut], rows[cut:]
            seqs.append((prompt, decode[: self.cfg.max_tokens]))
        b = self.cfg.batch
        return [seqs[i: i + b] for i in range(0, len(seqs), b)]

    def forward(self, rows: np.ndarray, seqs: list[tuple[int, int]], rows_needing_logits: int,
                block: bool = False) -> None:
        """One forward pass over trace `rows` (a prompt, a decode step's rows of the batch, or a diffusion forward
        with `block`); `seqs`: (rows, keys attended) of each sequence in it."""
        ids = self.trace.experts[rows]  # [T, L, K]
        main = "gpu" if self.use_gpu else "cpu"
        self.batched = len(rows) > 1  # the engine's batched expert path (one token takes a shorter one)
        context = max(c for _, c in seqs)
        t = self.clock.run(main, self.clock_now(), self.price.dense_mlp_layers(len(rows), self.use_gpu, seqs, block))
        for layer in range(self.shape.num_layers):
            t_router = self.clock.run(main, t, self.price.dense_layer(len(rows), context, self.use_gpu, seqs, block))
            experts, counts = self.order(ids[:, layer])
            backlog = max(0.0, self.clock.gpu - t_router)
            where = self.tier.assign(layer, experts, counts, backlog)
            self.placements.update(where.values())
            t = self.layer(layer, experts, counts, where, t_router, ids)
        self.clock.run(main, t, self.price.head(rows_needing_logits, self.use_gpu, len(seqs), block))

    @staticmethod
    def order(ids: np.ndarray) -> tuple[list[int], list[int]]:
        """The order the engine asks the store for a layer's experts: ascending ids for one token, else
        `fetch_order` (models/moe.py)."""
        if ids.shape[0] == 1:
            experts = sorted({int(e) for e in ids[0] if e >= 0})
            return experts, [1] * len(experts)
        return fetch_order(ids)

    def layer(self, layer: int, experts: list[int], counts: list[int], where: dict[int, str], t_router: float,
              ids: np.ndarray) -> float:
        """Time the layer's experts; returns when the last is done."""
        tokens = dict(zip(experts, counts, strict=True))
        ends = [t_router]
        for e in experts:
            if where[e] == S.GPU:
                ends.append(self.clock.run("gpu", t_router, self.price.gpu_expert(tokens[e])))
        host = [e for e in experts if where[e] != S.GPU]
        if host:
            prefetch = self._predicted(layer, ids) if self.cfg.prefetch == "oracle" else None
            for served in self.ram.fetch(layer, host, prefetch, [tokens[e] for e in host]):
                ends.append(self.serve(served, tokens, where, t_router))
        for _ in self.tier.swaps():  # background copies of what the GPU tier brought in
            self.clock.run("link", t_router, self.price.copy(self.shape.expert_bytes))
        return max(ends)

    def _predicted(self, layer: int, ids: np.ndarray) -> tuple[int, list[int]] | None:
        if layer + 1 >= self.shape.num_layers:
            return None
        nxt = ids[:, layer + 1, 0]
        return layer + 1, sorted({int(e) for e in nxt if e >= 0})

    def serve(self, served: Served, tokens: dict[int, int], where: dict[int, str], t0: float) -> float:
        """One RAM-tier turn: resident experts first, reads as they land, streamed reads through the window."""
        keys = len(served.hits) + len(served.misses) + len(served.streamed)
        request = self.price.request(self.store_kind, keys, served.evicted, served.refreshed)
        if request:  # the store's bookkeeping on the model's thread, before it issues the reads
            t0 = self.clock.run("cpu", t0, request)
        size, last, order = self.shape.expert_bytes, t0, itertools.count()  # order: ties go in request order
        ready: list[tuple[float, int, tuple]] = []  # (ready time, order, key), a heap
        for key in served.hits:
            ready.append((max(t0, self.inflight.pop(key, t0)), next(order), key))
        issue, held = t0, bool(self.price.read_wait())
        formed = t0 if ready else -math.inf  # when the group being computed was formed: residents are the first
        if held and (served.misses or served.streamed or served.prefetch):
            # the I/O threads start their reads once the model's thread lets go of the interpreter lock: the
            # experts at hand are computed first, for `read_wait` of that time the reads wait; and a read's Python
            # runs as it lands, while the model's thread waits for it (see `_read`)
            now = [r for r in ready if r[0] <= t0]
            ready = [r for r in ready if r[0] > t0]
            for _, _, key in now:
                last = max(last, self._compute(key, tokens[key[1]], where[key[1]], t0))
            issue = t0 + self.price.read_wait() * (last - t0)
        for key in served.misses:
            self.inflight.pop(key, None)
            ready.append((self._read(issue, size, depth_one=False, landing=held), next(order), key))
        heapq.heapify(ready)
        queue, window = deque(served.streamed), max(self.ram.window, 1)
        for _ in range(min(window, len(queue))):
            heapq.heappush(ready, (self._read(issue, size, depth_one=window == 1, landing=held), next(order),
                                   queue.popleft()))
        for key in served.prefetch:  # issued after the demand reads
            self.inflight[key] = self._read(issue, size, depth_one=False)
        if held and issue < self.clock.cpu:  # the experts at hand were computed beside the reads
            last = max(last, self.clock.stretch("cpu", issue, self.clock.disk, self.slowdown))
        streamed, read = set(served.streamed), set(served.misses) | set(served.streamed)
        while ready:
            at, _, key = heapq.heappop(ready)
            if at > formed and self.batched:  # landed after the group before it was formed: the next group
                first, formed = formed == -math.inf, max(at, last)
                at = self._group(ready, formed, first)
            if held and key in read:
                at = self.clock.run("cpu", at, self.read_cpu)
            done = self._compute(key, tokens[key[1]], where[key[1]], at)
            last = max(last, done)
            if key in streamed and queue:  # its room serves the next streamed read
                heapq.heappush(ready, (self._read(done, size, depth_one=window == 1, landing=held), next(order),
                                       queue.popleft()))
        return last

    def _group(self, ready: list[tuple], at: float, first: bool) -> float:
        """A batched layer's next group, formed at `at` of what has landed by then (the store hands over the reads
        found landed together); one beyond the layer's first costs a call of its own. Returns when its compute can
        start."""
        if first:
            return at
        experts = 1 + sum(r[0] <= at for r in ready)
        return self.clock.run("cpu", at, self.price.extra_group(experts))

    def _read(self, at: float, nbytes: int, depth_one: bool, landing: bool = False) -> float:
        """Queue one expert read issued at `at`; returns when it lands. The engine's CPU time around a read (its
        store's Python) delays the model's thread, which shares the interpreter lock with the readers: charged
        here, or by the caller as the read lands (`landing`)."""
        self.bytes_read += nbytes
        if self.read_cpu and not landing:
            self.clock.run("cpu", at, self.read_cpu)
        return self.clock.run("disk", at, self.price.read(nbytes, depth_one))

    def _compute(self, key, tokens: int, where: str, ready: float) -> float:
        p = self.price
        if where == S.CPU:  # slower while the disk still reads (the readers share the cores and memory bus)
            return self.clock.run_beside("cpu", ready, p.cpu_expert(tokens, self.batched), self.clock.disk,
                                         self.slowdown)
        copied = self.clock.run("link", ready, p.copy(self.shape.expert_bytes))
        return self.clock.run("gpu", copied, p.gpu_expert(tokens))


def simulate(trace: Trace, shape: ModelShape, hw: Hardware, cfg: SimConfig) -> SimResult:
    """Runs one configuration; see `MachineSim`."""
    return MachineSim(trace, shape, hw, cfg).run()
