"""The Python API: `LLM(model_dir).generate(prompts, params)` and `.chat(messages, params)`, as in vLLM.

LLM is a thin front over tiermoe.engine.LLMEngine: a call queues its prompts as requests and steps the engine until
they have finished. Attributes that are not LLM's own (model, tokenizer, store, hf_config, max_model_len, ...) are
the engine's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from tiermoe import memory
from tiermoe.config import EngineConfig
from tiermoe.decode.routing import RoutingRecorder, RoutingReplay
from tiermoe.engine.llm_engine import LLMEngine, Prompt
from tiermoe.engine.request import Request
from tiermoe.errors import RequestError
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.offload.tiers.stats import StoreStats
from tiermoe.outputs import RequestOutput
from tiermoe.sampling_params import SamplingParams
from tiermoe.sim.trace import Trace


class LLM:
    """A model loaded for generation. Keyword arguments are EngineConfig fields (dtype, max_model_len, threads,
    expert_cache, kv_cache_memory, max_num_seqs, ...)."""

    def __init__(self, model: str | Path = DEFAULT_MODEL, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.config = self.engine.config

    def __getattr__(self, name: str):
        if name == "engine":  # not set: __init__ failed
            raise AttributeError(name)
        return getattr(self.engine, name)

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool | None = None, record_trace: str | Path | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt_token_ids": [...]}); outputs in prompt order.

        The progress bar is on by default for more than one prompt. `record_trace` writes every token's routing to
        FILE.npz + FILE.json in the ../shared/traces format (a diffusion model: every denoising forward's rows). Each
        output's `stats` holds this call's expert-store statistics. A request that fails (e.g. an unreadable expert)
        raises its error once the others are done.
        """
        batch = self._requests(prompts, sampling_params)
        recorder = RoutingRecorder(self.model) if record_trace else None
        outputs = self._run(batch, use_tqdm, recorder)
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
        batch = []
        for i in chosen:
            prompt, max_tokens = specs[i]
            req = self.engine.new_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                 ignore_eos=True), self.engine.next_id())
            replay.sequence_of[req.request_id] = i
            batch.append((req.request_id, [req]))
        outputs = self._run(batch, use_tqdm, replay)
        for out in outputs:
            out.stats["routing"] = f"replayed from {trace}"
        return outputs

    def _requests(self, prompts, sampling_params) -> list[tuple[str, list[Request]]]:
        """Every prompt checked and made into requests (ids, completions) before any is queued."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and
                                                isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts given")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        batch = []
        for p, sp in zip(prompts, params, strict=True):
            rid = self.engine.next_id()
            batch.append((rid, self.engine.make_requests(p, sp, rid)))
        return batch

    def _run(self, batch: list[tuple[str, list[Request]]], use_tqdm: bool | None, observer) -> list[RequestOutput]:
        """Queue the requests, step the engine until they are done, and return their outputs in order."""
        engine = self.engine
        if observer is not None and engine.is_diffusion and not hasattr(observer, "begin_denoise"):
            raise RequestError("routing traces are replayed for autoregressive models only")
        for _, children in batch:
            engine.check_fits(children)
        engine.store.stats = StoreStats()
        engine.runner.observer = observer
        done: dict[str, RequestOutput] = {}
        show = use_tqdm or (use_tqdm is None and len(batch) > 1)
        try:
            for rid, children in batch:
                engine.enqueue(rid, children)
            with tqdm(total=len(batch), desc="Generating", unit="req", disable=not show) as bar:
                while len(done) < len(batch):
                    for out in engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        finally:
            engine.runner.observer = None
            self._detach_observer()
            for rid, _ in batch:
                if rid not in done:
                    engine.abort_request(rid)
        outputs = [done[rid] for rid, _ in batch]
        for out in outputs:
            if out.error is not None:  # what failed (e.g. ExpertIOError naming the file and expert), as before
                raise out.error.__cause__ or out.error
            out.stats = self.stats() | out.stats if out.stats else self.stats()
        return outputs

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
        """Yield a cumulative RequestOutput after every generated token (a diffusion model: after every block);
        the last one has `finished` set.

        While running, the text holds back an incomplete character or a possible start of a stop string.
        """
        ((rid, children),) = self._requests([prompt], sampling_params)
        engine = self.engine
        engine.check_fits(children)
        engine.store.stats = StoreStats()
        engine.enqueue(rid, children)
        finished = False
        try:
            while not finished:
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error is not None:
                        raise out.error.__cause__ or out.error
                    finished = out.finished
                    if finished:
                        out.stats = self.stats() | out.stats if out.stats else self.stats()
                    yield out
        finally:
            if not finished:
                engine.abort_request(rid)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate the replies."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return self.generate([self.chat_prompt(c) for c in conversations], sampling_params, use_tqdm)

    def chat_prompt(self, messages: list[dict]) -> dict[str, list[int]]:
        """Token ids of a conversation rendered with the chat template, ending with the assistant's turn."""
        tok = self.engine.require_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise RequestError(f"{self.config.model} has no chat template")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def _make_sequence(self, prompt: Prompt, params: SamplingParams) -> Request:
        """A checked request with its own KV cache, not queued (tools and tests that drive the model directly)."""
        return self.engine.new_request(prompt, params)
