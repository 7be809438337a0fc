"""Pricing from the engine's own measured costs (a `tiermoe profile`): the formulas, the profile fields' loading, and
that presets without them keep the GEMV/operator-call pricing."""

import dataclasses
import json

import numpy as np
import pytest

from tiermoe.sim.cache_cold import KV_RING_MIB
from tiermoe.sim.costs import Pricing
from tiermoe.sim.engine_costs import EngineCosts, fixed_at, seconds_per_byte
from tiermoe.sim.hardware import GB, CPUProfile, Hardware, SSDProfile, load_hardware
from tiermoe.sim.machine_sim import simulate
from tiermoe.sim.model_shape import ModelShape
from tiermoe.sim.sim_config import SimConfig
from tiermoe.sim.trace import Trace

RATES = {64: {1: 10.0, 4: 5.0}, 1024: {1: 40.0, 4: 20.0}}  # GB/s by row length, rows
ENGINE = {"expert_us": 6.0, "batch_expert_us": 10.0, "layer_us": 60.0, "block_layer_us": 150.0, "layer_row_us": 2.0,
          "step_us": 50.0, "denoise_us": 100.0, "logit_ns": 4.0, "read_us": 120.0}
ATTN = {"decode_us": 1.0, "decode_head_us": 2.0, "decode_gflops": 40.0, "decode_kv_gbs": 50.0, "block_us": 20.0,
        "block_head_us": 3.0, "block_gflops": 50.0, "block_kv_gbs": 60.0}


def measured_cpu(**over) -> CPUProfile:
    fields = {"kernel_gbs": {"float32": RATES}, "linear_us": {"float32": {1: 3.0, 4: 5.0}},
              "swiglu_us": {"float32": {1: 6.0, 4: 8.0}}, "attention": ATTN, "engine": ENGINE}
    return CPUProfile("cpu", 2, {1: 20.0, 2: 30.0}, {1: 100.0}, 2.0, **{**fields, **over})


def shape(**over) -> ModelShape:
    base = dict(name="m", num_layers=2, num_experts=8, top_k=2, hidden=1024, expert_dim=64, vocab=1000,
                attn_params=4 * 1024 * 1024, kv_dim=256, dtype_bytes=4, q_dim=1024, heads=8)
    return ModelShape(**{**base, **over})


def test_kernel_time_interpolates_rows_and_grows_with_them_past_the_last_measured():
    by_rows = RATES[1024]
    assert seconds_per_byte(by_rows, 1) == pytest.approx(1 / (40 * GB))
    assert seconds_per_byte(by_rows, 2) == pytest.approx((2 / 3) / (40 * GB) + (1 / 3) / (20 * GB))
    assert seconds_per_byte(by_rows, 8) == pytest.approx(2 / (20 * GB))  # compute-bound: twice the rows, twice
    assert fixed_at({1: 3.0, 4: 5.0}, 16) == pytest.approx(5e-6)  # fixed costs stay at the last measured


def test_an_expert_is_its_fixed_costs_plus_each_matrix_at_its_row_lengths_rate():
    costs = EngineCosts(measured_cpu(), shape(), threads=1)
    gate_up, down = 2 * 64 * 1024 * 4, 1024 * 64 * 4  # rows of length H = 1024, and of length I = 64
    one = 6e-6 + 6e-6 + gate_up / (40 * GB) + down / (10 * GB)
    assert costs.expert(1, batched=False) == pytest.approx(one)
    assert costs.expert(4, batched=True) == pytest.approx(10e-6 + 8e-6 + gate_up / (20 * GB) + down / (5 * GB))
    # a row length between two measured ones: interpolated in log2 (256 is halfway from 64 to 1024)
    per_byte = 0.5 / (10 * GB) + 0.5 / (40 * GB)
    assert costs.stream(1000, 256, 1) == pytest.approx(1000 * per_byte)
    # two threads stream as much faster as the GEMV does (30 / 20 GB/s)
    assert EngineCosts(measured_cpu(), shape(), threads=2).stream(1000, 1024, 1) == pytest.approx(1000 / (60 * GB))


