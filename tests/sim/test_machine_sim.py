"""The hardware simulator: its RAM tier makes the live store's decisions, its timing follows the resources."""

import json
from pathlib import Path

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.convert import convert
from tiermoe.sim.hardware import load_hardware
from tiermoe.sim.machine_sim import simulate
from tiermoe.sim.model_shape import load_shape
from tiermoe.sim.sim_config import SimConfig
from tiermoe.sim.trace import Trace

OLMOE = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces" / "olmoe-1b-7b-0924_decode_wikitext-mbpp.npz"
PROMPT = [3, 17, 42, 9, 77, 5, 61, 23, 11, 54]


@pytest.fixture(scope="module")
def recorded(tiny_models, tmp_path_factory):
    """A converted tiny OLMoE checkpoint, and per (policy, budget) the live store's counts on a recorded trace."""
    root = tmp_path_factory.mktemp("machine-sim")
    folder = convert(tiny_models("olmoe"), root / "aligned")
    runs = {}
    for policy, budget in [("lru", "30%"), ("lfu", "50%"), ("dali", "40%"), ("learned", "60%")]:
        llm = LLM(folder, expert_cache=budget, cache_policy=policy, prefetch="off")
        path = root / f"{policy}-{budget}"
        llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), record_trace=path)
        stats = llm.store.stats
        size = llm.store.cache.size((llm.model.moe_blocks[0].layer, 0))
        runs[policy, budget] = (Trace.load(path), llm.store.budget, size, stats.total, stats.streamed)
        llm.store.close()
    return folder, runs


@pytest.mark.parametrize("policy,budget", [("lru", "30%"), ("lfu", "50%"), ("dali", "40%"), ("learned", "60%")])
def test_hits_and_misses_equal_the_live_store_on_a_recorded_trace(recorded, policy, budget):
    folder, runs = recorded
    trace, nbytes, size, live, streamed = runs[policy, budget]
    shape = load_shape(folder).with_dtype("float32")
    assert shape.expert_bytes == size  # the same expert sizes, so the same byte budget means the same room
    cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=nbytes, cache_policy=policy)
    sim = simulate(trace, shape, load_hardware("laptop-16gb"), cfg)
    assert live.misses > 0 and live.hits > 0
    assert (sim.hits, sim.misses, sim.streamed) == (live.hits, live.misses, streamed)


def test_another_policy_in_the_simulator_would_not_match(recorded):
    """The equality above is a property of replaying the same policy, not of the trace alone."""
    folder, runs = recorded
    trace, nbytes, _, live, _ = runs["dali", "40%"]
    shape = load_shape(folder).with_dtype("float32")
    sim = simulate(trace, shape, load_hardware("laptop-16gb"), SimConfig("tiermoe", gpu_memory=0,
                                                                         expert_cache=nbytes, cache_policy="lru"))
    assert (sim.hits, sim.misses) != (live.hits, live.misses)


def test_a_budget_below_one_tokens_experts_is_refused_with_the_minimum(recorded):
    folder, runs = recorded
    trace = runs["lru", "30%"][0]
    shape = load_shape(folder).with_dtype("float32")
    with pytest.raises(Exception, match="minimum is"):
        simulate(trace, shape, load_hardware("laptop-16gb"), SimConfig(gpu_memory=0, expert_cache=shape.expert_bytes))


def test_more_gpu_memory_never_slows_tiermoe_and_dali_beats_on_demand_swapping():
    if not OLMOE.exists():
        pytest.skip(f"{OLMOE} is absent")
    trace = Trace.load(OLMOE).select_sequences([0, 1])
    shape, hw = load_shape("olmoe-1b-7b"), load_hardware("rtx4090")

    def tok_s(strategy, gpu):
        return simulate(trace, shape, hw, SimConfig(strategy, gpu_memory=gpu << 30, max_tokens=24)).tokens_per_s

    speeds = [tok_s("tiermoe", g) for g in (2, 6, 12)]
    assert speeds == sorted(speeds)
    # DALI's per-step assignment beats copying every missed expert to the GPU (what accelerate's offload does); on
    # this short trace the static splits (llamacpp, fiddler) are ahead of both: bench/hardware_plan reports it
    assert tok_s("dali", 6) > tok_s("on-demand", 6)


def test_greedy_never_beats_the_optimum_and_both_exact_methods_agree():
    import random

    from tiermoe.sim import assign

    rng = random.Random(0)
    for n in (1, 2, 5, 9):
        for _ in range(20):
            g = [rng.uniform(0.1, 2) for _ in range(n)]
            c = [rng.uniform(0.1, 2) for _ in range(n)]
            base = rng.uniform(0, 2)
            best = assign.makespan(assign.optimal(g, c, base, "enumerate"), g, c, base)
            assert assign.makespan(assign.optimal(g, c, base, "milp"), g, c, base) == pytest.approx(best)
            assert assign.makespan(assign.greedy(g, c, [1] * n, base), g, c, base) >= best - 1e-12


