"""Lossless under every offloading setting, on every family.

The all-resident run of each family's tiny checkpoint gives the reference tokens; every expert budget (100%, 50%,
25%, the minimum), live cache policy, prefetcher and, on the diffusion MoE family, TIDE refresh interval must give
exactly those tokens, for a batch of prompts of different lengths and for one prompt alone (run after it, on the
warm store). Meanwhile `Watch` checks what a user of a budget relies on, at every expert the store hands out: the
expert weights alive in RAM never exceed the budget, the cache's books agree, every requested expert comes back
once; and after each call, that the statistics add up (hits + misses = requests) and the setting really offloaded.
"""

from __future__ import annotations

import shutil
import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.decode.test_diffusion import LONG, SHORT
from tests.tiny_diffusion_models import build_tiny_diffusion
from tests.tiny_models import COMMON, FAMILIES, random_model
from tiermoe import LLM, SamplingParams, kernels
from tiermoe.convert import convert
from tiermoe.errors import ConfigError
from tiermoe.offload.placement.refresh_store import RefreshStore
from tiermoe.offload.policies import POLICIES
from tiermoe.offload.prefetch import AFFINITY_FILE, AffinityTable
from tiermoe.offload.tiers.direct_io import DirectReader
from tiermoe.offload.tiers.expert_reads import slot_nbytes
from tiermoe.offload.tiers.ram import min_budget
from tiermoe.offload.tiers.store import loaded_nbytes
from tiermoe.offload.tools.affinity_fit import count
from tiermoe.offload.tools.calibrate import calibrate
from tiermoe.outputs import RequestOutput
from tiermoe.sim.trace import Trace, TraceRecorder

AUTOREGRESSIVE = sorted(FAMILIES)
LIVE_POLICIES = sorted(name for name, cls in POLICIES.items() if not cls.needs_future)
PREFETCHERS = [None, "plain", "residual"]
BUDGETS = ["100%", "50%", "25%", "min"]

PROMPTS = [[3, 17, 42, 9, 77, 5, 61, 23, 40, 11], [88, 1, 64], [12, 99, 31, 7, 50]]
ALONE = [[54, 23, 70, 2, 45, 16]]
GREEDY = SamplingParams(temperature=0, max_tokens=16)

# Diffusion requests: steps below, equal to and above the block length; prompts shorter than a block and spanning
# blocks; a seeded sampled one too (its generator is the request's, so it must not depend on the store either).
MID = [5, 66, 7, 81, 9, 10, 110, 12, 13, 14]
DIFFUSION_BATCH = [
    (LONG, SamplingParams(temperature=0, max_tokens=24, block_length=8, steps=8, threshold=0.95)),
    (SHORT, SamplingParams(temperature=0, max_tokens=20, block_length=8, steps=3, threshold=0.5)),
    (MID, SamplingParams(temperature=0, max_tokens=16, block_length=16, steps=5, threshold=0.9)),
    (SHORT, SamplingParams(temperature=1.0, seed=1, max_tokens=12, block_length=4, steps=6, threshold=0.95)),
]
DIFFUSION_ALONE = [(MID, SamplingParams(temperature=0, max_tokens=12, block_length=4, steps=6, threshold=1.0))]


@dataclass
class Reference:
    """A model folder (calibrated for residual prefetch), its all-resident engine and the budgets to try."""

    folder: Path
    resident: LLM
    budgets: dict[str, int]  # "100%", "50%", "25%", "min" -> bytes
    runs: dict[str, object]  # "batch" / "alone" -> the requests (see generate)
    expected: dict[str, list[list[int]]]  # "batch" / "alone" -> the resident run's tokens

    @property
    def total(self) -> int:
        return self.budgets["100%"]


def generate(llm: LLM, requests) -> list[RequestOutput]:
    """Outputs of (prompts, params) or of [(prompt, params), ...]."""
    if isinstance(requests, tuple):
        prompts, params = requests
    else:
        prompts, params = [p for p, _ in requests], [s for _, s in requests]
    return llm.generate(prompts, params, use_tqdm=False)