def test_a_batched_forwards_experts_pay_the_grouped_kernels_fixed_cost_per_expert_when_measured():
    gate_up, down = 2 * 64 * 1024 * 4, 1024 * 64 * 4
    streamed = gate_up / (20 * GB) + down / (5 * GB)  # 4 rows
    costs = EngineCosts(measured_cpu(grouped_us={"float32": {1: 1.0, 4: 2.0}}), shape(), threads=1)
    assert costs.expert(4, batched=True) == pytest.approx(10e-6 + 2e-6 + streamed)
    assert costs.expert(1, batched=False) == pytest.approx(6e-6 + 6e-6 + gate_up / (40 * GB) + down / (10 * GB))
    hw = Hardware("h", 8, 10, costs.cpu, SSDProfile("d", 1, 1, 1))
    loaded = Hardware.from_dict(json.loads(json.dumps(hw.to_dict())))
    assert loaded.cpu.grouped_us == {"float32": {1: 1.0, 4: 2.0}}  # JSON's string keys back to rows


def test_bf16_weights_under_fp32_compute_are_priced_with_the_kernels_the_engine_runs_for_them():
    slow = {k: {r: v / 2 for r, v in by_rows.items()} for k, by_rows in RATES.items()}
    cpu = measured_cpu(kernel_gbs={"float32": RATES, "bfloat16": RATES, "bfloat16-fp32": slow},
                       linear_us={d: {1: 3.0, 4: 5.0} for d in ("float32", "bfloat16", "bfloat16-fp32")},
                       swiglu_us={d: {1: 6.0, 4: 8.0} for d in ("float32", "bfloat16", "bfloat16-fp32")})
    bf16 = shape(dtype_bytes=2, stored="bfloat16")
    assert bf16.with_dtype("float32").kernel_dtype == "bfloat16-fp32"
    assert bf16.with_dtype("bfloat16").kernel_dtype == bf16.kernel_dtype == "bfloat16"
    assert shape(stored="float32").with_dtype("float32").kernel_dtype == "float32"
    fp32_compute = EngineCosts(cpu, bf16.with_dtype("float32"), threads=1)
    assert fp32_compute.stream(1000, 1024, 4) == pytest.approx(1000 / (10 * GB))
    assert EngineCosts(cpu, bf16.with_dtype("bfloat16"), threads=1).stream(1000, 1024, 4) == pytest.approx(
        1000 / (20 * GB))
    # a profile measured before the mixed kernels were: the weights' dtype's table
    older = measured_cpu(kernel_gbs={"float32": slow, "bfloat16": RATES},
                         linear_us={d: {1: 3.0} for d in ("float32", "bfloat16")},
                         swiglu_us={d: {1: 6.0} for d in ("float32", "bfloat16")})
    assert EngineCosts(older, bf16.with_dtype("float32"), threads=1).stream(1000, 1024, 4) == pytest.approx(
        1000 / (20 * GB))


def test_attention_decode_rows_each_pay_the_call_and_a_block_pays_it_once():
    costs = EngineCosts(measured_cpu(), shape(), threads=1)
    decode = 1e-6 + 8 * 2e-6 + 4.0 * 100 * 1024 / (40 * GB) + 100 * 256 * 4 / (50 * GB)
    assert costs.attention(1, 100, block=False) == pytest.approx(decode)
    block = 20e-6 + 8 * 3e-6 + 4.0 * 32 * 100 * 1024 / (50 * GB) + 100 * 256 * 4 / (60 * GB)
    assert costs.attention(32, 100, block=True) == pytest.approx(block)
    assert costs.attention(32, 100, block=False) > 32 * costs.attention(1, 100, block=False) * 0.9


