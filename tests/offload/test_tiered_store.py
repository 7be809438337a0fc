"""The RAM tier over the disk: budgets checked, the budget never exceeded under any request sequence, faults contained.

Lossless generation at every budget, policy and prefetcher, on every family: test_lossless_matrix.py.
"""

import os
import shutil
import threading
import time
from collections import deque

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiermoe import LLM, SamplingParams
from tiermoe.convert import convert
from tiermoe.errors import CheckpointError, ConfigError, ExpertIOError
from tiermoe.offload.policies import make_policy
from tiermoe.offload.tiers.direct_io import DirectReader, ShortReadError
from tiermoe.offload.tiers.expert_reads import in_place, read_ranges, slot_nbytes
from tiermoe.offload.tiers.ram import TieredStore, min_budget
from tiermoe.offload.tiers.store import ResidentStore, build_expert, loaded_nbytes

PROMPTS = [[3, 17, 42, 9, 77, 5, 61, 23], [88, 1, 64], [12, 99, 31, 7]]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def disk_models(tiny_models, tmp_path_factory):
    """Tiny checkpoints copied to a disk-backed folder (O_DIRECT works there, unlike tmpfs), plus converted copies."""
    root = tmp_path_factory.mktemp("disk", numbered=True)
    cache = {}

    def get(family, layout):
        if (family, layout) not in cache:
            if layout == "converted":
                cache[(family, layout)] = convert(get(family, "fused"), root / f"{family}-converted")
            else:
                cache[(family, layout)] = shutil.copytree(tiny_models(family, layout), root / f"{family}-{layout}")
        return cache[(family, layout)]

    return get


def budgets(folder):
    llm = LLM(folder)
    index, layers = llm.index, [b.layer for b in llm.model.moe_blocks]
    total = sum(loaded_nbytes(s, torch.float32) for s in index.experts().values())
    return ["100%", "50%", "25%", min_budget(index, layers, llm.model.shape.top_k, torch.float32)], total


def test_budget_below_one_token_is_refused_with_the_minimum(disk_models):
    folder = disk_models("qwen3_moe", "per_expert")
    least = budgets(folder)[0][-1]
    with pytest.raises(ConfigError, match=rf"the minimum is .*\({least} bytes\)"):
        LLM(folder, expert_cache=least - 1)
    with pytest.raises(ConfigError, match="cannot read budget"):
        LLM(folder, expert_cache="lots")
    with pytest.raises(ConfigError, match="cannot run live"):
        LLM(folder, expert_cache="50%", cache_policy="belady")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_resident_bytes_never_exceed_the_budget(data, disk_models):
    folder = disk_models("qwen3_moe", "converted")
    llm = LLM(folder)
    index, layers, k = llm.index, [b.layer for b in llm.model.moe_blocks], llm.model.shape.top_k
    least = min_budget(index, layers, k, torch.float32)
    total = sum(loaded_nbytes(s, torch.float32) for s in index.experts().values())
    budget = data.draw(st.integers(least, total), label="budget")
    io_threads = data.draw(st.sampled_from([1, 2, 4]), label="io_threads")  # the stream window's depth
    grouped = data.draw(st.booleans(), label="grouped")  # fetch_groups: experts held together
    store = TieredStore(index, torch.float32, budget, make_policy(data.draw(st.sampled_from(["lru", "lfu"]))),
                        layers, k, io_threads=io_threads)
    reference = ResidentStore(index, torch.float32)
    # with or without a read ahead of a (mis)predicted set of a layer's experts
    ahead = st.none() | st.tuples(st.sampled_from(layers), st.lists(st.integers(0, 7), max_size=8))
    requests = data.draw(st.lists(st.tuples(st.sampled_from(layers), st.sets(st.integers(0, 7), min_size=1), ahead),
                                  min_size=1, max_size=12), label="requests")
    try:
        for layer, experts, prefetch in requests:
            ids = sorted(experts)
            got, peak, before = {}, 0, store.stats.streamed
            groups = (store.fetch_groups(layer, ids, prefetch=prefetch) if grouped
                      else ([item] for item in store.fetch(layer, ids, prefetch=prefetch)))
            for group in groups:
                # the experts being computed are resident, or streamed beside the cache within the budget (a group
                # holds no more streamed ones than the window reads at once); experts read ahead (in flight or
                # landed) hold room in the cache from the moment their read starts
                streamed = [store.cache.size((layer, e)) for e, _ in group if (layer, e) not in store.weights]
                ahead_bytes = sum(store.cache.size(k) for k in store.inflight)
                assert len(streamed) <= max(store.window, 1)
                assert store.cache.used + sum(streamed) <= budget
                assert store.resident_bytes + ahead_bytes <= store.cache.used
                peak = max(peak, store.cache.used)
                got.update(group)
            # streamed experts alive at once (reads in flight and the ones computed) fit beside the cache too
            assert peak + min(store.window, store.stats.streamed - before) * store.largest <= budget
            assert sorted(got) == ids
            for e, w in reference.fetch(layer, ids):
                assert torch.equal(got[e].gate_up, w.gate_up) and torch.equal(got[e].down, w.down)
    finally:
        store.close()


