"""One function per engine: load the model, generate greedily from the same prompt ids, time it.

Each runner runs inside its own process (bench.peers.worker) and returns an EngineRun. Timing, the same for all:
prefill = prompt tokens / time to the first generated token; decode = (new tokens - 1) / time from the first to
the last generated token. Every engine is given the prompt as token ids, so tokenizers play no part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TORCH_DTYPES = ("bfloat16", "float32")
Timed = tuple[float, float, list[int]]  # (prefill tok/s, decode tok/s, generated ids) of one generation


@dataclass
class RunSpec:
    """What the worker process runs (JSON on its command line)."""

    engine: str  # a key of RUNNERS
    model: str  # Hugging Face folder
    gguf: str | None  # GGUF file of `dtype` (llama.cpp only)
    dtype: str  # "bfloat16" or "float32"
    prompt: list[int]
    new_tokens: int
    runs: int  # timed generations in this process
    threads: int
    warmup: bool = True  # one short untimed generation first (faults weights in, sizes buffers)
    budget: int | None = None  # tiermoe: expert cache bytes; transformers: accelerate's CPU max_memory
    memory_limit: int | None = None  # tiermoe: --memory-limit (the engine sizes its expert cache itself)
    prefetch: str | None = None  # tiermoe under a limit: --prefetch
    offload_dir: str | None = None  # transformers: accelerate's offload folder


@dataclass
class EngineRun:
    """Results of one process; the parent fills the last group of fields."""

    engine: str
    dtype: str
    setting: str  # how the engine held the weights, e.g. "resident", "expert cache 300 MiB", "mmap"
    load_s: float = 0.0
    prefill_tok_s: list[float] = field(default_factory=list)  # one per timed run
    decode_tok_s: list[float] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    proc_read_bytes: int = 0  # /proc/self/io read_bytes at the end (storage reads, mmap faults included)
    peak_rss_bytes: int = 0  # VmHWM
    load_peak_rss_bytes: int = 0  # VmHWM once the model is loaded, before generating (is the peak load's or decode's?)
    extra: dict = field(default_factory=dict)  # engine-specific facts (tiermoe's hit rate, accelerate's map)
    # filled by the parent process
    exit_code: int | None = None  # negative: killed by that signal
    oom_killed: bool = False
    group_peak_bytes: int | None = None  # cgroup peak: RSS + page cache
    group_cache_bytes: int | None = None  # page cache charged to the cgroup at the end
    group_read_bytes: int | None = None
    error: str | None = None


def context_length(spec: RunSpec) -> int:
    """The context an engine is given: the prompt, the new tokens and a little room."""
    return len(spec.prompt) + spec.new_tokens + 16


def describe(spec: RunSpec) -> str:
    """How the engine holds the weights in this run."""
    if spec.engine == "llama.cpp":
        return "mmap"
    if spec.memory_limit is not None:
        return "memory limit"  # the runner adds the expert cache the engine chose
    if spec.budget is None:
        return "resident"
    from tiermoe.offload.tiers.budget import format_bytes

    what = "expert cache" if spec.engine == "tiermoe" else "disk offload, CPU"
    return f"{what} {format_bytes(spec.budget)}" + (f", prefetch {spec.prefetch}" if spec.prefetch else "")


def _time_tokens(tokens_iter, n: int, prompt_len: int, start: float) -> Timed:
    """Consume `n` tokens from a generator; (prefill tok/s, decode tok/s, ids)."""
    ids, first = [], None
    for tok in tokens_iter:
        if first is None:
            first = time.perf_counter()
        ids.append(int(tok))
        if len(ids) == n:
            break
    end = time.perf_counter()
    return prompt_len / (first - start), (n - 1) / (end - first), ids


def _repeat(run: EngineRun, spec: RunSpec, generate: Callable[[int], Timed]) -> EngineRun:
    """An untimed 4-token warm-up if asked, then spec.runs timed generations of spec.new_tokens into `run`."""
    run.load_peak_rss_bytes = process_io()[1]
    if spec.warmup:
        generate(4)
    for _ in range(spec.runs):
        prefill, decode, ids = generate(spec.new_tokens)
        run.prefill_tok_s.append(prefill)
        run.decode_tok_s.append(decode)
        run.token_ids.append(ids)
    return run


def run_tiermoe(spec: RunSpec) -> EngineRun:
    """tiermoe through its public Python API (LLM.generate); spec.budget sets --expert-cache."""
    from tiermoe import LLM, SamplingParams

    start = time.perf_counter()
    sizing = {"expert_cache": spec.budget}
    if spec.memory_limit is not None:  # the context llama.cpp is given, whose KV cache the limit must reserve
        sizing = {"memory_limit": spec.memory_limit, "max_model_len": context_length(spec)}
    if spec.prefetch is not None:
        sizing["prefetch"] = spec.prefetch
    llm = LLM(spec.model, dtype=spec.dtype, threads=spec.threads, **sizing)
    run = EngineRun("tiermoe", spec.dtype, describe(spec), load_s=time.perf_counter() - start)
    if llm.memory is not None:
        from tiermoe.offload.tiers.budget import format_bytes

        run.setting = f"memory limit -> expert cache {format_bytes(llm.memory.experts)}" + (
            f", prefetch {spec.prefetch}" if spec.prefetch else "")

    def generate(n: int) -> Timed:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        if spec.budget is None and llm.memory is None:
            out = llm.generate([spec.prompt], params, use_tqdm=False)[0]
            m = out.metrics
            return (len(spec.prompt) / (m.first_token_time - m.arrival_time),
                    (n - 1) / (m.finish_time - m.first_token_time), list(out.outputs[0].token_ids))
        return _stream_with_io(llm, spec.prompt, params, run)

    return _repeat(run, spec, generate)


def _stream_with_io(llm, prompt: list[int], params, run: EngineRun) -> Timed:
    """One offloaded generation timed as llama.cpp's is, with the expert cache's view of it in run.extra, decode
    apart: the reads after the first token are what the disk bound of decode counts."""
    start = time.perf_counter()
    outputs = llm.stream(prompt, params)
    out = next(outputs)
    first, prefill = time.perf_counter(), llm.engine.store.stats.total
    for out in outputs:  # noqa: B007 - the last one is the finished output
        pass
    end = time.perf_counter()
    total, decoded = out.stats["total"], llm.engine.store.stats.total
    steps = max(len(out.outputs[0].token_ids) - 1, 1)
    run.extra = {"hit_rate": total["hit_rate"], "expert_bytes_read": total["bytes_read"],
                 "memory": out.stats.get("memory"),
                 "decode": {"bytes_read_per_token": (decoded.bytes_read - prefill.bytes_read) / steps,
                            "stall_s_per_token": (decoded.stall_time - prefill.stall_time) / steps,
                            "hit_rate": _hit_rate(decoded.hits - prefill.hits, decoded.misses - prefill.misses)}}
    return len(prompt) / (first - start), steps / (end - first), list(out.outputs[0].token_ids)


def _hit_rate(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 1.0


def run_llama_cpp(spec: RunSpec) -> EngineRun:
    """llama-cpp-python on the GGUF of spec.dtype, with its defaults (mmap) and greedy sampling."""
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=spec.gguf, n_ctx=context_length(spec), n_threads=spec.threads,
                n_threads_batch=spec.threads, seed=0, verbose=False)
    run = EngineRun("llama.cpp", spec.dtype, describe(spec), load_s=time.perf_counter() - start)

    def generate(n: int) -> Timed:
        llm.reset()  # no KV reuse between runs: every run processes the whole prompt
        t0 = time.perf_counter()
        return _time_tokens(llm.generate(spec.prompt, temp=0.0, repeat_penalty=1.0), n, len(spec.prompt), t0)

    return _repeat(run, spec, generate)


def run_transformers(spec: RunSpec) -> EngineRun:
    """transformers' generate; with spec.budget, accelerate's disk offload (weights past the budget on disk)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.decode_speed import _Clock

    torch.set_num_threads(spec.threads)
    kwargs: dict = {"dtype": getattr(torch, spec.dtype)}
    if spec.budget is not None:
        kwargs |= {"device_map": "auto", "max_memory": {"cpu": spec.budget, "disk": 1 << 50},
                   "offload_folder": spec.offload_dir}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec.model, **kwargs).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: exactly n tokens, EOS not suppressed either
    run = EngineRun("transformers", spec.dtype, describe(spec), load_s=time.perf_counter() - start)
    if spec.budget is not None:
        placed = list(getattr(model, "hf_device_map", {}).values())
        run.extra = {"modules_on_disk": placed.count("disk"), "modules_on_cpu": placed.count("cpu")}
    ids = torch.tensor([spec.prompt])

    def generate(n: int) -> Timed:
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, streamer=clock)
        end = time.perf_counter()
        return len(spec.prompt) / (clock.first - t0), (n - 1) / (end - clock.first), out[0, len(spec.prompt):].tolist()

    return _repeat(run, spec, generate)


RUNNERS = {"tiermoe": run_tiermoe, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


def process_io() -> tuple[int, int]:
    """(read_bytes from /proc/self/io, VmHWM bytes) of this process."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(io["read_bytes"]), int(status["VmHWM"].split()[0]) * 1024