def test_the_head_pays_logits_and_the_work_outside_the_model_per_forward_or_per_diffusion_request():
    costs = EngineCosts(measured_cpu(), shape(), threads=1)
    head = costs.linear(3, 1000 * 1024 * 4, 1024)
    assert costs.head(3, 1, diffusion=False) == pytest.approx(head + 3 * 1000 * 4e-9 + 50e-6)
    assert costs.head(3, 2, diffusion=True) == pytest.approx(head + 3 * 1000 * 4e-9 + 200e-6)


def test_an_autoregressive_step_samples_its_logits_at_the_samplers_cost_and_diffusion_at_the_predictions():
    costs = EngineCosts(measured_cpu(engine={**ENGINE, "sample_ns": 0.5}), shape(), threads=1)
    head = costs.linear(1, 1000 * 1024 * 4, 1024)
    assert costs.head(1, 1, diffusion=False) == pytest.approx(head + 1000 * 0.5e-9 + 50e-6)
    assert costs.head(1, 1, diffusion=True) == pytest.approx(head + 1000 * 4e-9 + 100e-6)


def test_a_long_products_bytes_beyond_two_mib_stream_at_the_long_rate_when_measured(tmp_path):
    from tiermoe.sim.hardware import LONG_FROM

    long = {"float32": {64: {1: 20.0, 4: 10.0}, 1024: {1: 80.0, 4: 40.0}}}  # twice the short products' rates
    costs = EngineCosts(measured_cpu(long_gbs=long), shape(), threads=1)
    big = LONG_FROM + (8 << 20)
    assert costs.stream(big, 1024, 1) == pytest.approx(LONG_FROM / (40 * GB) + (8 << 20) / (80 * GB))
    assert costs.stream(LONG_FROM, 1024, 4) == pytest.approx(LONG_FROM / (20 * GB))  # short: as before
    assert EngineCosts(measured_cpu(), shape(), threads=1).stream(big, 1024, 1) == pytest.approx(big / (40 * GB))
    hw = Hardware("h", 16, 20.0, measured_cpu(long_gbs=long), SSDProfile("d", 2.0, 1.5, 1e5))
    hw.save(tmp_path / "h.json")
    assert load_hardware(tmp_path / "h.json") == hw  # JSON's string keys come back as ints


def test_engine_fields_load_from_json_and_go_together(tmp_path):
    hw = Hardware("h", 16, 20.0, measured_cpu(), SSDProfile("d", 2.0, 1.5, 1e5, 1.0, 40.0, 30.0))
    path = tmp_path / "h.json"
    hw.save(path)
    assert json.loads(path.read_text())["cpu"]["kernel_gbs"]["float32"]["64"]["4"] == 5.0  # JSON keys: strings
    loaded = load_hardware(path)
    assert loaded == hw and loaded.cpu.engine_measured
    with pytest.raises(ValueError, match="go together"):
        measured_cpu(engine=None)


def test_presets_price_as_before_and_a_measured_profile_prices_the_engines_way():
    preset = load_hardware("laptop-16gb")
    assert not preset.cpu.engine_measured and preset.ssd.read_latency_us == 0
    p = Pricing(preset, shape(), 1)
    assert p.engine is None and p.read_cpu() == 0
    assert p.read(1 << 20) == pytest.approx((1 << 20) / (preset.ssd.rand_read_gbs * GB))
    hw = dataclasses.replace(preset, cpu=measured_cpu(), ssd=dataclasses.replace(preset.ssd, read_latency_us=40.0))
    p = Pricing(hw, shape(), 1)
    assert p.cpu_expert(1, batched=False) == pytest.approx(p.engine.expert(1, False))
    assert p.read(1 << 20) == pytest.approx(40e-6 + (1 << 20) / (preset.ssd.rand_read_gbs * GB))
    assert p.read_cpu() == pytest.approx(120e-6)