def token_ids_of(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def reference(folder: Path, runs: dict) -> Reference:
    """Calibrate the residual prefetcher on the model's own random tokens, fit the affinity prefetcher's table on
    the routing of a few random prompts (its top-k read ahead, however unsure), and run the resident engine."""
    resident = LLM(folder)
    g = torch.Generator().manual_seed(0)
    calibrate(resident, torch.randint(resident.model.shape.vocab_size, (320,), generator=g).tolist(), chunk_tokens=64)
    prompts = torch.randint(resident.model.shape.vocab_size, (4, 8), generator=g).tolist()
    resident.generate(prompts, GREEDY, use_tqdm=False, record_trace=folder / "routing")
    AffinityTable(count(Trace.load(folder / "routing")).probs(1.0), resident.model.shape.top_k, "mean").save(
        folder / AFFINITY_FILE)
    layers, k = [b.layer for b in resident.model.moe_blocks], resident.model.shape.top_k
    total = sum(loaded_nbytes(s, torch.float32) for s in resident.index.experts().values())
    budgets = {"100%": total, "50%": total // 2, "25%": total // 4,
               "min": min_budget(resident.index, layers, k, torch.float32)}
    expected = {name: token_ids_of(generate(resident, r)) for name, r in runs.items()}
    return Reference(folder, resident, budgets, runs, expected)


@pytest.fixture(scope="module")
def autoregressive(tiny_models, tmp_path_factory):
    """(family, layout) -> Reference, built on first use; `converted` is `tiermoe convert` of the fused layout."""
    root, built = tmp_path_factory.mktemp("lossless"), {}

    def get(family: str, layout: str = "per_expert") -> Reference:
        if (family, layout) not in built:
            dst = root / f"{family}-{layout}"
            if layout == "converted":
                folder = convert(tiny_models(family, "fused"), dst)
            else:
                folder = shutil.copytree(tiny_models(family, layout), dst)
            built[(family, layout)] = reference(folder, {"batch": (PROMPTS, GREEDY), "alone": (ALONE, GREEDY)})
        return built[(family, layout)]

    return get


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    folder = build_tiny_diffusion("llada2_moe", tmp_path_factory.mktemp("lossless-dllm") / "llada2_moe")
    return reference(folder, {"batch": DIFFUSION_BATCH, "alone": DIFFUSION_ALONE})


@pytest.fixture(scope="module", autouse=True)
def costs_cache(tmp_path_factory):
    """tau="auto" profiles the machine once; keep that cache out of the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


class Watch:
    """Wraps an engine's expert store (its `fetch` and `fetch_groups`, and `_load` and the native readers' `gather`,
    where expert weights come into being) to check the budget's promises while the engine runs."""

    def __init__(self, llm: LLM):
        self.llm, self.store = llm, llm.store
        self.requests: Counter[int] = Counter()  # layer -> experts requested since the engine reset its statistics
        self.routed: set[tuple[int, int]] = set()
        self.alive = self.peak = 0  # bytes of expert weights the store made that something still references
        self._lock = threading.Lock()
        self.largest_group = 0  # most experts handed over at once (batched steps compute a group in one call)
        self.store.fetch, self.store._load = self._fetch(self.store.fetch), self._load(self.store._load)
        self.store.fetch_groups = self._fetch(self.store.fetch_groups, grouped=True)
        if getattr(self.store, "native", None) is not None:
            self.store.native.gather = self._gather(self.store.native.gather)

    def _load(self, load):
        def tracked(key):
            w, nbytes, seconds = load(key)
            held = self.store.cache.size(key)  # RAM the expert holds (its read buffers when used in place)
            self._count(held)
            weakref.finalize(w.gate_up, self._count, -held)
            return w, nbytes, seconds
        return tracked

    def _gather(self, gather):
        def tracked(spec, plan, on_error):
            read = gather(spec, plan, on_error)  # its slot, made now, is the weights
            assert plan.nbytes == read.weights.nbytes == slot_nbytes(spec, self.store.dtype)  # what the cache charges
            self._count(plan.nbytes)
            weakref.finalize(read.weights.gate_up, self._count, -plan.nbytes)
            return read
        return tracked

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.alive += nbytes
            self.peak = max(self.peak, self.alive)

    def _fetch(self, fetch, grouped: bool = False):
        """`fetch` (one expert at a time) or `fetch_groups` (`grouped`: lists of experts held together) checked."""
        def checked(layer, experts, counts=None, prefetch=None):
            self.requests[layer] += len(experts)
            self.routed.update((layer, e) for e in experts)
            served = []
            for item in fetch(layer, experts, counts, prefetch):
                served += [e for e, _ in item] if grouped else [item[0]]
                self.largest_group = max(self.largest_group, len(item) if grouped else 1)
                self.check_books()
                yield item
                del item  # as the model does: released before asking for the next
            assert sorted(served) == sorted(experts), "every requested expert is served exactly once"
        return checked

    def check_books(self) -> None:
        s, cache = self.store, self.store.cache
        assert self.peak <= s.budget, f"{self.peak} bytes of experts alive under a budget of {s.budget}"
        assert cache.used <= cache.capacity <= s.budget
        assert set(s.weights) <= set(cache.resident) and s.resident_bytes <= cache.used
        if isinstance(s, RefreshStore):
            assert all(s.placement.used(layer) <= s.placement.capacity for layer in self.requests)

    def run(self, requests) -> list[RequestOutput]:
        """Generate, then check the statistics of that call."""
        return self.checked(lambda: generate(self.llm, requests))

    def checked(self, call) -> list[RequestOutput]:
        """Run `call` (a generation on the watched engine), then check the statistics of that call."""
        self.requests.clear()
        out = call()
        self.check_books()
        stats = self.store.stats
        assert set(stats.layers) == set(self.requests)
        for layer, n in self.requests.items():
            assert stats.layers[layer].hits + stats.layers[layer].misses == n, f"layer {layer}"
        assert stats.streamed <= stats.total.misses
        assert self.store.reader.fallbacks == {}, "expected O_DIRECT reads"
        return out

    def check_offloaded(self) -> None:
        """After the first call on a cold store: experts were read, and evicted (or streamed) once the routed set
        outgrew the budget."""
        stats, total = self.store.stats, self.store.stats.total
        assert total.misses > 0 and total.bytes_read >= total.misses * min(self.store.index.expert(*k).nbytes
                                                                             for k in self.routed)
        if sum(self.store.cache.size(k) for k in self.routed) > self.store.cache.capacity:
            assert stats.streamed + stats.evictions > 0


