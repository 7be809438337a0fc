"""Expert reads on native threads: the tokens of all-resident, the budget kept, faults named, the Python readers still
serving when the engine is off (the whole lossless matrix runs on whichever the machine has)."""

import os
import shutil

import pytest
import torch

from tests.offload.test_tiered_store import GREEDY, PROMPTS, tokens
from tiermoe import LLM
from tiermoe.convert import convert
from tiermoe.errors import ExpertIOError
from tiermoe.offload.policies import make_policy
from tiermoe.offload.tiers.direct_io import DirectReader
from tiermoe.offload.tiers.native_reads import NativeRead, engine_module
from tiermoe.offload.tiers.ram import TieredStore, min_budget

pytestmark = pytest.mark.skipif(engine_module() is None, reason="no native read engine on this machine")


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    """Tiny checkpoints in the converted layout (every expert read in place), on a disk-backed folder."""
    root = tmp_path_factory.mktemp("native")
    return {f: convert(tiny_models(f, "fused"), root / f) for f in ("qwen3_moe", "mixtral")}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("settings", [dict(expert_cache="min", cache_policy="lru"),
                                      dict(expert_cache="25%", cache_policy="dali", prefetch="plain"),
                                      dict(expert_cache="50%", cache_policy="learned")])
def test_native_and_python_readers_give_the_all_resident_tokens_within_the_budget(converted, family, settings,
                                                                                   monkeypatch):
    folder = converted[family]
    expected = tokens(LLM(folder))
    for native in (True, False):
        monkeypatch.setenv("TIERMOE_NATIVE_IO", "on" if native else "off")
        llm = LLM(folder, **_budget(folder, settings))
        store = llm.store
        assert (store.native is not None) == native
        assert tokens(llm) == expected
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:1], GREEDY)] == expected[:1]  # warm store
        assert store.stats.total.misses > 0 and store.stats.total.bytes_read > 0
        ahead = sum(store.cache.size(k) for k in store.inflight)  # prefetched, not yet collected
        assert store.cache.used == store.resident_bytes + ahead <= store.budget
        assert store.reader.pool.in_use == len(store.weights) + len(store.inflight)  # no buffer leaked
        store.close()


def _budget(folder, settings):
    if settings["expert_cache"] != "min":
        return settings
    llm = LLM(folder)
    layers = [b.layer for b in llm.model.moe_blocks]
    return {**settings, "expert_cache": min_budget(llm.index, layers, llm.model.shape.top_k, torch.float32)}


class BadDescriptor(DirectReader):
    """Hands the engine a descriptor open for writing only: every native read of it fails (EBADF)."""

    def __init__(self, path):
        super().__init__(max_workers=1)
        self.bad = os.open(path, os.O_WRONLY)

    def descriptor(self, path):
        return self.bad, False


def test_a_failed_native_read_names_file_and_expert_and_leaves_the_store_consistent(converted):
    folder = converted["mixtral"]
    expected = tokens(LLM(folder))
    llm = LLM(folder, expert_cache="50%")
    store = llm.store
    healthy = store.reader
    store.native.reader = store.reader = BadDescriptor(folder / "experts.bin")
    with pytest.raises(ExpertIOError, match=r"expert \d+ of layer \d+ from .*experts\.bin failed: .*Bad file"):
        tokens(llm)
    assert set(store.cache.resident) == set(store.weights) | set(store.inflight)  # a failed read ahead is retried
    assert store.cache.used <= store.budget
    os.close(store.reader.bad)
    store.native.reader = store.reader = healthy
    assert tokens(llm) == expected


def test_a_queued_read_cancelled_frees_its_buffer_and_a_started_one_lands(converted):
    folder = converted["qwen3_moe"]
    llm = LLM(folder)
    index, layers, k = llm.index, [b.layer for b in llm.model.moe_blocks], llm.model.shape.top_k
    store = TieredStore(index, torch.float32, min_budget(index, layers, k, torch.float32), make_policy("lru"), layers,
                        k, io_threads=1)
    try:
        reads = [store._submit(key) for key in index.experts()]
        assert len(reads) >= 8 and all(isinstance(r, NativeRead) for r in reads)
        reads[0].wait()
        # newest first: the one reader thread takes them oldest first, so the tail is still queued when cancelled
        cancelled = [r for r in reversed(reads) if r.cancel()]
        assert reads[-1] in cancelled and all(r.cancelled() and r.done() for r in cancelled)
        landed = [r for r in reads if not r.cancelled()]
        assert reads[0] in landed
        for r in landed:
            w, nbytes, _ = r.result()
            assert nbytes >= w.nbytes and w.gate_up.dtype == torch.float32
        del w, r
        reads.clear(), landed.clear()  # the last holders of the weights
        assert store.reader.pool.in_use == 0
    finally:
        store.close()


def test_experts_file_changed_under_a_running_engine_is_named(converted, tmp_path):
    folder = shutil.copytree(converted["mixtral"], tmp_path / "c")
    llm = LLM(folder, expert_cache="25%")
    assert llm.store.native is not None
    os.utime(folder / "experts.bin", ns=(0, 0))
    with pytest.raises(ExpertIOError, match=r"experts\.bin changed .*expert \d+ of layer \d+"):
        tokens(llm)