def _trace(tmp_path) -> Trace:
    rng = np.random.default_rng(0)
    tokens = 40
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(tokens)])
    t = Trace(experts=ids.astype(np.int16), weights=np.full(ids.shape, 0.5, np.float16),
              seq_starts=np.array([0], np.int64), is_prefill=np.zeros(tokens, bool),
              positions=np.arange(10, 10 + tokens, dtype=np.int32), token_ids=np.zeros(tokens, np.int32),
              meta={"layers": 2, "num_experts": 8, "top_k": 2})
    return t


def test_each_read_costs_the_models_thread_the_engines_time_around_it(tmp_path):
    """A read's Python (the store's, under the interpreter lock) delays the model: per read, cpu busy grows by it,
    and on a disk fast enough that the CPU bounds the step, so does the time."""
    trace = _trace(tmp_path)
    no_read_cost = Hardware("h", 16, 20.0, measured_cpu(engine={**ENGINE, "read_us": 0.0}),
                            SSDProfile("d", 100.0, 100.0, 1e7, 100.0))
    with_cost = dataclasses.replace(no_read_cost, cpu=measured_cpu())
    cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=4 * shape().expert_bytes, threads=1)
    a, b = simulate(trace, shape(), no_read_cost, cfg), simulate(trace, shape(), with_cost, cfg)
    assert (a.hits, a.misses) == (b.hits, b.misses) and b.misses > 0
    assert b.busy_s["cpu"] - a.busy_s["cpu"] == pytest.approx(b.misses * 120e-6)
    assert b.seconds > a.seconds


COLD = {**{k: 2 * v for k, v in ENGINE.items() if k != "read_us"}}
ATTN_COLD = {**ATTN, "decode_head_us": 4.0, "decode_kv_gbs": 10.0}


def test_fixed_costs_are_taken_cold_in_proportion_to_the_experts_bytes():
    """A model whose experts stream as many bytes per call as the cold measurement pays the cold costs; half as many,
    halfway; a profile without cold measurements (older, or a preset) the hot ones."""
    big = shape(hidden=1024, expert_dim=1024)  # 3 * 1024 * 1024 * 4 bytes = 12 MiB per expert
    cpu = measured_cpu(cold_mib=12.0, engine_cold=COLD, attention_cold=ATTN_COLD)
    assert cpu.cold_share(big.expert_bytes) == 1.0 and cpu.cold_share(big.expert_bytes // 2) == 0.5
    assert measured_cpu().cold_share(big.expert_bytes) == 0.0
    cold, hot = EngineCosts(cpu, big, 1), EngineCosts(measured_cpu(), big, 1)
    assert cold.layer_fixed(1, block=False) == pytest.approx(2 * hot.layer_fixed(1, block=False))
    assert cold.expert(1, False) - hot.expert(1, False) == pytest.approx(6e-6)
    half = EngineCosts(measured_cpu(cold_mib=24.0, engine_cold=COLD, attention_cold=ATTN_COLD), big, 1)
    assert half.e["layer_us"] == pytest.approx(90.0)


def test_attention_is_taken_cold_by_the_bytes_a_forward_streams_not_the_experts():
    """A decode reads a layer's keys and values once per forward, after the model's weights went through the caches:
    a model whose forward streams as many bytes as the cold measurement read between two reads of a pair
    (KV_RING_MIB) pays the cold attention, however small its experts; half as many, halfway (rates as time per
    unit); a profile without the cold measurement the hot one."""
    deep = shape(num_layers=8)  # 768 KiB experts, but ~140 MiB a forward (16 MiB of attention weights a layer)
    cpu = measured_cpu(cold_mib=8.0, engine_cold=ENGINE, attention_cold=ATTN_COLD)
    assert cpu.cold_share(deep.expert_bytes) < 0.1 and cpu.kv_cold_share(deep.forward_bytes) == 1.0
    assert cpu.kv_cold_share(KV_RING_MIB << 19) == 0.5 and measured_cpu().kv_cold_share(1 << 40) == 0.0
    cold = EngineCosts(cpu, deep, 1)
    assert cold.attention(1, 100, False) == pytest.approx(EngineCosts(measured_cpu(attention=ATTN_COLD), deep, 1)
                                                          .attention(1, 100, False))
    assert cold.attention(1, 100, False) > EngineCosts(measured_cpu(), deep, 1).attention(1, 100, False)


def test_a_simulated_decode_pays_the_cold_attention_per_layer_and_row(tmp_path):
    """All resident, the cold attention adds exactly its extra per layer and decode row, at the row's context."""
    trace, deep = _trace(tmp_path), shape(num_layers=2, hidden=4096, q_dim=4096, attn_params=4 * 4096 * 4096)
    ssd = SSDProfile("d", 2.0, 1.5, 1e5)
    hot = Hardware("h", 16, 20.0, measured_cpu(), ssd)
    cold = dataclasses.replace(hot, cpu=measured_cpu(cold_mib=8.0, engine_cold=ENGINE, attention_cold=ATTN_COLD))
    assert cold.cpu.kv_cold_share(deep.forward_bytes) == 1.0
    cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=deep.total_expert_bytes, threads=1, preload=True)
    a, b = simulate(trace, deep, hot, cfg), simulate(trace, deep, cold, cfg)
    hot_attn, cold_attn = EngineCosts(hot.cpu, deep, 1).attention, EngineCosts(cold.cpu, deep, 1).attention
    extra = sum(2 * (cold_attn(1, int(p) + 1, False) - hot_attn(1, int(p) + 1, False)) for p in trace.positions)
    assert b.busy_s["cpu"] - a.busy_s["cpu"] == pytest.approx(extra)
    assert b.tokens_per_s < a.tokens_per_s