def check_lossless(ref: Reference, budget: int, **options) -> list[RequestOutput]:
    """Run the batch then one prompt alone under `options`: tokens equal the resident run's, books checked.
    Returns the batch's outputs."""
    llm = LLM(ref.folder, expert_cache=budget, **options)
    try:
        watch = Watch(llm)
        batch = watch.run(ref.runs["batch"])
        assert token_ids_of(batch) == ref.expected["batch"], options
        watch.check_offloaded()
        if options.get("prefetch") and budget >= ref.total:
            assert llm.store.stats.prefetched > 0  # below the working set a prefetch may find no room (see cache.py)
        assert token_ids_of(watch.run(ref.runs["alone"])) == ref.expected["alone"], options
    finally:
        llm.store.close()
    return batch


def assert_same_tokens(ref: Reference, requests, budget: int, **options) -> None:
    """`requests` under `options` give the resident engine's tokens, books checked."""
    llm = LLM(ref.folder, expert_cache=budget, **options)
    try:
        assert token_ids_of(Watch(llm).run(requests)) == token_ids_of(generate(ref.resident, requests))
    finally:
        llm.store.close()


@pytest.mark.parametrize("budget", ["50%", "25%"])
def test_a_batch_of_8_runs_in_groups_and_gives_the_tokens_of_resident_and_alone(autoregressive, budget, monkeypatch):
    """Batched decode under a budget gets a layer's experts in groups (the residents, then the reads that landed
    together), each group one grouped kernel call: the tokens are the resident batch's and each request's alone, and
    expert RAM stays within the budget at every group handed out (`Watch`)."""
    ref = autoregressive("olmoe")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(ref.resident.model.shape.vocab_size, (n,), generator=g).tolist()
               for n in (3, 9, 5, 12, 4, 7, 6, 10)]
    expected = token_ids_of(generate(ref.resident, (prompts, GREEDY)))
    grouped = []  # experts per grouped kernel call the model made
    original = kernels.grouped_swiglu
    monkeypatch.setattr(kernels, "grouped_swiglu",
                        lambda x, gate_ups, *a, **k: grouped.append(len(gate_ups)) or original(x, gate_ups, *a, **k))
    llm = LLM(ref.folder, expert_cache=ref.budgets[budget], prefetch="off")
    try:
        watch = Watch(llm)
        assert token_ids_of(watch.run((prompts, GREEDY))) == expected
        watch.check_offloaded()
        assert watch.largest_group > 1 and max(grouped) > 1
        for prompt, tokens in zip(prompts, expected, strict=True):
            assert token_ids_of(watch.run(([prompt], GREEDY))) == [tokens]
    finally:
        llm.store.close()


