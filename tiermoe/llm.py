"""The Python API: `LLM(model_dir).generate(prompts, params)` and `.chat(messages, params)`, as in vLLM."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tiermoe.config import EngineConfig
from tiermoe.decode import autoregressive, diffusion
from tiermoe.decode.kv_cache import KVCache
from tiermoe.decode.routing import RoutingRecorder, RoutingReplay
from tiermoe.decode.sequence import Sequence
from tiermoe.errors import ConfigError, RequestError
from tiermoe.models.diffusion import diffusion_of
from tiermoe.models.loader import load_model
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.offload.accelerator import AcceleratorStore, profile_costs
from tiermoe.offload.budget import parse_budget
from tiermoe.offload.policies import POLICIES, make_policy
from tiermoe.offload.prefetch import make_prefetcher
from tiermoe.offload.refresh_accelerator import RefreshAcceleratorStore
from tiermoe.offload.refresh_store import RefreshStore
from tiermoe.offload.static_store import STATIC, StaticStore
from tiermoe.offload.stats import StoreStats
from tiermoe.offload.store import ExpertStore, ResidentStore, loaded_nbytes
from tiermoe.offload.tiered_store import TieredStore
from tiermoe.outputs import RequestOutput
from tiermoe.sampling_params import SamplingParams
from tiermoe.sim.trace import Trace

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """A model loaded for generation. Keyword arguments are EngineConfig fields (dtype, max_model_len, threads)."""

    def __init__(self, model: str | Path = DEFAULT_MODEL, **kwargs):
        self.config = EngineConfig(model=model, **kwargs)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.model, self.index, self.hf_config = load_model(self.config.model, self.config.torch_dtype)
        self.model.to(self.config.torch_device)
        if not self.model.moe_blocks:
            refuse_offloading(self.config, self.hf_config["model_type"])
        self.store = make_store(self.config, self.index, self.model)
        cfg, prefetcher = self.config, None
        if cfg.prefetcher:
            prefetcher = make_prefetcher(cfg.prefetcher, self.model, cfg.model, cfg.prefetch_top_p)
        for block in self.model.moe_blocks:
            block.store, block.prefetcher = self.store, prefetcher
        self.tokenizer = load_tokenizer(self.config.model, self.hf_config["model_type"])
        self.eos_ids = eos_token_ids(self.config.model, self.hf_config, self.tokenizer)
        # Diffusion families (LLaDA, LLaDA2) generate by unmasking blocks, see tiermoe.decode.diffusion.
        self.diffusion = diffusion_of(self.hf_config, self.tokenizer, self.model.shape.vocab_size)
        if self.diffusion is not None and not self.eos_ids:
            self.eos_ids = self.diffusion.eos_ids
        if self.config.tau is not None and self.diffusion is None:
            raise ConfigError("tau (TIDE's refresh interval) applies to diffusion models only")
        self.max_model_len = self.config.max_model_len or self.model.shape.max_position_embeddings
        self._ids = itertools.count()

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
        outputs = [s.to_output() for s in seqs]
        for out in outputs:
            out.stats = self.store.stats.to_dict()
            if out.request_id in decoded:
                out.stats["diffusion"] = decoded[out.request_id]  # NFE, tokens per forward, logit rows
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

    def _detach_observer(self) -> None:
        for block in self.model.moe_blocks:
            block.on_route = None

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a cumulative RequestOutput after every generated token; the last one has `finished` set.

        While running, the text holds back an incomplete character or a possible start of a stop string.
        """
        (seq,) = self._make_sequences([prompt], sampling_params)
        if self.diffusion is not None:  # blocks are unmasked all over: only the finished output is meaningful
            yield from self._run([seq], False, None)
            return
        self.store.stats = StoreStats()
        with torch.inference_mode():
            while not seq.finished:
                autoregressive.step(self.model, [seq], self.tokenizer)
                out = seq.to_output()
                out.outputs[0].text = seq.stable_text()
                if seq.finished:
                    out.stats = self.store.stats.to_dict()
                yield out

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
        return [self._make_sequence(p, sp or SamplingParams()) for p, sp in zip(prompts, params, strict=True)]

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


def refuse_offloading(config: EngineConfig, model_type: str) -> None:
    """A model without routed experts (LLaDA) has nothing to offload: an option that would do nothing is refused."""
    given = [o for o in ("expert_cache", "gpu_expert_cache", "prefetch", "tau") if config.given(o)]
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


def load_tokenizer(folder: Path, model_type: str):
    """The folder's Hugging Face tokenizer, or None when it has no tokenizer files."""
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # A family transformers has no class for (llada2_moe, llada): an empty config keeps it from parsing config.json
    # only to warn about the unknown model type; the tokenizer files name the tokenizer.
    kwargs = {} if model_type in CONFIG_MAPPING else {"config": PretrainedConfig()}
    return AutoTokenizer.from_pretrained(folder, **kwargs)


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
