"""Which requests run in the next step, and how many of their tokens (the shape of vLLM V1's scheduler).

There are no prefill and decode phases: each request has tokens computed (K/V cached) and tokens to compute (its
prompt at first, then its last sampled token), and a step computes up to `max_num_batched_tokens` tokens over all
requests. Running requests are served first, in order, so decodes are never stalled by a long prompt: a prompt that
does not fit what is left of the budget is prefilled in chunks over several steps (chunked prefill). Waiting
requests are admitted in order (priority, then arrival) while there is budget, a seat (`max_num_seqs`) and KV
blocks. When a running request needs a KV block and none is free, the last request in that order is preempted: its
blocks are freed and it waits to recompute its tokens (preemption by recomputation, vLLM's default).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from tiermoe.engine.kv_cache_manager import KVCacheManager
from tiermoe.engine.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute this step)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int | None):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens  # None: no cap
        self.waiting: list[Request] = []  # kept sorted by (priority, arrival)
        self.running: list[Request] = []  # in the same order
        self._arrival = itertools.count()
        self._order: dict[str, tuple[int, int]] = {}

    def add(self, req: Request) -> None:
        self._order[req.request_id] = (req.priority, next(self._arrival))
        req.status = RequestStatus.WAITING
        self._insert(self.waiting, req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens or float("inf")
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = int(min(req.num_tokens - req.cached, budget))
            if not self._grow(req, n, out):  # preempted itself: nothing else can be freed for it
                continue
            out.scheduled.append((req, n))
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted):
            req = self.waiting[0]
            n = int(min(req.num_tokens - req.cached, budget))
            if not self.kv.allocate(req.request_id, req.cached + n):
                break
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            req.cache = self.kv.view(req.request_id)
            self._insert(self.running, req)
            out.scheduled.append((req, n))
            budget -= n
        return out

    def _grow(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """KV blocks for `req`'s next n tokens, preempting from the end of the running order until they fit."""
        while not self.kv.allocate(req.request_id, req.cached + n):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.cached, req.cache, req.status = 0, None, RequestStatus.PREEMPTED
        self._insert(self.waiting, req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a request (finished, aborted, failed) wherever it is, freeing its KV blocks."""
        for queue in (self.running, self.waiting):
            if req in queue:
                queue.remove(req)
        self.kv.free(req.request_id)
        self._order.pop(req.request_id, None)
        req.cache, req.status = None, status

    def _insert(self, queue: list[Request], req: Request) -> None:
        bisect.insort(queue, req, key=lambda r: self._order[r.request_id])


def in_order(jobs: list, budget: float) -> list:
    """fcfs: the running requests' steps in admission order while their rows fit the budget (at least one); a step
    that does not fit stops the others behind it, whatever its phase."""
    chosen = []
    for job in jobs:
        if chosen and _cost(job) > budget:
            break
        chosen.append(job)
        budget -= _cost(job)
    return chosen


def by_phase(jobs: list, budget: float) -> list:
    """phase (dLLM-Serve, arXiv 2512.17077): the oldest heavy step, then every light step, then the other heavy
    steps, each taken when its rows fit what is left of the budget (at least one step): heavy steps run beside the
    light ones instead of holding them back, and one that does not fit waits without stopping the others."""
    heavy = [job for job in jobs if job.pending is not None and job.pending.heavy]
    light = [job for job in jobs if job.pending is None or not job.pending.heavy]
    chosen = []
    for job in heavy[:1] + light + heavy[1:]:
        if not chosen or _cost(job) <= budget:
            chosen.append(job)
            budget -= _cost(job)
    return chosen


def _cost(job) -> int:
    return job.pending.cost if job.pending is not None else 0


@dataclass(frozen=True, slots=True)
class DiffusionPolicy:
    """How the diffusion scheduler shares engine steps between requests."""

    pick: Callable[[list, float], list]  # (running jobs by admission, token budget) -> the jobs whose step runs
    one_at_a_time: bool = False  # a single seat: each request is denoised to the end before the next starts


DIFFUSION_POLICIES = {
    "fcfs-request": DiffusionPolicy(in_order, one_at_a_time=True),  # what the public dLLM decoders do
    "fcfs": DiffusionPolicy(in_order),  # batched, phase-blind
    "phase": DiffusionPolicy(by_phase),  # batched, phase-multiplexed
}
DEFAULT_DIFFUSION_POLICY = "phase"  # EngineConfig.scheduler's default (bench/serve_diffusion.py)


class DiffusionScheduler:
    """Diffusion requests (tiermoe.decode.diffusion.Denoising): admitted in arrival order while there is a seat and
    KV blocks for the whole canvas (a request never grows past it, so none is preempted); each step runs the
    pending denoising steps the policy (DIFFUSION_POLICIES) picks among the running requests, their rows within
    `max_num_batched_tokens`."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int | None,
                 policy: str = DEFAULT_DIFFUSION_POLICY):
        self.policy = DIFFUSION_POLICIES[policy]
        self.kv, self.max_num_batched_tokens = kv, max_num_batched_tokens
        self.max_num_seqs = 1 if self.policy.one_at_a_time else max_num_seqs
        self.waiting: list = []  # Denoising jobs
        self.running: list = []

    def add(self, job) -> None:
        job.req.status = RequestStatus.WAITING
        self.waiting.append(job)

    def schedule(self) -> list:
        """Admit what fits, start it (up to its first forward), and return the jobs whose pending step runs now."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            job = self.waiting[0]
            if not self.kv.allocate(job.req.request_id, job.length):
                break
            self.waiting.pop(0)
            job.req.status = RequestStatus.RUNNING
            job.denoiser.cache = self.kv.view(job.req.request_id)
            self.running.append(job)
            job.start()
        return self.policy.pick(self.running, self.max_num_batched_tokens or float("inf"))

    def finish(self, job, status: RequestStatus) -> None:
        for queue in (self.running, self.waiting):
            if job in queue:
                queue.remove(job)
        self.kv.free(job.req.request_id)
        job.req.status = status
