"""Memory limits: how a limit splits, what is refused, and that a run stays inside what it declared.

The process-level checks run in fresh subprocesses (the test process's own RSS carries every other test), on a
tiny Mixtral whose experts (3 MiB each, 48 MiB in all) dominate its weights.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.peers import cgroup
from tiermoe import LLM, SamplingParams
from tiermoe.errors import ConfigError, RequestError
from tiermoe.memory import (
    MARGIN_MIN,
    MemoryPlan,
    Usage,
    kv_bytes_per_token,
    margin_of,
    minimum_limit,
    plan,
    read_buffer_bytes,
)
from tiermoe.models.loader import DiskEmbedding, load_model

MiB = 1 << 20
PROMPT = list(range(3, 23))
TOKENS = 24
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import transformers

    from tests.tiny_models import random_model

    config = transformers.MixtralConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2, max_position_embeddings=256, eos_token_id=None,
                                        bos_token_id=None, pad_token_id=None)
    path = tmp_path_factory.mktemp("memory") / "mixtral"
    random_model(config, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def resident_tokens(folder):
    llm = LLM(folder)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True))[0]
    return list(out.outputs[0].token_ids)


def split(limit, used=300 * MiB, weights=100 * MiB, min_experts=6 * MiB) -> MemoryPlan:
    return plan(Usage(limit, "memory_limit", used, "RSS"), used, weights, kv_per_token=1024, kv_tokens=4096,
                activations=10 * MiB, batched_tokens=512, read_buffer=3 * MiB, io_threads=2, min_experts=min_experts,
                embedding_on_disk=False)


def test_the_limit_splits_into_the_measured_footprint_the_reserves_and_the_experts():
    p = split(1000 * MiB)
    assert (p.runtime, p.weights, p.kv_cache, p.activations, p.read_buffers) == \
        (200 * MiB, 100 * MiB, 4 * MiB, 10 * MiB, 6 * MiB)
    assert p.margin == 40 * MiB  # 4% of the limit, above the 16 MiB floor
    assert p.experts == 1000 * MiB - 300 * MiB - 4 * MiB - 10 * MiB - 6 * MiB - 40 * MiB
    assert p.fixed + p.experts == p.limit
    assert split(360 * MiB).margin == MARGIN_MIN


@pytest.mark.parametrize("used", [280 * MiB, 350 * MiB, 900 * MiB, 3000 * MiB])
def test_the_minimum_it_names_is_exactly_the_smallest_limit_it_accepts(used):
    rest = split(10 << 40, used=used).fixed - margin_of(10 << 40)
    least = minimum_limit(rest, 6 * MiB)
    assert split(least, used=used).experts >= 6 * MiB
    with pytest.raises(ConfigError, match=rf"the minimum is .* \({least} bytes\)"):
        split(least - 1, used=used)


def test_kv_reserve_per_token_is_what_decoding_allocates(folder):
    llm = LLM(folder, kv_cache_memory="1MiB")
    llm.generate(PROMPT, SamplingParams(max_tokens=8))
    kv = llm.engine.kv
    assert kv.pool_bytes == kv_bytes_per_token(llm.model) * kv.block_size * kv.pool_blocks > 0
    assert kv.pool_blocks * kv.block_size >= len(PROMPT) + 8  # grown to what the request held, not beyond the budget
    assert kv.pool_bytes <= 1 << 20 and kv.used_bytes == 0  # within its budget, and all given back


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                    "llada2_moe"])
def test_every_family_runs_under_a_limit_with_its_resident_tokens(family, tiny_models, folders):
    model = folders[family] if family in folders else tiny_models(family)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    limited = LLM(model, memory_limit=f"{_rss() + 300 * MiB}")
    assert limited.memory is not None and limited.memory.kv_cache > 0
    assert limited.generate(PROMPT[:8], params)[0].outputs[0].token_ids == \
        LLM(model).generate(PROMPT[:8], params)[0].outputs[0].token_ids


def test_embedding_on_disk_reads_the_rows_the_resident_table_holds(folder):
    resident, _, _ = load_model(folder, torch.float32)
    on_disk, _, _ = load_model(folder, torch.float32, embedding_on_disk=True)
    assert isinstance(on_disk.model.embed_tokens, DiskEmbedding)
    ids = torch.tensor([5, 0, 255, 5, 17])
    assert torch.equal(on_disk.model.embed_tokens(ids), resident.model.embed_tokens(ids))


def test_a_limit_below_the_footprint_is_refused_naming_the_minimum(folder):
    with pytest.raises(ConfigError, match=r"memory_limit 1\.00 MiB .* is too small: .* the minimum is .* bytes\)"):
        LLM(folder, memory_limit="1MiB")
    with pytest.raises(ConfigError, match="memory_limit is a size"):
        LLM(folder, memory_limit="40%")


def test_requests_are_served_within_the_reserves(folder):
    """Under a limit, prompts longer than a forward's reserve are prefilled in chunks, requests that together exceed
    the KV reserve take turns, and only a request that alone exceeds it is refused."""
    llm = LLM(folder, memory_limit=f"{_rss() + 200 * MiB}", max_num_batched_tokens=16)
    assert llm.memory.batched_tokens == 16 and len(PROMPT) > 16
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    assert llm.generate(PROMPT, params)[0].outputs[0].token_ids == \
        LLM(folder).generate(PROMPT, params)[0].outputs[0].token_ids
    kv_tokens = llm.engine.kv.capacity_tokens
    assert kv_tokens <= llm.memory.kv_tokens
    long = SamplingParams(temperature=0, max_tokens=kv_tokens // 2, ignore_eos=True)  # 3 of them exceed the cache
    outs = llm.generate([PROMPT[:4]] * 3, long)
    assert [len(o.outputs[0].token_ids) for o in outs] == [kv_tokens // 2] * 3
    small = LLM(folder, kv_cache_memory=64 * llm.engine.kv.bytes_per_token)
    with pytest.raises(RequestError, match="needs KV cache for 68 tokens .* kv_cache_memory holds 64"):
        small.generate(PROMPT[:4], SamplingParams(max_tokens=64))


def test_an_expert_cache_given_with_a_limit_must_fit_in_it(folder):
    limit = f"{_rss() + 200 * MiB}"
    with pytest.raises(ConfigError, match="expert_cache 1.00 GiB does not fit memory_limit"):
        LLM(folder, memory_limit=limit, expert_cache="1GiB")
    assert LLM(folder, memory_limit=limit, expert_cache="25%").memory.experts == 12 * MiB


def test_idle_read_buffers_are_at_most_one_per_io_thread(folder):
    llm = LLM(folder, expert_cache="25%", io_threads=3)
    llm.generate([PROMPT] * 2, SamplingParams(temperature=0, max_tokens=4))
    pool = llm.store.reader.pool
    assert pool.max_bytes == 3 * read_buffer_bytes(llm.index, torch.float32)
    assert pool.idle_bytes <= pool.max_bytes
    # read in place: the reads used the buffers the budget maps once (kept idle within it), none beside it
    assert 0 < pool.live_bytes == pool.arena_bytes <= llm.store.budget
    converted = LLM(folder, dtype="bfloat16", expert_cache="25%", io_threads=3)
    converted.generate([PROMPT] * 2, SamplingParams(temperature=0, max_tokens=4))
    pool = converted.store.reader.pool
    assert pool.arena_bytes == 0 and 0 < pool.idle_bytes <= pool.max_bytes


def test_reads_in_place_reserve_nothing_and_their_buffers_stay_within_the_expert_budget(folder):
    """Experts read in place (fp32 checkpoint, fp32 compute): the read buffers are the cached and streamed experts,
    so a limit reserves nothing for them and every buffer ever mapped at once, idle ones too, fits the budget."""
    llm = LLM(folder, memory_limit=f"{_rss() + 200 * MiB}", expert_cache="25%")  # 4 of the 16 experts: streams
    assert llm.memory.read_buffers == 0
    llm.generate([PROMPT, PROMPT[5:], PROMPT[:7]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    pool = llm.store.reader.pool
    assert pool.peak_bytes <= llm.memory.experts
    assert llm.store.stats.streamed > 0 and pool.max_bytes >= llm.store.largest  # idle buffers are kept for reuse
    # converted on read (fp32 checkpoint, bf16 weights): a read buffer per I/O thread beside the budget
    converted = LLM(folder, dtype="bfloat16", memory_limit=f"{_rss() + 200 * MiB}")
    assert converted.memory.read_buffers == 2 * read_buffer_bytes(converted.index, torch.bfloat16) > 0


def test_without_a_limit_many_prompts_are_prefilled_together_uncapped(folder):
    llm = LLM(folder, max_model_len=32)
    assert len(llm.generate([PROMPT] * 3, SamplingParams(temperature=0, max_tokens=2))) == 3


RUN = """
import json, sys
from pathlib import Path
from tiermoe import LLM, SamplingParams, memory
args = json.loads(sys.argv[1])
limit = args["limit"]
if limit and limit.startswith("+"):  # above this process's RSS now (torch imported)
    limit = str(memory.rss() + int(limit[1:]))