def test_a_simulated_decode_step_pays_the_cold_costs(tmp_path):
    """All resident, the CPU's busy time is the step's work: cold costs add exactly their extra per layer, expert and
    step and logit (the trace: 40 decode rows, 2 layers of top-2, a vocabulary of 1000)."""
    trace, big = _trace(tmp_path), shape(hidden=1024, expert_dim=1024)
    ssd = SSDProfile("d", 2.0, 1.5, 1e5)
    hot = Hardware("h", 16, 20.0, measured_cpu(), ssd)
    cold = dataclasses.replace(hot, cpu=measured_cpu(cold_mib=12.0, engine_cold=COLD, attention_cold=ATTN))
    cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=big.total_expert_bytes, threads=1, preload=True)
    a, b = simulate(trace, big, hot, cfg), simulate(trace, big, cold, cfg)
    extra = 40 * (2 * ENGINE["layer_us"] + 4 * ENGINE["expert_us"] + ENGINE["step_us"]
                  + 1000 * ENGINE["logit_ns"] * 1e-3) * 1e-6
    assert b.busy_s["cpu"] - a.busy_s["cpu"] == pytest.approx(extra)
    assert b.tokens_per_s < a.tokens_per_s


def test_cold_fields_load_from_json_and_older_profiles_without_them_still_load(tmp_path):
    hw = Hardware("h", 16, 20.0, measured_cpu(cold_mib=8.0, engine_cold=COLD, attention_cold=ATTN_COLD),
                  SSDProfile("d", 2.0, 1.5, 1e5))
    hw.save(tmp_path / "h.json")
    assert load_hardware(tmp_path / "h.json") == hw
    older = json.loads((tmp_path / "h.json").read_text())
    for k in ("cold_mib", "engine_cold", "attention_cold"):
        del older["cpu"][k]
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert load_hardware(tmp_path / "old.json").cpu.cold_share(1 << 30) == 0.0