def every_setting() -> list[tuple[str, str | None]]:
    """Every (live cache policy, prefetcher)."""
    return [(policy, prefetch) for policy in LIVE_POLICIES for prefetch in PREFETCHERS]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family", AUTOREGRESSIVE)
def test_every_policy_and_prefetcher_at_every_budget(autoregressive, family, budget):
    ref = autoregressive(family)
    for policy, prefetch in every_setting():
        check_lossless(ref, ref.budgets[budget], cache_policy=policy, prefetch=prefetch)


@pytest.mark.parametrize("family", AUTOREGRESSIVE)
def test_affinity_prefetch_at_every_budget(autoregressive, family):
    """The affinity prefetcher reads a whole next layer's top-k ahead (and the next token's first layer from the
    last): tokens unchanged, and expert RAM within the budget at every expert handed out (`Watch`)."""
    ref = autoregressive(family)
    shift = AUTOREGRESSIVE.index(family)
    for i, budget in enumerate(BUDGETS):
        check_lossless(ref, ref.budgets[budget], cache_policy=LIVE_POLICIES[(i + shift) % len(LIVE_POLICIES)],
                       prefetch="affinity")


@pytest.mark.parametrize("layout", ["fused", "converted"])
@pytest.mark.parametrize("family", AUTOREGRESSIVE)
def test_fused_and_converted_layouts(autoregressive, family, layout):
    ref = autoregressive(family, layout)
    shift = AUTOREGRESSIVE.index(family)  # families take different (policy, prefetcher) at each budget
    for i, budget in enumerate(BUDGETS):
        check_lossless(ref, ref.budgets[budget], cache_policy=LIVE_POLICIES[(i + shift) % len(LIVE_POLICIES)],
                       prefetch=PREFETCHERS[(i + shift) % len(PREFETCHERS)])


@pytest.mark.parametrize("budget", BUDGETS)
def test_llada2_per_step_cache_with_every_policy_and_prefetcher(llada2, budget):
    for policy, prefetch in every_setting():
        check_lossless(llada2, llada2.budgets[budget], cache_policy=policy, prefetch=prefetch)


@pytest.mark.parametrize("budget", BUDGETS)
def test_llada2_tide_with_every_tau(llada2, budget):
    for tau in (1, 2, 4, "auto"):
        stats = check_lossless(llada2, llada2.budgets[budget], tau=tau)[0].stats
        assert stats["refresh"]["refreshes"] > 0
        if budget in ("50%", "25%"):  # a fast tier smaller than the routed set: refreshes move experts out
            assert stats["refresh"]["demoted"] > 0
        assert stats["diffusion"]["tau"] == tau if tau != "auto" else stats["diffusion"]["tau"] >= 1