def test_experts_read_in_place_use_the_budgets_buffers_mapped_once(disk_models):
    """Every expert read in place into a buffer of one size: the store maps the budget's buffers at start and the
    cached, streamed and read-ahead experts all land in them, so nothing is mapped while the cache fills or after."""
    folder = disk_models("qwen3_moe", "converted")
    llm = LLM(folder)
    index, layers, k = llm.index, [b.layer for b in llm.model.moe_blocks], llm.model.shape.top_k
    size = slot_nbytes(index.expert(layers[0], 0), torch.float32)
    budget = min_budget(index, layers, k, torch.float32) + 3 * size + 100  # streams a batch's union of experts
    store = TieredStore(index, torch.float32, budget, make_policy("lru"), layers, k, io_threads=2)
    pool = store.reader.pool
    try:
        assert pool.arena_bytes == pool.live_bytes == budget // size * size
        reference = ResidentStore(index, torch.float32)
        for step in range(12):
            layer, ids = layers[step % len(layers)], sorted({(3 * step + i) % 8 for i in range(k + step % 3)})
            for group in store.fetch_groups(layer, ids, prefetch=(layers[(step + 1) % len(layers)], [step % 8])):
                for e, w in group:  # computed with, then dropped, as the model does
                    expected = dict(reference.fetch(layer, [e]))[e]
                    assert torch.equal(w.gate_up, expected.gate_up) and torch.equal(w.down, expected.down)
                del group, w
        assert store.stats.streamed > 0 and store.stats.prefetched > 0 and store.stats.evictions > 0
        assert pool.live_bytes == pool.peak_bytes == pool.arena_bytes <= budget  # no buffer mapped beyond them
    finally:
        store.close()


class SlowReader(DirectReader):
    """Reads that take a while, counting how many are in flight at once."""

    def __init__(self):
        super().__init__(max_workers=1)
        self.in_flight = self.most = 0
        self.lock = threading.Lock()

    def read(self, path, offset, nbytes):
        return self._slowly(super().read, path, offset, nbytes)

    def read_pages(self, path, offset, nbytes, into, at):
        return self._slowly(super().read_pages, path, offset, nbytes, into, at)

    def _slowly(self, read, *args):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.02)
        try:
            return read(*args)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_misses_beyond_the_cache_are_streamed_at_the_io_threads_depth(disk_models):
    """A batch's union of experts larger than the cache: the misses that are streamed (not kept) are read a window
    at a time (by default io_threads, within 1/16 of the budget), not one by one, and the cache gives up only that
    window's room."""
    folder = disk_models("qwen3_moe", "converted")
    llm = LLM(folder)
    index, layers, k = llm.index, [b.layer for b in llm.model.moe_blocks], llm.model.shape.top_k
    slot = slot_nbytes(index.expert(0, 0), torch.float32)
    small = TieredStore(index, torch.float32, 6 * slot, make_policy("lru"), layers, k, io_threads=3)
    small.close()
    assert small.window == 1  # 3 reads in flight would take more than 1/16 of a 6-expert budget
    store = TieredStore(index, torch.float32, 6 * slot, make_policy("lru"), layers, k, io_threads=3, stream_window=3)
    store.reader = SlowReader()
    try:
        deque(store.fetch(layers[0], list(range(6))), maxlen=0)  # fills the cache
        deque(store.fetch(layers[1], list(range(6))), maxlen=0)  # nothing is old enough to evict: all streamed
        assert store.stats.streamed == 6
        assert store.reader.most == 3
        # three streamed experts alive at once: the reads in flight, and the one being computed until its release
        assert store.cache.capacity == 6 * slot - 3 * slot
        assert store.reader.pool.peak_bytes <= 6 * slot
    finally:
        store.close()


