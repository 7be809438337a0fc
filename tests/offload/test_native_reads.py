"""Expert reads on native threads: the tokens of all-resident, the budget kept, faults named, the Python readers still
serving when the engine is off (the whole lossless matrix runs on whichever the machine has)."""

import contextlib
import ctypes
import errno
import mmap
import os
import shutil

import pytest
import torch

from tests.offload.test_tiered_store import GREEDY, PROMPTS, tokens
from tiermoe import LLM, SamplingParams
from tiermoe.convert import convert
from tiermoe.errors import ExpertIOError
from tiermoe.offload.policies import make_policy
from tiermoe.offload.tiers.direct_io import DirectReader
from tiermoe.offload.tiers.expert_reads import slot_nbytes
from tiermoe.offload.tiers.native_reads import GatherRead, NativeRead, engine_module
from tiermoe.offload.tiers.ram import TieredStore, min_budget
from tiermoe.offload.tiers.store import ResidentStore

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


@contextlib.contextmanager
def page_reads(folder, pages: int, threads: int):
    """(engine, file descriptor, random file bytes, buffer as large, its address) over a file of `pages` pages."""
    data = os.urandom(pages * 4096)
    path = folder / "data.bin"
    path.write_bytes(data)
    engine = engine_module().ReadEngine(threads)
    fd = os.open(path, os.O_RDONLY)
    buf = mmap.mmap(-1, len(data))
    try:
        yield engine, fd, data, buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))
    finally:
        engine.close()
        os.close(fd)


def test_the_pieces_of_one_read_are_shared_by_the_threads_and_the_first_failed_piece_is_named(tmp_path):
    with page_reads(tmp_path, 16, threads=4) as (engine, fd, data, buf, base):
        # 16 pieces of a page each, file page i into buffer page 15 - i
        pieces = [(fd, i * 4096, 4096, 4096, base + (15 - i) * 4096, False) for i in range(16)]
        job = engine.submit(pieces)
        assert engine.wait_any([job]) == job
        error, failed, _, nbytes, seconds = engine.take(job)
        assert (error, failed, nbytes) == (0, -1, len(data)) and seconds >= 0
        assert all(buf[(15 - i) * 4096:(16 - i) * 4096] == data[i * 4096:(i + 1) * 4096] for i in range(16))
        # pieces 5 and 9 cannot be read (a descriptor open for writing only): the job fails at piece 5
        bad = os.open(tmp_path / "data.bin", os.O_WRONLY)
        pieces[5] = pieces[9] = (bad, 0, 4096, 4096, base, False)
        job = engine.submit(pieces)
        engine.wait_any([job])
        error, failed, *_ = engine.take(job)
        os.close(bad)
        assert (error, failed) == (errno.EBADF, 5)


def test_reads_queued_back_to_back_while_the_readers_are_busy_all_land(tmp_path):
    """Submit wakes one reader and each reader the next while pieces are left: no piece is left unread when jobs
    arrive faster than the readers wake."""
    with page_reads(tmp_path, 64, threads=3) as (engine, fd, data, buf, base):
        # 8 jobs of 8 one-page pieces each, file page p into buffer page 63 - p
        jobs = [engine.submit([(fd, p * 4096, 4096, 4096, base + (63 - p) * 4096, False)
                               for p in range(8 * j, 8 * j + 8)]) for j in range(8)]
        for job in jobs:
            engine.wait_any([job])
            assert engine.take(job)[:4] == (0, -1, 0, 8 * 4096)
        assert all(buf[(63 - p) * 4096:(64 - p) * 4096] == data[p * 4096:(p + 1) * 4096] for p in range(64))


def test_an_expert_read_is_split_into_a_piece_per_thread(converted):
    folder = converted["qwen3_moe"]
    llm = LLM(folder)
    index, layers, k = llm.index, [b.layer for b in llm.model.moe_blocks], llm.model.shape.top_k
    key = (layers[0], 0)
    store = TieredStore(index, torch.float32, min_budget(index, layers, k, torch.float32), make_policy("lru"), layers,
                        k, io_threads=2)
    store.native.MIN_PIECE = 4096  # the tiny experts are a few pages
    try:
        read = store._submit(key)
        sizes = [n for _, _, n, _ in store._plan(key).layout.reads]
        assert sum(sizes) > 2 * 4096, sizes  # more than a page a thread
        assert len(read.owners) >= 2 and len({i for i, _ in read.owners}) == len(sizes)
        w, nbytes, _ = read.result()
        expected = dict(ResidentStore(index, torch.float32).fetch(*key[:1], [key[1]]))[key[1]]
        assert torch.equal(w.gate_up, expected.gate_up) and torch.equal(w.down, expected.down)
    finally:
        del w
        store.close()


def test_native_reads_take_the_page_cache_descriptor_once_a_file_has_fallen_back(converted):
    """A read's pieces are planned once per expert; a file that fell back to page-cache reads since (its O_DIRECT
    descriptor refused, tiers/direct_io.py) is read through its new descriptor, not the refused one again."""
    folder = converted["qwen3_moe"]
    llm = LLM(folder)
    index, layers, k = llm.index, [b.layer for b in llm.model.moe_blocks], llm.model.shape.top_k
    store = TieredStore(index, torch.float32, min_budget(index, layers, k, torch.float32), make_policy("lru"), layers,
                        k, io_threads=2)
    expected = dict(ResidentStore(index, torch.float32).fetch(layers[0], [0, 1]))
    try:
        if not store.reader.is_direct(folder / "experts.bin"):
            pytest.skip("O_DIRECT unavailable here")
        for e in (0, 1):
            if e == 1:  # what a read refused with EINVAL does
                store.reader._reopen_buffered(os.fspath(folder / "experts.bin"), "refused in this test")
            read = store._submit((layers[0], e))
            fd, direct = store.reader.descriptor(folder / "experts.bin")
            assert direct == (e == 0)
            assert {p[0] for p in store.native._plan(read.lay)[2]} == {fd}
            w, _, _ = read.result()
            assert torch.equal(w.gate_up, expected[e].gate_up) and torch.equal(w.down, expected[e].down)
            del w, read
    finally:
        store.close()