def test_tide_at_a_one_expert_budget_streams_one_expert_at_a_time(tmp_path):
    """Top-1 routing: the minimum budget is one expert, so no streamed read may start while one is in use."""
    folder = build_tiny_diffusion("llada2_moe", tmp_path / "top1", num_experts_per_tok=1, n_group=1, topk_group=1)
    ref = reference(folder, {"batch": DIFFUSION_BATCH, "alone": DIFFUSION_ALONE})
    stats = check_lossless(ref, ref.budgets["min"], tau=2)[0].stats
    assert stats["refresh"]["streamed"] == stats["total"]["misses"] > 0  # no fast tier left: every expert streamed


def repeating_trace(path: Path, layers: int, top_k: int, passes: int) -> Path:
    """A one-token prompt and `passes - 1` generated tokens that all route alike: layer l to experts 2l, 2l+1, ...
    (mod 8), so one token's working set is all of `layers * top_k` experts, every token."""
    recorder = TraceRecorder()
    ids = [[(top_k * layer + j) % 8 for j in range(top_k)] for layer in range(layers)]
    for position in range(passes):
        recorder.record(ids, [[1.0 / top_k] * top_k] * layers, position == 0, position)
    recorder.save(path, {"model": "repeating", "layers": layers, "num_experts": 8, "top_k": top_k})
    return path.with_suffix(".npz")


@pytest.fixture(scope="module")
def deep_mixtral(tmp_path_factory):
    """A 16-layer tiny Mixtral (top-2 of 8 experts): one token's working set is 32 experts."""
    from transformers import MixtralConfig

    folder = tmp_path_factory.mktemp("deep") / "mixtral-16"
    random_model(MixtralConfig(**{**COMMON, **FAMILIES["mixtral"][1], "num_hidden_layers": 16}), 0).save_pretrained(
        folder)
    return folder


@pytest.mark.parametrize("policy", LIVE_POLICIES)
def test_below_one_tokens_working_set_a_stable_share_hits_every_token(deep_mixtral, tmp_path, policy):
    """Every token needs the same 32 experts and the budget holds 16: a recency-driven cache would evict each just
    before its next use and never hit. The scan-resistant cache keeps a fixed share, streams the rest through a
    one-expert window (a read starts once the expert before it is computed), and so hits 15 of the 32 on every
    token after the first."""
    passes = 12
    trace = repeating_trace(tmp_path / "repeat", 16, 2, passes)
    expected = [o.outputs[0].token_ids for o in LLM(deep_mixtral).replay(trace)]
    slot = LLM(deep_mixtral, expert_cache="100%").store.cache.size((0, 0))
    # prefetch off: the model's own routers know nothing of the replayed routing, so their guesses would be noise
    llm = LLM(deep_mixtral, expert_cache=16 * slot, cache_policy=policy, prefetch="off")
    try:
        watch = Watch(llm)
        out = watch.checked(lambda: llm.replay(trace))
        assert token_ids_of(out) == expected
        total = out[0].stats["total"]
        assert total["hits"] + total["misses"] == passes * 32
        assert total["hits"] == (passes - 1) * 15  # the window takes one of the 16 slots; the first token is cold
        assert out[0].stats["streamed"] == total["misses"] - 16  # only the first token's first 16 were admitted
    finally:
        llm.store.close()


class HeldReader(DirectReader):
    """Holds the read of one byte offset until `release` is set."""

    def __init__(self, held: int, release: threading.Event):
        super().__init__(max_workers=1)
        self.held, self.release = held, release

    def read(self, path, offset, nbytes):
        if offset <= self.held < offset + nbytes:
            self.release.wait()
        return super().read(path, offset, nbytes)

    def read_pages(self, path, offset, nbytes, into, at):  # the reads of an expert used in place
        if offset <= self.held < offset + nbytes:
            self.release.wait()
        return super().read_pages(path, offset, nbytes, into, at)


