"""The Python API: `LLM(model_dir).generate(prompts, params)` and `.chat(messages, params)`, as in vLLM."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tiermoe import memory
from tiermoe.config import EngineConfig
from tiermoe.decode import autoregressive, diffusion
from tiermoe.decode.kv_cache import KVCache
from tiermoe.decode.routing import RoutingRecorder, RoutingReplay
from tiermoe.decode.sequence import Sequence, request_outputs
from tiermoe.errors import ConfigError, RequestError
from tiermoe.models.diffusion import diffusion_of
from tiermoe.models.loader import DiskEmbedding, checkpoint_bytes, load_model
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.offload.prefetch import make_prefetcher
from tiermoe.offload.stores import cap_read_buffers, make_store
from tiermoe.offload.tiers.budget import format_bytes, parse_budget
from tiermoe.offload.tiers.ram import min_budget
from tiermoe.offload.tiers.stats import StoreStats
from tiermoe.offload.tiers.store import loaded_nbytes
from tiermoe.outputs import RequestOutput
from tiermoe.sampling_params import SamplingParams
from tiermoe.sim.trace import Trace
from tiermoe.tokenizer import load_tokenizer

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """A model loaded for generation. Keyword arguments are EngineConfig fields (dtype, max_model_len, threads)."""

    def __init__(self, model: str | Path = DEFAULT_MODEL, **kwargs):
        self.config = cfg = EngineConfig(model=model, **kwargs)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        usage = self._usage()
        if usage is not None or cfg.has_budget:
            memory.tune_malloc()
        self.model, self.index, self.hf_config = load_model(cfg.model, cfg.torch_dtype,
                                                            embedding_on_disk=usage is not None)
        self.model.to(cfg.torch_device)
        if not self.model.moe_blocks:
            refuse_offloading(cfg, self.hf_config["model_type"])
        elif cfg.prefetch_top_p > self.model.shape.top_k:
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
        # None: no cap (the prompts of a call are prefilled together, however many)
        self.max_num_batched_tokens = cfg.max_num_batched_tokens or (self.memory and self.memory.batched_tokens)
        self._ids = itertools.count()

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
        plan = memory.plan(usage, usage.now(), memory.resident_bytes(self.model), memory.kv_bytes_per_token(self.model),
                           self.max_model_len, memory.activation_bytes(self.model, batched, expert_inner), batched,
                           memory.read_buffer_bytes(self.index, dtype), io_threads,
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

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool | None = None, record_trace: str | Path | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt_token_ids": [...]}); outputs in prompt order.

        The progress bar is on by default for more than one prompt. `record_trace` writes every token's routing to
        FILE.npz + FILE.json in the ../shared/traces format. Each output's `stats` holds this call's expert-store
        statistics.
        """
        seqs = self._make_sequences(prompts, sampling_params)
        recorder = RoutingRecorder(self.model) if record_trace else None
        try:
            outputs = self._run(seqs, use_tqdm, recorder)
        finally:
            self._detach_observer()
        if recorder is not None:
            recorder.save(record_trace, {"model": str(self.config.model), "model_type": self.hf_config["model_type"]})
        return outputs

    def replay(self, trace: str | Path, sequences: list[int] | None = None,
               use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Benchmarks only: decode with the router's choices taken from a routing trace (see RoutingReplay).

        Each trace sequence becomes one request with a filler prompt as long as its traced context; generated text
        is meaningless, the expert I/O is the traced model's. Outputs' stats say `"routing": "replayed"`.
        """
        replay = RoutingReplay(self.model, Trace.load(trace))
        specs = replay.prompts(self.model.shape.vocab_size)
        chosen = range(len(specs)) if sequences is None else sequences
        seqs = []
        for i in chosen:
            prompt, max_tokens = specs[i]
            seq = self._make_sequence(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            replay.sequence_of[seq.request_id] = i
            seqs.append(seq)
        try:
            outputs = self._run(seqs, use_tqdm, replay)
        finally:
            self._detach_observer()
        for out in outputs:
            out.stats["routing"] = f"replayed from {trace}"
        return outputs

    def _run(self, seqs: list[Sequence], use_tqdm: bool | None, observer) -> list[RequestOutput]:
        self.store.stats = StoreStats()
        show = use_tqdm or (use_tqdm is None and len(seqs) > 1)
        with tqdm(total=len(seqs), desc="Generating", unit="req", disable=not show) as bar:
            def on_step(running: list[Sequence]) -> None:
                bar.update(sum(s.finished for s in running))

            decoded = self._decode(seqs, on_step, observer)
        outputs = request_outputs(seqs)
        for out in outputs:
            out.stats = self.stats()
        add_diffusion_stats(outputs, seqs, decoded)
        return outputs

    def _decode(self, seqs: list[Sequence], on_step, observer) -> dict[str, dict]:
        """Run the family's decoder; a diffusion decoder returns per-request statistics."""
        if self.diffusion is None:
            autoregressive.generate(self.model, seqs, self.tokenizer, on_step, observer)
            return {}
        if observer is not None:
            raise RequestError("routing traces are recorded and replayed for autoregressive models only")
        return diffusion.generate(self.model, seqs, self.tokenizer, self.diffusion,
                                  diffusion.DiffusionOptions(tau=self.config.tau), on_step, self.store)

    def stats(self) -> dict:
        """The expert store's statistics since the last generate call; under a memory limit also how the limit was
        split (`memory`) and the process's peak RSS."""
        stats = self.store.stats.to_dict()
        if self.memory is not None:
            stats["memory"] = self.memory.to_dict() | {"peak_rss": memory.peak_rss()}
        return stats

    def _detach_observer(self) -> None:
        for block in self.model.moe_blocks:
            block.on_route = None

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a cumulative RequestOutput after every generated token (a diffusion model: after every block it
        commits); the last one has `finished` set.

        While running, the text holds back an incomplete character or a possible start of a stop string.
        """
        seqs = self._make_sequences([prompt], sampling_params)  # n of them with SamplingParams.n
        self.store.stats = StoreStats()
        if self.diffusion is not None:
            decoded: dict[str, dict] = {}
            options = diffusion.DiffusionOptions(tau=self.config.tau)
            for _ in diffusion.stream(self.model, seqs, self.tokenizer, self.diffusion, options, self.store, decoded):
                yield self._partial_output(seqs, decoded)
            return
        with torch.inference_mode():
            while running := [s for s in seqs if not s.finished]:
                autoregressive.step(self.model, running, self.tokenizer)
                yield self._partial_output(seqs)

    def _partial_output(self, seqs: list[Sequence], decoded: dict[str, dict] | None = None) -> RequestOutput:
        """The request's output so far, its text held back where it may still change; with stats once finished."""
        (out,) = request_outputs(seqs)
        for completion, seq in zip(out.outputs, seqs, strict=True):
            completion.text = seq.stable_text()
        if out.finished:
            out.stats = self.stats()
            add_diffusion_stats([out], seqs, decoded or {})
        return out

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate the replies."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return self.generate([self.chat_prompt(c) for c in conversations], sampling_params, use_tqdm)

    def chat_prompt(self, messages: list[dict]) -> dict[str, list[int]]:
        """Token ids of a conversation rendered with the chat template, ending with the assistant's turn."""
        tok = self._require_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise RequestError(f"{self.config.model} has no chat template")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def _make_sequences(self, prompts, sampling_params) -> list[Sequence]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and
                                                isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts given")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = [seq for p, sp in zip(prompts, params, strict=True) for seq in self._make_request(p, sp)]
        self._check_fits(seqs)
        return seqs

    def _make_request(self, prompt: Prompt, params: SamplingParams | None) -> list[Sequence]:
        """One sequence per completion (SamplingParams.n), after checking the params fit this model."""
        params = params or SamplingParams()
        params.check_for_model(self.model.shape.vocab_size, self.hf_config["model_type"], self.diffusion is not None)
        if params.n == 1:
            return [self._make_sequence(prompt, params)]
        children = [self._make_sequence(prompt, params.for_completion(i)) for i in range(params.n)]
        parent = str(next(self._ids))
        for i, seq in enumerate(children):  # vLLM's child request ids
            seq.request_id, seq.parent_id, seq.index = f"{i}_{parent}", parent, i
        return children

    def _check_fits(self, seqs: list[Sequence]) -> None:
        """The prompts are prefilled in one forward, and every sequence's KV cache is allocated for its whole
        length: refuse what exceeds max_num_batched_tokens, or (under a memory limit) the KV cache reserved."""
        prompt_tokens = sum(len(s.prompt_ids) for s in seqs)
        if self.max_num_batched_tokens is not None and prompt_tokens > self.max_num_batched_tokens:
            raise RequestError(f"the prompts hold {prompt_tokens} tokens but one forward may process at most "
                               f"max_num_batched_tokens={self.max_num_batched_tokens}: send fewer or shorter prompts "
                               "per call, or raise max_num_batched_tokens (a memory limit reserves its activations)")
        kv_tokens = sum(s.cache.capacity for s in seqs)
        if self.memory is not None and kv_tokens > self.memory.kv_tokens:
            raise RequestError(f"these requests need KV cache for {kv_tokens} tokens (prompt + max_tokens each) but "
                               f"the memory limit reserved {self.memory.kv_tokens} (max_model_len): send fewer "
                               "requests per call or lower max_tokens")

    def _make_sequence(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                               "tokens, which must also hold at least one generated token")
        if max(ids) >= self.model.shape.vocab_size or min(ids) < 0:
            raise RequestError(f"prompt token ids must be in [0, {self.model.shape.vocab_size})")
        capacity = min(len(ids) + params.max_tokens, self.max_model_len)
        return Sequence(str(next(self._ids)), text, ids, params, KVCache(capacity), self.max_model_len,
                        self.eos_ids)

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer().encode(prompt) if prompt else []
        return None, list(prompt)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RequestError(f"{self.config.model} has no tokenizer: pass prompts as token ids")
        return self.tokenizer


def add_diffusion_stats(outputs: list[RequestOutput], seqs: list[Sequence], decoded: dict[str, dict]) -> None:
    """Each request's diffusion work (NFE, tokens per forward, logit rows) into its stats: a dict, or one per
    completion with n > 1."""
    work: dict[str, list[dict]] = {}
    for s in seqs:
        if s.request_id in decoded:
            work.setdefault(s.parent_id or s.request_id, []).append(decoded[s.request_id])
    for out in outputs:
        if out.request_id in work:
            done = work[out.request_id]
            out.stats["diffusion"] = done[0] if len(done) == 1 else done


def refuse_offloading(config: EngineConfig, model_type: str) -> None:
    """A model without routed experts (LLaDA) has nothing to offload: an option that would do nothing is refused."""
    given = [o for o in ("expert_cache", "gpu_expert_cache", "prefetch", "tau", "memory_limit") if config.given(o)]
    if given:
        raise ConfigError(f"{', '.join(given)}: expert offloading applies to models with routed experts, and "
                          f"{model_type} has none (all its weights stay resident)")


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
