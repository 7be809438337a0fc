"""Hardware profiles: every preset loads with its sources, and bad names and files are refused clearly."""

import json

import pytest

from tiermoe.sim.hardware import Hardware, load_hardware, presets

NAMED = ["rtx3090", "rtx4090", "rtx5070ti", "rtx5070ti-pcie4", "a100", "h100", "laptop-16gb", "apple-m2"]


def test_every_named_preset_ships_with_sources():
    assert set(NAMED) <= set(presets())
    for name in presets():
        hw = load_hardware(name)
        assert hw.name == name and hw.sources and hw.ssd.rand_read_gbs > 0
        assert hw.cpu.gemv_bandwidth(1) > 0 and hw.cpu.gemm_flops(hw.cpu.cores) >= hw.cpu.gemm_flops(1)
        assert hw.gpu is not None and hw.gpu.memory_gib > 0  # every preset has a GPU (or unified memory)


def test_pcie5_doubles_the_link_of_the_same_gpu():
    assert load_hardware("rtx5070ti").gpu.link_gbs == 2 * load_hardware("rtx5070ti-pcie4").gpu.link_gbs


def test_thread_counts_between_measured_ones_use_the_one_below():
    cpu = load_hardware("rtx4090").cpu
    assert cpu.gemv_bandwidth(3) == cpu.gemv_bandwidth(2) < cpu.gemv_bandwidth(4)


def test_a_profile_file_round_trips_and_unknown_fields_are_refused(tmp_path):
    hw = load_hardware("apple-m2")
    path = tmp_path / "mine.json"
    hw.save(path)
    assert load_hardware(path) == hw
    data = json.loads(path.read_text())
    data["turbo"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="turbo"):
        load_hardware(path)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="rtx4090"):
        load_hardware("rtx9090")
    with pytest.raises(ValueError, match="not found"):
        load_hardware("missing.json")
    assert isinstance(Hardware.from_dict(load_hardware("h100").to_dict()), Hardware)


def test_measuring_this_machine_gives_a_profile_the_simulator_loads(tmp_path):
    from tiermoe.sim.hardware import measure_this_machine

    hw = measure_this_machine(tmp_path, read_bytes=1 << 20, file_mib=8, kernel_mib=8)
    assert hw.gpu is None or hw.gpu.memory_gib > 0
    assert hw.cpu.gemv_bandwidth(1) > 0 and hw.cpu.call_us > 0 and hw.dram_gbs > 0
    # the engine's own costs: kernel rates for both dtypes at every row length and row count, fixed costs >= 0
    cpu = hw.cpu
    assert cpu.engine_measured and set(cpu.kernel_gbs) == {"float32", "bfloat16", "bfloat16-fp32"}
    assert all(rate > 0 for by_k in cpu.kernel_gbs.values() for by_rows in by_k.values() for rate in by_rows.values())
    assert cpu.engine["layer_us"] > 0 and cpu.engine["expert_us"] > 0 and cpu.engine["logit_ns"] >= 0
    assert cpu.attention["decode_gflops"] > 0 and hw.ssd.read_latency_us >= 0
    # the batched expert path's own cost (one grouped kernel call for the layer's experts) is counted per expert
    assert cpu.engine["batch_expert_us"] > 0
    # and its kernel's fixed cost per expert of a grouped call, per dtype and rows: no more than a call of its own
    assert set(cpu.grouped_us) == set(cpu.swiglu_us) and all(
        0 <= cpu.grouped_us[d][r] <= cpu.swiglu_us[d][r] for d in cpu.swiglu_us for r in cpu.swiglu_us[d])
    # how long a read issued while the model computes waits for its I/O thread (a share of that compute)
    assert 0 <= cpu.engine["read_wait"] <= 1
    # what a batched layer pays per group of experts beyond its first (its reads landing apart)
    assert cpu.engine["group_us"] >= 0 and cpu.engine["single_us"] >= 0
    # measured again cache-cold: each kernel call streams weights through the caches first, as a real model's do;
    # the same keys (but the read's), and what `tiermoe profile` writes
    assert cpu.cold_mib > 0 and set(cpu.engine_cold) == set(cpu.engine) - {"read_us", "read_wait", "group_us",
                                                                                "single_us"}
    assert cpu.engine_cold["layer_us"] > 0 and cpu.attention_cold["decode_gflops"] > 0
    assert hw.to_dict()["cpu"]["engine_cold"] == cpu.engine_cold
    assert hw.ssd.rand_read_gbs > 0 and hw.ssd.read_iops > 0 and hw.measured
    # long products' rate beyond LONG_FROM, per dtype, row length and rows; the sampler's cost per logit
    assert set(cpu.long_gbs) == set(cpu.kernel_gbs) and all(
        set(cpu.long_gbs[d][k]) == set(cpu.kernel_gbs[d][k]) for d in cpu.kernel_gbs for k in cpu.kernel_gbs[d])
    assert cpu.engine["sample_ns"] >= 0
    # the RAM tier's own costs per store kind, on the real stores (tiermoe.sim.store_probe), saved and loaded
    assert set(cpu.store) == {"lru", "dali", "tide"} and all(v >= 0 for c in cpu.store.values() for v in c.values())
    hw.save(tmp_path / "measured.json")
    assert load_hardware(tmp_path / "measured.json").cpu.store == cpu.store
    hw.save(tmp_path / "here.json")
    assert load_hardware(tmp_path / "here.json") == hw


def test_the_disk_is_measured_reading_a_given_file_without_writing_beside_it(tmp_path):
    from tiermoe.sim.hardware import _write_random, measure_disk

    experts = tmp_path / "experts.bin"
    _write_random(experts, 8 << 20)
    ssd = measure_disk(experts, read_bytes=256 << 10)
    assert ssd.rand_read_gbs > 0 and ssd.qd1_read_gbs > 0 and ssd.read_iops > 0
    assert str(experts) in ssd.name and sorted(p.name for p in tmp_path.iterdir()) == ["experts.bin"]
    written = measure_disk(tmp_path, read_bytes=256 << 10, file_mib=8)  # a directory: a file written there
    assert written.rand_read_gbs > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["experts.bin"]