def test_reads_start_once_the_experts_at_hand_are_computed_when_the_kernels_hold_the_interpreter_lock(tmp_path):
    """With `read_wait` 1 (measured: a read submitted while the model computes waits for all of it), a layer's
    misses are read only after its hits are computed: the same hits and misses, a longer run; a preset has none."""
    trace, ssd = _trace(tmp_path), SSDProfile("d", 2.0, 1.0, 1e5)
    free = Hardware("h", 16, 20.0, measured_cpu(engine={**ENGINE, "read_wait": 0.0}), ssd)
    held = dataclasses.replace(free, cpu=measured_cpu(engine={**ENGINE, "read_wait": 1.0}))
    cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=4 * shape().expert_bytes, threads=1)
    a, b = simulate(trace, shape(), free, cfg), simulate(trace, shape(), held, cfg)
    assert (a.hits, a.misses) == (b.hits, b.misses) and a.hits > 0 and a.misses > 0
    assert b.busy_s == pytest.approx(a.busy_s) and b.seconds > a.seconds
    assert Pricing(held, shape(), 1).read_wait() == 1.0 and Pricing(load_hardware("h100"), shape(), 1).read_wait() == 0


STORE = {"request_us": 0.0, "key_us": 0.0, "read_us": 0.0, "evict_us": 0.0, "refresh_us": 0.0, "load_us": 0.0}


def _with_store(**lru) -> Hardware:
    """A measured profile whose RAM tier costs `lru` (the rest 0) on a disk fast enough that the CPU bounds a step."""
    return Hardware("h", 16, 20.0, measured_cpu(store={"lru": {**STORE, **lru}}),
                    SSDProfile("d", 100.0, 100.0, 1e7, 100.0))


@pytest.mark.parametrize("term", ["request_us", "key_us", "evict_us", "read_us", "load_us"])
def test_the_stores_measured_costs_are_charged_on_the_models_thread_once_per_what_they_price(tmp_path, term):
    """Per request (80: 2 layers x 40 tokens, each within the budget), per expert asked, per eviction, per read (the
    model thread's and an I/O thread's): the CPU's busy time grows by the count times the measured cost, and the
    step with it; the lump `read_us` of the engine's probe is not charged beside them."""
    trace, cfg = _trace(tmp_path), SimConfig("tiermoe", gpu_memory=0, expert_cache=4 * shape().expert_bytes, threads=1)
    base, priced = (simulate(trace, shape(), _with_store(**over), cfg) for over in ({}, {term: 500.0}))
    assert (base.hits, base.misses, base.evictions) == (priced.hits, priced.misses, priced.evictions)
    assert base.evictions > 0 and base.misses > base.evictions
    count = {"request_us": 80, "key_us": base.hits + base.misses, "evict_us": base.evictions,
             "read_us": base.misses, "load_us": base.misses}[term]
    assert priced.busy_s["cpu"] - base.busy_s["cpu"] == pytest.approx(count * 500e-6)
    assert priced.seconds - base.seconds == pytest.approx(count * 500e-6, rel=0.05)
    lump = simulate(trace, shape(), dataclasses.replace(base_hw := _with_store(), cpu=measured_cpu()), cfg)
    assert lump.busy_s["cpu"] - base.busy_s["cpu"] == pytest.approx(base.misses * ENGINE["read_us"] * 1e-6)
    assert Pricing(base_hw, shape(), 1).store("dali") == Pricing(base_hw, shape(), 1).store("lru")  # not measured


def test_more_evictions_cost_more_predicted_time_by_the_measured_amount(tmp_path):
    """A smaller budget evicts more: the predicted time grows by the extra evictions at `evict_us` on top of what
    the extra reads cost."""
    trace = _trace(tmp_path)
    for budget in (3, 4):
        cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=budget * shape().expert_bytes, threads=1)
        free, priced = (simulate(trace, shape(), _with_store(evict_us=e), cfg) for e in (0.0, 800.0))
        assert priced.seconds - free.seconds == pytest.approx(free.evictions * 800e-6, rel=0.05)
        assert free.evictions > 0