def test_sim_cache_global_layout_is_the_live_stores_cache(recorded):
    """`sim cache --layout global` replays the same store bookkeeping: the live decode hits (prompt uncounted)."""
    from tiermoe.sim.cache_sim import Capacity
    from tiermoe.sim.cache_sim import simulate as cache_simulate

    folder, runs = recorded
    trace = runs["lru", "30%"][0]
    per_layer = cache_simulate(trace, ["lru"], [Capacity(items=3)])
    global_ = cache_simulate(trace, ["lru"], [Capacity(items=3)], layout="global")
    assert global_.layout == "global" and per_layer.layout == "per-layer"
    assert global_.runs[0].requests == per_layer.runs[0].requests  # the same decode requests, counted alike
    with pytest.raises(ValueError, match="layout"):
        cache_simulate(trace, ["lru"], [Capacity(items=3)], layout="columns")


def test_sim_run_command_prints_json_per_strategy_and_refuses_unknown_hardware(recorded, tmp_path, capsys):
    import json

    from tiermoe.cli import main

    folder, runs = recorded
    trace = tmp_path / "t"
    runs["lru", "30%"][0].save(trace)
    args = ["sim", "run", "--trace", f"{trace}.npz", "--model-shape", str(folder), "--dtype", "float32",
            "--hardware", "rtx4090", "--gpu-memory", "1GiB", "--expert-cache", "50%", "--json"]
    assert main(args + ["--strategy", "tiermoe,dali,llamacpp", "--plot", str(tmp_path / "p.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in out] == ["tiermoe", "dali", "llamacpp"]
    assert all(r["tokens"] == 39 and r["tokens_per_s"] > 0 for r in out)  # 40 new tokens: 39 fed back
    assert (tmp_path / "p.png").stat().st_size > 0
    assert main(args[:-3] + ["--hardware", "rtx9090"]) == 2
    assert "unknown hardware 'rtx9090'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def diffusion_recorded(folders, tmp_path_factory):
    """The tiny LLaDA2 model under TIDE on the RAM tier: per (budget, tau), a recorded trace of two batched requests
    and the live store's counts."""
    root = tmp_path_factory.mktemp("machine-sim-diffusion")
    params = SamplingParams(temperature=0, max_tokens=12, block_length=4, steps=4, ignore_eos=True)
    runs = {}
    for budget, tau in [("40%", 2), ("60%", 3)]:
        llm = LLM(folders["llada2_moe"], expert_cache=budget, tau=tau)
        llm.generate([PROMPT, PROMPT[:3]], params, record_trace=root / f"{budget}-{tau}")
        stats = llm.store.stats
        size = llm.store.cache.size((llm.model.moe_blocks[0].layer, 0))
        runs[budget, tau] = (Trace.load(root / f"{budget}-{tau}"), llm.store.budget, size, stats.total, stats.streamed)
        llm.store.close()
    return runs


@pytest.mark.parametrize("budget,tau", [("40%", 2), ("60%", 3)])
def test_tide_hits_and_misses_equal_the_live_store_on_a_recorded_diffusion_trace(folders, diffusion_recorded,
                                                                                  budget, tau):
    trace, nbytes, size, live, streamed = diffusion_recorded[budget, tau]
    shape = load_shape(folders["llada2_moe"]).with_dtype("float32")
    assert shape.expert_bytes == size
    sim = simulate(trace, shape, load_hardware("laptop-16gb"), SimConfig("tide", gpu_memory=0, expert_cache=nbytes,
                                                                         tau=tau))
    assert live.hits > 0 and streamed > 0
    assert (sim.hits, sim.misses, sim.streamed) == (live.hits, live.misses, streamed)
    assert sim.tokens == 24  # both requests' output tokens


def test_tide_replay_of_a_diffusion_trace_depends_on_its_refresh_interval(folders, diffusion_recorded):
    """The equality above is TIDE's refresh rhythm replayed, not the trace's routing alone."""
    trace, nbytes, _, live, _ = diffusion_recorded["40%", 2]
    shape = load_shape(folders["llada2_moe"]).with_dtype("float32")
    sim = simulate(trace, shape, load_hardware("laptop-16gb"), SimConfig("tide", gpu_memory=0, expert_cache=nbytes,
                                                                         tau=4))
    assert (sim.hits, sim.misses) != (live.hits, live.misses)


def test_a_bf16_checkpoint_computed_in_fp32_is_sized_as_the_live_store_keeps_it(folders, tmp_path):
    """fp32 compute keeps a bf16 checkpoint's expert weights bf16 (kernels.weight_dtype): the simulator's expert
    size, which sets how many experts a byte budget holds, must be the live store's, not the fp32 size."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bf16"
    shutil.copytree(folders["llada2_moe"], folder)
    for path in folder.glob("*.safetensors"):
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(state, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    llm = LLM(folder, expert_cache="40%", dtype="float32")
    try:
        size = llm.store.cache.size((llm.model.moe_blocks[0].layer, 0))
        assert llm.model.dtype == torch.float32
        assert load_shape(folder).with_dtype("float32").expert_bytes == size
        assert load_shape(folders["llada2_moe"]).with_dtype("float32").expert_bytes > size  # fp32 checkpoint: 4 B
    finally:
        llm.store.close()