# --- gathers: experts not read in place (whole pages would pad them out), with no dtype to convert ----------------

@pytest.fixture(scope="module")
def small(tiny_models, folders):
    """Checkpoints whose experts are far below a page (save_pretrained's per-expert tensors): none read in place."""
    return {"qwen3_moe": tiny_models("qwen3_moe"), "mixtral": tiny_models("mixtral"),
            "llada2_moe": folders["llada2_moe"]}


@pytest.mark.parametrize("family, settings", [("qwen3_moe", dict(expert_cache="min", cache_policy="lru")),
                                              ("mixtral", dict(expert_cache="25%", cache_policy="dali",
                                                               prefetch="plain")),
                                              ("llada2_moe", dict(expert_cache="25%", tau=2))])
def test_small_experts_are_gathered_natively_with_the_all_resident_tokens_in_slots_the_cache_charges(
        small, family, settings, monkeypatch):
    folder = small[family]
    diffusion = family == "llada2_moe"
    run = _diffusion_tokens if diffusion else tokens
    expected = run(LLM(folder))
    for native in (True, False):
        monkeypatch.setenv("TIERMOE_NATIVE_IO", "on" if native else "off")
        llm = LLM(folder, **_budget(folder, settings))
        store = llm.store
        plans = [store._plan(k) for k in llm.index.experts()]
        assert not any(p.kept for p in plans) and all(p.gather is not None for p in plans)
        assert (store.native is not None) == native
        assert run(llm) == expected
        assert store.stats.total.misses > 0
        ahead = sum(store.cache.size(k) for k in store.inflight)
        assert store.cache.used == store.resident_bytes + ahead <= store.budget
        assert all(w.nbytes == store.cache.size(k) == slot_nbytes(llm.index.expert(*k), torch.float32)
                   for k, w in store.weights.items())
        if native:
            assert store.reader.pool.in_use == 0  # the bounce buffers are the engine's, not the reader's pool
        store.close()


def _diffusion_tokens(llm):
    out = llm.generate([[5, 9, 14, 3, 22]], SamplingParams(temperature=0, max_tokens=16, block_length=8, steps=8))
    return [o.outputs[0].token_ids for o in out]


def test_a_gather_job_copies_its_ranges_out_of_the_bounce_buffer_once_read_and_not_when_a_piece_fails(tmp_path):
    out = torch.zeros(6000, dtype=torch.uint8)
    base = out.data_ptr()
    with page_reads(tmp_path, 8, threads=2) as (engine, fd, data, _, _):
        # file pages 2..4 into bounce bytes [0, 12288), page 6 into [12288, 16384); then four ranges out of it
        pieces = [(fd, 2 * 4096, 3 * 4096, 3 * 4096, 0, False), (fd, 6 * 4096, 4096, 4096, 3 * 4096, False)]
        copies = [(100, base, 3000), (3 * 4096 + 7, base + 3000, 1000), (5000, base + 4000, 1000),
                  (0, base + 5000, 1000)]
        for _ in range(3):  # bounce buffers are reused
            out.zero_()
            job = engine.submit(pieces, 4 * 4096, copies)
            engine.wait_any([job])
            error, _, _, nbytes, _ = engine.take(job)
            assert (error, nbytes) == (0, 4 * 4096)
            assert bytes(out.numpy()) == (data[2 * 4096 + 100:2 * 4096 + 3100] + data[6 * 4096 + 7:6 * 4096 + 1007]
                                          + data[2 * 4096 + 5000:2 * 4096 + 6000] + data[2 * 4096:2 * 4096 + 1000])
        bad = os.open(tmp_path / "data.bin", os.O_WRONLY)
        out.zero_()
        job = engine.submit([pieces[0], (bad, 0, 4096, 4096, 3 * 4096, False)], 4 * 4096, copies)
        engine.wait_any([job])
        error, failed, *_ = engine.take(job)
        os.close(bad)
        assert (error, failed) == (errno.EBADF, 1) and not out.any()  # nothing copied from a failed read


class RefusingEngine:
    """The engine, except that every read ends as O_DIRECT refused at read time (EINVAL)."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def take(self, job):
        self.engine.take(job)
        return errno.EINVAL, 0, 0, 0, 0.0


def test_a_gather_refused_o_direct_at_read_time_is_read_and_placed_on_the_calling_thread(small):
    index = LLM(small["mixtral"]).index
    layers = sorted({layer for layer, _ in index.experts()})
    store = TieredStore(index, torch.float32, min_budget(index, layers, 2, torch.float32), make_policy("lru"), layers,
                        2, io_threads=2)
    reference = ResidentStore(index, torch.float32)
    try:
        store.native.engine = RefusingEngine(store.native.engine)
        for key in [(layers[0], 0), (layers[-1], 3)]:
            read = store._submit(key)
            assert isinstance(read, GatherRead)
            w, _, _ = read.result()
            (_, expected), = reference.fetch(key[0], [key[1]])
            assert torch.equal(w.gate_up, expected.gate_up) and torch.equal(w.down, expected.down)
        assert store.reader.pool.in_use == 0
    finally:
        store.close()
