"""The tau solver's predictions on routing worked out by hand, and the cached cost profile."""

import json

import pytest
import torch

from tiermoe.offload.placement import costs as costs_module
from tiermoe.offload.placement.costs import TierCosts, load_costs
from tiermoe.offload.placement.refresh import RefreshPlacement
from tiermoe.offload.placement.tau_solver import BlockModel, candidates, choose_tau, predict
from tiermoe.offload.tiers.placement_rule import DeviceCosts

SIZE = 1000  # bytes per expert; 4-byte weights, so 500 FLOP per token


def model(fast_tier="ram", io=1e6, copy=1e6, cpu_flops=1e6, cpu_bw=1e9, device_flops=1e12):
    costs = TierCosts(io, DeviceCosts(cpu_flops=cpu_flops, cpu_bandwidth=cpu_bw, copy_bandwidth=copy,
                                      device_flops=device_flops))
    return BlockModel(costs, lambda layer, e: SIZE, itemsize=4, fast_tier=fast_tier)


def placement(experts: int) -> RefreshPlacement:
    return RefreshPlacement(experts * SIZE, lambda layer, e: SIZE)


def test_ram_tier_prediction_by_hand():
    # Capacity 2 experts. tau=2: step 0 promotes 0 and 1 and streams 2; step 1 streams 2 and 3 -> 5 reads.
    # tau=1: step 1 also swaps 1 (0 tokens) for 2 (2 tokens) and streams 3 -> also 5 reads.
    block = [{0: {0: 3, 1: 2, 2: 1}}, {0: {0: 3, 2: 2, 3: 1}}]
    m = model()
    start = placement(2)
    for tau in (1, 2):
        p = predict(block, tau, start, m)
        assert p.io_s == pytest.approx(5 * SIZE / 1e6)
        assert p.cpu_s == pytest.approx(12 * 500 / 1e6)  # every routed token is computed on the CPU
    assert start.fast(0) == set()  # the live placement is not touched
    assert choose_tau(block, start, m).tau == 2  # a tie goes to the interval that refreshes least


def test_ram_tier_prices_the_bytes_read_from_disk():
    # A checkpoint stored in bf16 and run in fp32: a read moves half the loaded bytes.
    block = [{0: {0: 3, 1: 2, 2: 1}}, {0: {0: 3, 2: 2, 3: 1}}]
    loaded, stored = model(), BlockModel(model().costs, lambda layer, e: SIZE, 4, "ram", lambda layer, e: SIZE // 2)
    full, half = predict(block, 2, placement(2), loaded), predict(block, 2, placement(2), stored)
    assert half.io_s == pytest.approx(full.io_s / 2) and half.cpu_s == full.cpu_s  # compute is on loaded weights
    device = BlockModel(model().costs, lambda layer, e: SIZE, 4, "device", lambda layer, e: SIZE // 2)
    assert predict(block, 1, placement(2), device).io_s == predict(block, 1, placement(2), model("device")).io_s


def shifting_block(steps=8, width=4):
    """Every step routes a new set of experts: nothing a refresh learns is useful one step later."""
    return [{0: {s * width + i: 4 for i in range(width)}} for s in range(steps)]


def stable_block(steps=8, width=4):
    return [{0: {i: 4 for i in range(width)}} for _ in range(steps)]


def test_stable_routing_refreshes_once_per_block():
    choice = choose_tau(stable_block(), placement(4), model("device"))
    assert choice.tau == 8 and len({round(p.total, 12) for p in choice.predicted.values()}) == 1


def test_device_tier_trades_copies_against_cpu_compute():
    block, start = shifting_block(), placement(4)
    # Cheap copies, slow CPU: chase the routing every step.
    assert choose_tau(block, start, model("device", copy=1e12, cpu_flops=1e3)).tau == 1
    # Dear copies, fast CPU: moving experts never pays, refresh as rarely as possible.
    assert choose_tau(block, start, model("device", copy=1e3, cpu_flops=1e12)).tau == 8


def test_device_prediction_by_hand():
    block = shifting_block(steps=2, width=2)  # step 0: experts 0, 1; step 1: experts 2, 3; 4 tokens each
    p = predict(block, 1, placement(2), model("device", copy=1e6, cpu_flops=1e6, device_flops=1e9))
    assert p.io_s == pytest.approx(4 * SIZE / 1e6)  # two promotions per step
    assert p.device_s == pytest.approx(4 * 4 * 500 / 1e9) and p.cpu_s == 0
    p = predict(block, 2, placement(2), model("device", copy=1e6, cpu_flops=1e6, device_flops=1e9))
    assert p.io_s == pytest.approx(2 * SIZE / 1e6)
    assert p.cpu_s == pytest.approx(2 * 4 * 500 / 1e6)  # step 1's experts run on the CPU


def test_candidates_cover_up_to_one_refresh_per_block():
    assert candidates(32) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert candidates(5) == [1, 2, 3, 4, 5] and candidates(1) == [1] and candidates(0) == [1]


def test_costs_are_profiled_once_and_cached_as_json(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(costs_module, "io_bandwidth", lambda path, n: calls.append(n) or 1.5e9)
    monkeypatch.setattr(costs_module, "profile_costs", lambda device: DeviceCosts(2e11, 2e10, 2e10, 2e11))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    probe = tmp_path / "experts.bin"
    probe.write_bytes(b"\0" * 8192)
    first = load_costs(torch.device("cpu"), probe, 4096)
    assert load_costs(torch.device("cpu"), probe, 4096) == first and calls == [4096]
    table = json.loads((tmp_path / "tiermoe" / "costs.json").read_text())
    (entry,) = table.values()
    assert entry["io_bandwidth"] == 1.5e9 and entry["device"]["cpu_flops"] == 2e11
    load_costs(torch.device("cpu"), probe, 1 << 20)  # another read size is profiled on its own
    assert calls == [4096, 1 << 20] and len(json.loads((tmp_path / "tiermoe" / "costs.json").read_text())) == 2


def test_io_bandwidth_reads_a_small_file_repeatedly(tmp_path):
    probe = tmp_path / "f.bin"
    probe.write_bytes(b"\1" * 20000)
    assert costs_module.io_bandwidth(probe, 8192, total=1 << 20) > 0