def test_an_evicted_prefetch_still_being_read_is_freed_before_its_room_is_reused(autoregressive):
    ref = autoregressive("mixtral")
    llm = LLM(ref.folder, expert_cache=ref.budgets["min"])  # two experts: top-2
    watch, store, release = Watch(llm), llm.store, threading.Event()
    store.reader = HeldReader(store.index.expert(1, 7).gate.offset, release)
    list(store.fetch(0, [0], prefetch=(1, [7])))  # (1, 7) is admitted ahead of use; its read is held
    assert (1, 7) in store.inflight
    threading.Timer(0.3, release.set).start()
    list(store.fetch(1, [1, 2]))  # evicts (0, 0) and the prefetch in flight
    store.close()  # every read settled
    assert watch.peak <= store.budget, "the evicted prefetch's weights arrived beside the experts that replaced it"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_settings_and_prompts_autoregressive(data, autoregressive):
    family = data.draw(st.sampled_from(AUTOREGRESSIVE), label="family")
    ref = autoregressive(family, data.draw(st.sampled_from(["per_expert", "fused", "converted"]), label="layout"))
    budget = data.draw(st.integers(ref.budgets["min"], ref.total), label="budget")
    options = dict(cache_policy=data.draw(st.sampled_from(LIVE_POLICIES), label="policy"),
                   prefetch=data.draw(st.sampled_from(PREFETCHERS), label="prefetch"),
                   prefetch_top_p=data.draw(st.integers(1, min(3, ref.resident.model.shape.top_k)), label="top_p"))
    prompts = data.draw(st.lists(st.lists(st.integers(0, 127), min_size=1, max_size=12), min_size=1, max_size=4),
                        label="prompts")
    params = SamplingParams(temperature=0, max_tokens=data.draw(st.integers(1, 12), label="max_tokens"))
    assert_same_tokens(ref, (prompts, params), budget, **options)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_settings_and_prompts_diffusion(data, llada2):
    budget = data.draw(st.integers(llada2.budgets["min"], llada2.total), label="budget")
    tau = data.draw(st.sampled_from([None, 1, 2, 3, "auto"]), label="tau")
    # with tau, TIDE places the RAM tier: a cache policy or prefetcher would do nothing and is refused
    options = dict(tau=tau) if tau is not None else dict(
        cache_policy=data.draw(st.sampled_from(LIVE_POLICIES), label="policy"),
        prefetch=data.draw(st.sampled_from(PREFETCHERS), label="prefetch"))
    requests = data.draw(st.lists(st.tuples(
        st.lists(st.integers(0, 158), min_size=1, max_size=20),
        st.builds(SamplingParams, temperature=st.just(0), max_tokens=st.integers(1, 16),
                  block_length=st.sampled_from([2, 4, 8, 16]), steps=st.integers(1, 10),
                  threshold=st.sampled_from([0.5, 0.9, 1.0]))), min_size=1, max_size=3), label="requests")
    assert_same_tokens(llada2, requests, budget, **options)


@pytest.mark.parametrize("options", [dict(expert_cache="50%"), dict(expert_cache=0, cache_policy="dali"),
                                     dict(expert_cache="25%", prefetch="plain"), dict(expert_cache="25%", tau=2),
                                     dict(expert_cache="25%", tau="auto")],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_llada_has_no_experts_so_offloading_options_are_refused(folders, options):
    with pytest.raises(ConfigError, match=rf"^{', '.join(k for k in options if k != 'cache_policy')}: expert "
                                          r"offloading applies to models with routed experts, and llada has none"):
        LLM(folders["llada"], **options)


def test_prefetch_without_a_budget_is_refused(folders):
    with pytest.raises(ConfigError, match="prefetch would have no effect: every expert stays resident"):
        LLM(folders["llada"], prefetch="plain")


def test_plain_prefetch_runs_by_default_wherever_a_cache_policy_places_experts(autoregressive, llada2):
    folder = autoregressive("mixtral").folder
    on = LLM(folder, expert_cache="50%")
    assert on.config.prefetcher == "plain" and all(b.prefetcher is not None for b in on.model.moe_blocks)
    for llm in (LLM(folder, expert_cache="50%", prefetch="off"), LLM(folder, prefetch="off"), LLM(folder),
                LLM(llada2.folder, expert_cache="50%", tau=2)):
        assert all(b.prefetcher is None for b in llm.model.moe_blocks)
    with pytest.raises(ConfigError, match="prefetch would have no effect"):
        LLM(folder, prefetch="plain")