class FaultyReader(DirectReader):
    """Fails the reads of chosen byte ranges: an injected I/O error or short read."""

    def __init__(self, fail_offsets: set[int], error: str):
        super().__init__(max_workers=1)
        self.fail_offsets, self.error = fail_offsets, error

    def read(self, path, offset, nbytes):
        self._fail(path, offset, nbytes)
        return super().read(path, offset, nbytes)

    def read_pages(self, path, offset, nbytes, into, at):  # the reads of an expert used in place
        self._fail(path, offset, nbytes)
        return super().read_pages(path, offset, nbytes, into, at)

    def _fail(self, path, offset, nbytes):
        if any(offset <= f < offset + nbytes for f in self.fail_offsets):
            if self.error == "eio":
                raise OSError(5, "Input/output error", os.fspath(path))
            raise ShortReadError(os.fspath(path), offset, nbytes, nbytes // 2)


@pytest.mark.parametrize("error", ["eio", "short"])
def test_read_faults_name_file_and_expert_and_leave_the_store_consistent(error, disk_models):
    folder = disk_models("mixtral", "converted")
    expected = tokens(LLM(folder))
    llm = LLM(folder, expert_cache="50%")
    spec = llm.index.expert(1, 3)
    llm.store.reader = FaultyReader({spec.gate.offset}, error)
    with pytest.raises(ExpertIOError, match=r"expert 3 of layer 1 from .*experts\.bin"):
        for _ in range(4):  # expert 3 of layer 1 is routed to by some prompt
            tokens(llm)
    store = llm.store
    assert set(store.cache.resident) == set(store.weights)
    assert store.cache.used == store.resident_bytes <= store.budget
    llm.store.reader = DirectReader(max_workers=1)
    assert tokens(llm) == expected


def test_checkpoint_changed_under_a_running_engine(disk_models, tmp_path):
    folder = shutil.copytree(disk_models("mixtral", "per_expert"), tmp_path / "m")
    llm = LLM(folder, expert_cache="25%")
    path = next(folder.glob("*.safetensors"))
    os.utime(path, ns=(0, 0))
    with pytest.raises(ExpertIOError, match=r"model\.safetensors changed .*expert \d+ of layer \d+"):
        tokens(llm)


def test_converted_experts_changed_after_conversion(disk_models, tmp_path):
    folder = shutil.copytree(disk_models("mixtral", "converted"), tmp_path / "c")
    with open(folder / "experts.bin", "r+b") as f:
        f.truncate(os.path.getsize(folder / "experts.bin") - 4096)
    with pytest.raises(CheckpointError, match=r"experts\.bin changed after conversion"):
        LLM(folder)


def test_converted_experts_are_views_of_their_read_buffers_which_outlive_an_eviction_while_in_use(disk_models):
    """In the converted layout at the compute dtype an expert's weights are its read buffer (gate | up and down
    share it: no copy). Its eviction does not recycle the buffer while a caller still holds the weights; dropping
    them does."""
    folder = disk_models("mixtral", "converted")
    llm = LLM(folder)
    index, layers, k = llm.index, [b.layer for b in llm.model.moe_blocks], llm.model.shape.top_k
    reference = ResidentStore(index, torch.float32)
    expected = {e: w for e, w in reference.fetch(0, [0, 1])}
    store = TieredStore(index, torch.float32, min_budget(index, layers, k, torch.float32), make_policy("lru"),
                        layers, k)
    pool = store.reader.pool
    try:
        held = dict(store.fetch(0, [0, 1]))  # beyond the fetch contract: keep both while more is read
        assert all(in_place(index.expert(0, e), torch.float32) for e in (0, 1))
        assert all(w.gate_up.untyped_storage().data_ptr() == w.down.untyped_storage().data_ptr()
                   for w in held.values()), "one read buffer holds gate | up and down"
        for experts in ([2, 3], [4, 5], [6, 7]):
            deque(store.fetch(0, experts), maxlen=0)  # used and dropped one by one, as the model does
        assert (0, 0) not in store.weights and pool.in_use == 2 + len(store.weights)
        for e, w in held.items():  # the evicted buffers were not reused by the reads since
            assert torch.equal(w.gate_up, expected[e].gate_up) and torch.equal(w.down, expected[e].down)
        del held, w
        assert pool.in_use == len(store.weights)
    finally:
        store.close()
    assert not in_place(index.expert(0, 0), torch.bfloat16), "a dtype conversion copies"


@pytest.mark.parametrize("layout", ["per_expert", "fused", "converted"])
def test_one_read_per_run_of_adjacent_parts(disk_models, layout):
    spec = LLM(disk_models("qwen3_moe", layout)).index.expert(0, 1)
    ranges = read_ranges(spec, gap=0)
    assert sum(n for _, _, n in ranges) == spec.nbytes
    assert len(ranges) == (1 if layout != "fused" else 2)  # fused: the gate_up_proj rows, then the down_proj rows
    assert len(read_ranges(spec)) == 1  # the tiny fused tensors lie within COALESCE_GAP of each other


@pytest.mark.parametrize(("source", "compute"), [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
def test_experts_assembled_on_an_io_thread_equal_build_expert_and_start_no_threads(tmp_path, source, compute):
    """build_expert, run on an I/O thread over the tensors as the checkpoint reader reads them, gives the weights
    safetensors' own loader gives (gate | up, in the dtype kept for the compute dtype), and the copy starts no OpenMP
    team of the I/O thread's own: with more OpenMP threads than cores libgomp stops spinning between parallel
    regions and the model's decode slowed to 0.7x (build_expert's note)."""
    from safetensors.torch import load_file, save_file

    from tiermoe.checkpoint import read_header

    torch.manual_seed(0)
    save_file({name: torch.randn(shape).to(source) for name, shape in (("gate", (512, 384)), ("up", (512, 384)),
                                                                        ("down", (384, 512)))},
              tmp_path / "expert.safetensors")
    parts = read_header(tmp_path / "expert.safetensors")
    gate, up, down = (parts[name].read() for name in ("gate", "up", "down"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    out = {}

    def work():
        before = len(os.listdir("/proc/self/task"))
        out["weights"] = build_expert(gate, up, down, compute)
        out["started"] = len(os.listdir("/proc/self/task")) - before

    try:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(threads)
    ref = load_file(tmp_path / "expert.safetensors")
    kept = torch.bfloat16 if source == torch.bfloat16 else compute  # kernels.weight_dtype
    w = out["weights"]
    assert w.gate_up.dtype == w.down.dtype == kept
    assert torch.equal(w.gate_up, torch.cat([ref["gate"], ref["up"]]).to(kept))
    assert torch.equal(w.down, ref["down"].to(kept))
    assert w.gate_up.data_ptr() != gate.data_ptr() and w.down.data_ptr() != down.data_ptr()  # copies, not views
    assert out["started"] == 0


@pytest.mark.parametrize(("dtype", "inner", "kept"), [(torch.bfloat16, 256, True), (torch.float32, 256, True),
                                                      (torch.float32, 100, False)])
def test_mixtral_experts_are_read_in_place_when_w2_is_whole_pages(tmp_path, dtype, inner, kept):
    """Mixtral's files hold w1 (gate), w2 (down), w3 (up) in that order: when w2 is whole pages, gate and up still
    land back to back in one read buffer (direct reads of whole pages, up's first partial page copied from the down
    read's last), and that buffer is the weights: no copy, what the cache budgets. Either way the weights are the
    resident store's, bit for bit."""
    from safetensors.torch import save_file

    from tiermoe.checkpoint import CheckpointIndex
    from tiermoe.models.mixtral import sanitize
    from tiermoe.offload.tiers.expert_reads import layout, plan_read, read_expert

    hidden = 128
    torch.manual_seed(0)
    prefix = "model.layers.0.block_sparse_moe.experts"
    tensors = {f"{prefix}.{e}.{w}.weight": torch.randn(shape).to(dtype) for e in range(2)
               for w, shape in (("w1", (inner, hidden)), ("w2", (hidden, inner)), ("w3", (inner, hidden)))}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"pad": "x" * 37})  # data off a page boundary
    index = CheckpointIndex(tmp_path, sanitize)
    reference = ResidentStore(index, dtype)
    with DirectReader(max_workers=1) as reader:
        for e in range(2):
            spec = index.expert(0, e)
            assert spec.gate.offset < spec.down.offset < spec.up.offset and spec.gate.offset % 4096
            plan = plan_read(spec, dtype)
            assert plan.kept == kept == in_place(spec, dtype)
            w, nbytes = read_expert(reader, plan, dtype)
            (_, expected), = reference.fetch(0, [e])
            assert torch.equal(w.gate_up, expected.gate_up) and torch.equal(w.down, expected.down)
            if kept:
                assert layout(spec).patches, "up's first page is shared with gate's last"
                assert w.gate_up.untyped_storage().data_ptr() == w.down.untyped_storage().data_ptr()
                assert slot_nbytes(spec, dtype) == w.gate_up.untyped_storage().nbytes() <= spec.nbytes + 3 * 4096
                assert nbytes <= spec.nbytes + 3 * 4096
            del w
        assert reader.pool.in_use == 0
