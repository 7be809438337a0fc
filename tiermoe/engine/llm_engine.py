"""LLMEngine: a loaded model that admits, steps and retires requests one step at a time (vLLM's LLMEngine shape).

    engine = LLMEngine(EngineConfig(model="path"))
    engine.add_request("a", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():  # cumulative RequestOutputs of the requests that progressed
            ...

Autoregressive models run through the Scheduler (continuous batching, chunked prefill, preemption) and the
ModelRunner over a paged KV cache (KVCacheManager). Diffusion models run, per step, the denoising steps the
DiffusionScheduler's policy picks (at most one per request) in one forward (tiermoe.decode.diffusion). A request
that fails alone (an I/O error on its expert reads) ends with an error; the others go on.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Any

import torch

from tiermoe import kernels, memory
from tiermoe.config import EngineConfig
from tiermoe.decode import diffusion
from tiermoe.decode.kv_cache import KVCache
from tiermoe.engine.kv_cache_manager import BLOCK_SIZE, KVCacheManager
from tiermoe.engine.model_runner import ModelRunner
from tiermoe.engine.request import Request, RequestStatus, request_outputs
from tiermoe.engine.scheduler import DEFAULT_DIFFUSION_POLICY, DiffusionScheduler, Scheduler
from tiermoe.engine.setup import eos_token_ids, refuse_offloading
from tiermoe.errors import ConfigError, ExpertIOError, RequestError, RequestFailed
from tiermoe.models.diffusion import diffusion_of
from tiermoe.models.loader import DiskEmbedding, checkpoint_bytes, load_model
from tiermoe.models.sparse_spec import check_model
from tiermoe.offload.prefetch import make_prefetcher
from tiermoe.offload.stores import cap_read_buffers, make_store
from tiermoe.offload.tiers.budget import format_bytes, parse_budget
from tiermoe.offload.tiers.ram import min_budget
from tiermoe.offload.tiers.store import loaded_nbytes
from tiermoe.outputs import RequestOutput
from tiermoe.sampling_params import SamplingParams
from tiermoe.tokenizer import load_tokenizer

Prompt = str | list[int] | dict[str, Any]
DEFAULT_KV_CACHE = 1 << 30  # bytes of KV cache without kv_cache_memory or a memory limit (at least one full context)


class LLMEngine:
    """A model loaded for serving requests step by step; see the module docstring."""

    def __init__(self, config: EngineConfig):
        self.config = cfg = config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        kernels.set_batch_invariant(cfg.batch_invariant)
        usage = self._usage()
        if usage is not None or cfg.has_budget:
            memory.tune_malloc()
        self.model, self.index, self.hf_config = load_model(cfg.model, cfg.torch_dtype,
                                                            embedding_on_disk=usage is not None)
        self.model.to(cfg.torch_device)
        if not self.model.moe_blocks:
            refuse_offloading(cfg, self.hf_config["model_type"])
        elif (cfg.prefetch_top_p or 0) > self.model.shape.top_k:
            raise ConfigError(f"prefetch_top_p {cfg.prefetch_top_p} is more than the {self.model.shape.top_k} experts "
                              "a token routes to (top_k)")
        self.tokenizer = load_tokenizer(cfg.model, self.hf_config["model_type"])
        self.max_model_len = cfg.max_model_len or self.model.shape.max_position_embeddings
        self.memory = self._plan_memory(usage) if usage is not None and self.model.moe_blocks else None
        cfg.io_threads = cfg.io_threads or 4
        self.store = make_store(cfg, self.index, [b.layer for b in self.model.moe_blocks], self.model.shape.top_k)
        cap_read_buffers(self.store, memory.read_buffer_bytes(self.index, cfg.torch_dtype) * cfg.io_threads)
        prefetcher = None
        if cfg.prefetcher:
            prefetcher = make_prefetcher(cfg.prefetcher, self.model, cfg.model, cfg.prefetch_top_p)
        for block in self.model.moe_blocks:
            block.store, block.prefetcher = self.store, prefetcher
        self.eos_ids = eos_token_ids(cfg.model, self.hf_config, self.tokenizer)
        # Diffusion families (LLaDA, LLaDA2) generate by unmasking blocks, see tiermoe.decode.diffusion.
        self.diffusion = diffusion_of(self.hf_config, self.tokenizer, self.model.shape.vocab_size)
        if self.diffusion is not None and not self.eos_ids:
            self.eos_ids = self.diffusion.eos_ids
        if cfg.tau is not None and self.diffusion is None:
            raise ConfigError("tau (TIDE's refresh interval) applies to diffusion models only")
        if cfg.sparse_attention is not None:
            check_model(self.hf_config["model_type"], self.diffusion and self.diffusion.schedule)
        if cfg.scheduler is not None and self.diffusion is None:
            raise ConfigError(f"scheduler {cfg.scheduler!r} applies to diffusion models only: "
                              f"{self.hf_config['model_type']} is autoregressive, its requests are batched "
                              "continuously (max_num_seqs, max_num_batched_tokens)")
        # None: no cap (a step computes every scheduled token), or the memory plan's activation reservation
        self.max_num_batched_tokens = cfg.max_num_batched_tokens or (self.memory and self.memory.batched_tokens)
        self.kv = self._kv_cache()
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, self.max_num_batched_tokens)
        # TIDE's refresh rhythm follows one request's steps: with tau, diffusion requests run one at a time
        policy = cfg.scheduler or ("fcfs-request" if cfg.tau is not None else DEFAULT_DIFFUSION_POLICY)
        self.diffusion_scheduler = DiffusionScheduler(self.kv, cfg.max_num_seqs, self.max_num_batched_tokens, policy)
        self.runner = ModelRunner(self.model, self.tokenizer)
        self.requests: dict[str, list[Request]] = {}  # request id -> its completions (n of them)
        self.jobs: dict[str, diffusion.Denoising] = {}  # diffusion: each request's decoder
        self.totals = {"prompt_tokens": 0, "generation_tokens": 0}
        self._ids = itertools.count()

    @property
    def is_diffusion(self) -> bool:
        return self.diffusion is not None

    # -- loading ------------------------------------------------------------------------------------------------

    def _usage(self) -> memory.Usage | None:
        """The limit to size the engine to: memory_limit, else the cgroup's when the model cannot stay resident
        under it (then said on stderr), else None."""
        cfg = self.config
        if cfg.memory_limit is not None:
            return memory.Usage.of(cfg.memory_limit)
        if cfg.has_budget or cfg.torch_device.type != "cpu":
            return None
        usage = memory.Usage.default(lambda: checkpoint_bytes(cfg.model, cfg.torch_dtype))
        if usage is not None:
            print(f"tiermoe: the model does not fit the cgroup's memory limit of {format_bytes(usage.limit)} "
                  "resident: sizing the expert cache to the limit (memory_limit='auto')", file=sys.stderr)
        return usage

    def _plan_memory(self, usage: memory.Usage) -> memory.MemoryPlan:
        """Split the limit now that the non-expert weights and the tokenizer are loaded (tiermoe.memory); sets the
        expert budget and the I/O threads, and says how on stderr."""
        cfg, shape, dtype = self.config, self.model.shape, self.config.torch_dtype
        layers = [b.layer for b in self.model.moe_blocks]
        batched = cfg.max_num_batched_tokens or min(memory.ACTIVATION_TOKENS, self.max_model_len)
        io_threads = cfg.io_threads or shape.top_k
        expert_inner = max(s.gate.shape[0] for s in self.index.experts().values())
        kv_per_token = memory.kv_bytes_per_token(self.model)
        kv_tokens = self.max_model_len
        if cfg.kv_cache_memory is not None:
            kv_tokens = max(1, parse_budget(cfg.kv_cache_memory, 0) // kv_per_token)
        plan = memory.plan(usage, usage.now(), memory.resident_bytes(self.model), kv_per_token,
                           kv_tokens, memory.activation_bytes(self.model, batched, expert_inner), batched,
                           memory.read_reserve_bytes(self.index, dtype), io_threads,
                           min_budget(self.index, layers, shape.top_k, dtype), isinstance(
                               self.model.model.embed_tokens, DiskEmbedding))
        if cfg.expert_cache is not None:
            total = sum(loaded_nbytes(spec, dtype) for spec in self.index.experts().values())
            given = parse_budget(cfg.expert_cache, total)
            if given > plan.experts:
                raise ConfigError(f"expert_cache {format_bytes(given)} does not fit memory_limit: "
                                  f"{plan.describe()}")
            plan = dataclasses.replace(plan, experts=given)
        cfg.expert_cache, cfg.io_threads = plan.experts, io_threads
        print(f"tiermoe: {plan.describe()}", file=sys.stderr)
        return plan

    def _kv_cache(self) -> KVCacheManager:
        """kv_cache_memory, else what a memory limit reserved, else DEFAULT_KV_CACHE (at least one full context)."""
        per_token = memory.kv_bytes_per_token(self.model)
        if self.config.kv_cache_memory is not None:
            budget = parse_budget(self.config.kv_cache_memory, 0)
        elif self.memory is not None:
            budget = self.memory.kv_tokens * per_token
        else:
            budget = max(DEFAULT_KV_CACHE, (self.max_model_len + BLOCK_SIZE) * per_token)
        kv = KVCacheManager(budget, per_token)
        if self.diffusion is None and kv.capacity_tokens < 2:
            raise ConfigError(f"kv_cache_memory {format_bytes(budget)} holds no KV block "
                              f"({format_bytes(kv.block_bytes)} each)")
        return kv

    # -- requests -----------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request (text, token ids, or {"prompt_token_ids": [...]}); bad input raises RequestError."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        children = self.make_requests(prompt, params, request_id)
        self.check_fits(children)
        for req in children:
            req.priority = priority
        self.enqueue(request_id, children)

    def next_id(self) -> str:
        """A fresh request id ("0", "1", ...)."""
        while (rid := str(next(self._ids))) in self.requests:
            pass
        return rid

    def enqueue(self, request_id: str, children: list[Request]) -> None:
        """Queue a request's checked completions (make_requests, check_fits)."""
        self.requests[request_id] = children
        self.totals["prompt_tokens"] += len(children[0].prompt_ids)
        for req in children:
            if self.diffusion is None:
                self.scheduler.add(req)
            else:
                job = diffusion.Denoising(self.model, req, self.tokenizer, self.diffusion, self._diffusion_options(),
                                          self.store)
                self.jobs[req.request_id] = job
                self.diffusion_scheduler.add(job)

    def make_requests(self, prompt: Prompt, params: SamplingParams | None, request_id: str) -> list[Request]:
        """One Request per completion (SamplingParams.n, vLLM's child ids), after checking the params fit."""
        params = params or SamplingParams()
        params.check_for_model(self.model.shape.vocab_size, self.hf_config["model_type"], self.diffusion is not None)
        if params.n == 1:
            return [self.new_request(prompt, params, request_id)]
        children = [self.new_request(prompt, params.for_completion(i), f"{i}_{request_id}") for i in range(params.n)]
        for i, req in enumerate(children):
            req.parent_id, req.index = request_id, i
        return children

    def new_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> Request:
        """A checked Request for one completion (not queued); its own KV cache until the engine admits it."""
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                               "tokens, which must also hold at least one generated token")
        if max(ids) >= self.model.shape.vocab_size or min(ids) < 0:
            raise RequestError(f"prompt token ids must be in [0, {self.model.shape.vocab_size})")
        rid = self.next_id() if request_id is None else request_id
        capacity = min(len(ids) + params.max_tokens, self.max_model_len)
        return Request(rid, text, ids, params, KVCache(capacity), self.max_model_len, self.eos_ids)

    def check_fits(self, children: list[Request]) -> None:
        """A request must fit the KV cache alone, or preemption could never let it finish."""
        req = children[0]
        need = min(len(req.prompt_ids) + req.params.max_tokens, self.max_model_len)
        if self.diffusion is not None:  # the whole canvas, allocated at admission
            need = diffusion.canvas_length(req, self.diffusion.schedule)
        if need > self.kv.capacity_tokens:
            raise RequestError(f"the request needs KV cache for {need} tokens (prompt + max_tokens) but "
                               f"kv_cache_memory holds {self.kv.capacity_tokens} ({format_bytes(self.kv.budget)}): "
                               "lower max_tokens or raise kv_cache_memory")

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            return prompt, self.require_tokenizer().encode(prompt) if prompt else []
        return None, list(prompt)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise RequestError(f"{self.config.model} has no tokenizer: pass prompts as token ids")
        return self.tokenizer

    def _diffusion_options(self) -> diffusion.DiffusionOptions:
        return diffusion.DiffusionOptions(tau=self.config.tau, sparse=self.config.sparse_attention)

    def abort_request(self, request_id: str) -> None:
        """Stop a request (all its completions) and free what it holds; unknown or finished ids are ignored."""
        for req in self.requests.pop(request_id, []):
            if not req.status.done:
                self._retire(req, RequestStatus.ABORTED)

    def has_unfinished_requests(self) -> bool:
        return any(not r.status.done for reqs in self.requests.values() for r in reqs)

    # -- stepping -----------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns a cumulative RequestOutput for every request that progressed or ended in it.

        Finished requests are forgotten once returned (their last output has `finished` set).
        """
        touched = self._step_diffusion() if self.diffusion is not None else self._step_autoregressive()
        outputs = []
        for rid in dict.fromkeys(r.parent_id or r.request_id for r in touched):
            children = self.requests.get(rid)
            if children is None:
                continue
            (out,) = request_outputs(children)
            for completion, req in zip(out.outputs, sorted(children, key=lambda r: r.index), strict=True):
                completion.text = req.stable_text()
            failed = [r.error for r in children if r.error is not None]
            if failed:
                out.finished, out.error = True, failed[0]
            if out.finished and children[0].work is not None:  # diffusion: NFE, tokens per forward, logit rows
                work = [r.work for r in children]
                out.stats = {"diffusion": work[0] if len(work) == 1 else work}
            if out.finished:
                del self.requests[rid]
            outputs.append(out)
        return outputs

    def _step_autoregressive(self) -> list[Request]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        sampled = self._execute(plan.scheduled)
        for req in sampled:
            self.totals["generation_tokens"] += 1
            if req.finished:
                self._retire(req, RequestStatus.FINISHED)
        # a chunk of a prompt that samples nothing yet is no news; a request that failed is
        return sampled + [r for r, _ in plan.scheduled if r.status is RequestStatus.FAILED and r not in sampled]

    def _execute(self, scheduled: list[tuple[Request, int]]) -> list[Request]:
        """Run the step; when it fails on an expert read, run each request alone so only those whose own reads
        fail end (FAILED), and the others progress."""
        return self._isolating([req for req, _ in scheduled], lambda reqs: self.runner.execute(
            [item for item in scheduled if item[0] in reqs]))

    def _isolating(self, reqs: list[Request], run):
        """run(reqs) -> list; on an expert-read error run each request alone and fail those that fail alone."""
        try:
            return run(reqs)
        except ExpertIOError as e:
            if len(reqs) == 1:
                self._fail(reqs[0], e)
                return []
        results = []
        for req in reqs:
            if req.status.done:  # a sibling completion failed
                continue
            try:
                results += run([req])
            except ExpertIOError as e:
                self._fail(req, e)
        return results

    def _denoise(self, jobs: list) -> list[torch.Tensor]:
        """One batched diffusion forward, seen by the runner's observer (a routing recorder) when there is one."""
        observer = self.runner.observer
        if observer is not None:
            observer.begin_denoise(jobs)
        hidden = diffusion.forward(self.model, jobs)
        if observer is not None:
            observer.end()
        return hidden

    def _step_diffusion(self) -> list[Request]:
        """Run the chosen requests' next denoising steps, batched per attention-block length; the requests that
        committed a block (or ended) are returned."""
        chosen = self.diffusion_scheduler.schedule()
        groups: dict = {}
        for job in chosen:
            if job.pending is not None:
                groups.setdefault(job.pending.attn_block, []).append(job)
        blocks = {job.req.request_id: job.blocks for job in chosen}
        for jobs in groups.values():
            def run(reqs, jobs=jobs):
                ran = [j for j in jobs if j.req in reqs]
                return list(zip(ran, self._denoise(ran), strict=True))

            for job, hidden in self._isolating([j.req for j in jobs], run):
                job.resume(hidden)
        touched = []
        for job in chosen:
            req = job.req
            if job.done and not req.status.done:
                self._retire(req, RequestStatus.FINISHED)
            if job.blocks > blocks[req.request_id] or req.status.done:
                self.totals["generation_tokens"] += len(req.output_ids) - job.counted
                job.counted = len(req.output_ids)
                touched.append(req)
        return touched

    def _fail(self, req: Request, error: Exception) -> None:
        """End the request (all its completions) with RequestFailed, caused by `error`."""
        failure = RequestFailed(f"request {req.parent_id or req.request_id} failed: {error}")
        failure.__cause__ = error
        req.error = failure
        for sibling in self.requests.get(req.parent_id or req.request_id, [req]):
            if not sibling.status.done:
                self._retire(sibling, RequestStatus.FAILED)
                sibling.finish_reason = sibling.finish_reason or "error"

    def _retire(self, req: Request, status: RequestStatus) -> None:
        if self.diffusion is None:
            self.scheduler.finish(req, status)
        else:
            self.diffusion_scheduler.finish(self.jobs.pop(req.request_id), status)

    def stats(self) -> dict:
        """Scheduler, KV cache and expert-store statistics, and token totals since the engine started."""
        total = self.store.stats.to_dict()["total"]
        store = {"hits": total["hits"], "misses": total["misses"], "bytes_read": total["bytes_read"],
                 "stall_s": total["stall_time_s"]}
        queues = self.diffusion_scheduler if self.diffusion is not None else self.scheduler
        return {"num_running": len(queues.running), "num_waiting": len(queues.waiting),
                "kv_usage": self.kv.usage, "kv_bytes": self.kv.used_bytes, "kv_budget": self.kv.budget,
                "store": store, **self.totals}