llm = LLM(args["folder"], memory_limit=limit)
before = memory.rss()
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the decode alone
out = llm.generate(args["prompt"], SamplingParams(temperature=0, max_tokens=args["tokens"], ignore_eos=True))[0]
print(json.dumps({"tokens": list(out.outputs[0].token_ids), "plan": llm.memory and llm.memory.to_dict(),
                  "before": before, "peak": memory.peak_rss(), "resident_experts": llm.store.resident_bytes}))
"""


def run(folder, limit: str | None, preexec=None) -> subprocess.CompletedProcess:
    args = json.dumps({"folder": str(folder), "limit": limit, "prompt": PROMPT, "tokens": TOKENS})
    return subprocess.run([sys.executable, "-c", RUN, args], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=preexec, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_rss_growth_of_an_offloaded_decode_stays_within_the_budget_and_the_declared_reserves(folder, resident_tokens):
    proc = run(folder, f"+{64 * MiB}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    p = MemoryPlan(**{k: v for k, v in out["plan"].items() if k != "fixed"})
    assert 2 * 3 * MiB <= p.experts < 48 * MiB  # offloaded: the limit holds some experts, not all
    assert out["resident_experts"] <= p.experts
    growth = out["peak"] - out["before"]
    assert growth <= p.experts + p.kv_cache + p.activations + p.read_buffers + 4 * MiB, (growth, p)
    assert out["peak"] <= p.limit
    assert out["tokens"] == resident_tokens
    assert "expert cache" in proc.stderr  # the split is said


@pytest.mark.skipif(cgroup.unavailable() is not None, reason=str(cgroup.unavailable()))
def test_under_a_real_cgroup_limit_it_sizes_itself_stays_under_and_gives_the_resident_tokens(folder, resident_tokens):
    # 1. auto under a roomy limit: the footprint as the group's working set measures it
    with cgroup.MemoryGroup(f"tiermoe-test-{os.getpid()}-roomy", 4 << 30) as group:
        proc = run(folder, "auto", group.join)
    assert proc.returncode == 0, proc.stderr
    roomy = json.loads(proc.stdout.splitlines()[-1])["plan"]
    assert roomy["limit"] == 4 << 30 and roomy["limit_source"] == "cgroup"
    # 2. a limit with room for a third of the experts and no memory_limit given: the engine finds it does not fit
    rest = roomy["fixed"] - roomy["margin"]
    limit = (minimum_limit(rest, 16 * MiB) + 8 * MiB) // 4096 * 4096  # the kernel keeps whole pages
    with cgroup.MemoryGroup(f"tiermoe-test-{os.getpid()}-tight", limit) as group:
        proc = run(folder, None, group.join)
        stats = group.stats()
    assert proc.returncode == 0 and stats.oom_kills == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert "does not fit the cgroup's memory limit" in proc.stderr
    assert out["plan"]["limit"] == limit and 6 * MiB <= out["plan"]["experts"] < 48 * MiB
    assert stats.peak_bytes <= limit
    assert out["tokens"] == resident_tokens


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024