def test_a_tide_refresh_costs_the_models_thread_the_measured_refresh(tmp_path):
    """TIDE on the RAM tier priced with the "tide" store's costs: without step boundaries every request refreshes."""
    trace = _trace(tmp_path)
    cfg = SimConfig("tide", gpu_memory=0, expert_cache=6 * shape().expert_bytes, threads=1)
    hw = Hardware("h", 16, 20.0, measured_cpu(store={"tide": STORE}), SSDProfile("d", 100.0, 100.0, 1e7, 100.0))
    refresh = dataclasses.replace(hw, cpu=measured_cpu(store={"tide": {**STORE, "refresh_us": 300.0}}))
    a, b = simulate(trace, shape(), hw, cfg), simulate(trace, shape(), refresh, cfg)
    assert b.busy_s["cpu"] - a.busy_s["cpu"] == pytest.approx(80 * 300e-6)


def test_an_all_resident_engine_pays_no_tiered_stores_costs(tmp_path):
    """Every expert loaded before timing is the engine's resident store, whose work per request the engine's probe
    already counts in its fixed costs: the tiered store's measured costs are not charged on top."""
    trace = _trace(tmp_path)
    cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=shape().total_expert_bytes, threads=1, preload=True)
    free, priced = (simulate(trace, shape(), _with_store(**over), cfg) for over in ({}, {"request_us": 500.0}))
    assert priced.misses == 0 and priced.busy_s == pytest.approx(free.busy_s)


def test_a_clock_runs_work_slower_only_while_the_other_resource_works():
    """`run_beside`: the part of the work inside the window takes `slowdown` times as long, the rest as priced;
    `stretch` does the same to work already queued."""
    from tiermoe.sim.machine_sim import Clocks

    c = Clocks()
    assert c.run_beside("cpu", 0.0, 1.0, until=0.0, slowdown=2.0) == 1.0  # no window: as priced
    assert c.run_beside("cpu", 0.0, 1.0, until=10.0, slowdown=2.0) == 3.0  # all of it inside: twice as long
    assert c.run_beside("cpu", 0.0, 1.0, until=4.0, slowdown=2.0) == 4.5  # 1 s of wall is 0.5 s of work, then 0.5
    assert c.busy["cpu"] == pytest.approx(4.5)
    d = Clocks()
    d.run("cpu", 0.0, 2.0)
    assert d.stretch("cpu", 1.0, 5.0, 1.5) == pytest.approx(2.5) and d.cpu == pytest.approx(2.5)
    assert d.stretch("cpu", 3.0, 5.0, 1.5) == pytest.approx(2.5)  # nothing queued after `since`


def test_experts_computed_while_reads_are_in_flight_take_the_measured_slowdown(tmp_path):
    """A store whose reads slow the model's compute (`read_slowdown`, measured on it) gives the same hits and misses
    and a run at least as long, longer by no more than its CPU's extra busy time; the slowdown is 1 when not
    measured, and an all-resident engine (no reads) is priced as before."""
    trace = _trace(tmp_path)
    slow_disk = SSDProfile("d", 10.0, 10.0, 1e6, 10.0)  # a read lasts about as long as an expert's compute
    cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=4 * shape().expert_bytes, threads=1)
    runs = [simulate(trace, shape(), Hardware("h", 16, 20.0, measured_cpu(store={"lru": {**STORE, **over}}),
                                              slow_disk), cfg)
            for over in ({}, {"read_slowdown": 1.5}, {"read_slowdown": 3.0})]
    assert len({(r.hits, r.misses, r.evictions) for r in runs}) == 1 and runs[0].misses > 0
    assert runs[0].seconds <= runs[1].seconds < runs[2].seconds  # hidden behind the disk while it is slower
    assert runs[0].busy_s["cpu"] < runs[1].busy_s["cpu"] < runs[2].busy_s["cpu"]
    assert runs[1].seconds - runs[0].seconds <= runs[1].busy_s["cpu"] - runs[0].busy_s["cpu"] + 1e-12
    hw = Hardware("h", 16, 20.0, measured_cpu(store={"lru": STORE}), slow_disk)
    assert Pricing(hw, shape(), 1).read_slowdown("lru") == 1.0
    assert Pricing(load_hardware("h100"), shape(), 1).read_slowdown("lru") == 1.0
    resident = SimConfig("tiermoe", gpu_memory=0, expert_cache=shape().total_expert_bytes, threads=1, preload=True)
    a, b = (simulate(trace, shape(), Hardware("h", 16, 20.0, measured_cpu(store={"lru": {**STORE, **over}}),
                                              slow_disk), resident) for over in ({}, {"read_slowdown": 3.0}))
    assert a.seconds == b.seconds


def test_the_slowdown_field_round_trips_through_a_profile_file(tmp_path):
    hw = Hardware("h", 16, 20.0, measured_cpu(store={"lru": {**STORE, "read_slowdown": 1.2}}),
                  SSDProfile("d", 2.0, 1.5, 1e5))
    hw.save(tmp_path / "h.json")
    back = load_hardware(tmp_path / "h.json")
    assert back == hw and Pricing(back, shape(), 1).read_slowdown("lru") == 1.2


def _prefills(tmp_path, sequences: int = 12, rows: int = 3) -> Trace:
    """Prompts only: each sequence one batched forward of `rows` rows."""
    rng = np.random.default_rng(1)
    tokens = sequences * rows
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(tokens)])
    return Trace(experts=ids.astype(np.int16), weights=np.full(ids.shape, 0.5, np.float16),
                 seq_starts=np.arange(0, tokens, rows, dtype=np.int64), is_prefill=np.ones(tokens, bool),
                 positions=np.tile(np.arange(rows, dtype=np.int32), sequences), token_ids=np.zeros(tokens, np.int32),
                 meta={"layers": 2, "num_experts": 8, "top_k": 2})


@pytest.mark.parametrize("disk_gbs, term", [(1e-3, "single_us"), (1e3, "group_us")])
def test_a_batched_layers_experts_landing_apart_pay_a_call_per_group_beyond_the_first(tmp_path, disk_gbs, term):
    """A batched layer's misses are computed in the groups they land in (residents first): each group beyond the
    first costs the measured `single_us` (one expert) or `group_us` (several). A slow disk lands every read apart
    (groups of one); on a fast one a layer's reads have all landed once its residents are computed (one group)."""
    trace, ssd = _prefills(tmp_path), SSDProfile("d", disk_gbs, disk_gbs, 1e7, disk_gbs)
    cfg = SimConfig("tiermoe", gpu_memory=0, expert_cache=6 * shape().expert_bytes, threads=1)
    base, priced = (simulate(trace, shape(), Hardware("h", 16, 20.0, measured_cpu(engine={**ENGINE, **over}), ssd),
                             cfg) for over in ({}, {term: 700.0}))
    assert (base.hits, base.misses) == (priced.hits, priced.misses) and base.hits > 0 and base.misses > 0
    groups = (priced.busy_s["cpu"] - base.busy_s["cpu"]) / 700e-6
    assert groups == pytest.approx(round(groups)) and 0 < round(groups) <= base.misses
    if term == "group_us":
        assert round(groups) <= 2 * 12  # at most one beyond the residents' per layer of each forward
    preload = dataclasses.replace(cfg, expert_cache=shape().total_expert_bytes, preload=True)
    assert simulate(trace, shape(), Hardware("h", 16, 20.0, measured_cpu(engine={**ENGINE, term: 700.0}), ssd),
                    preload).busy_s == pytest.approx(simulate(trace, shape(), Hardware(
                        "h", 16, 20.0, measured_cpu(), ssd), preload).busy_s)  # all resident: one group a layer
