"""TIDE with an accelerator fast tier, tested without a GPU (a CPU device stands in for the accelerator)."""

import pytest
import torch

from tests.decode.test_diffusion import LONG, SHORT
from tests.offload.fake_gpu import FakeGPU
from tiermoe import LLM, SamplingParams
from tiermoe.decode import diffusion
from tiermoe.decode.diffusion import DiffusionOptions
from tiermoe.offload.placement.costs import TierCosts
from tiermoe.offload.placement.refresh import DenoiseStep
from tiermoe.offload.placement.refresh_accelerator import RefreshAcceleratorStore
from tiermoe.offload.tiers.placement_rule import DeviceCosts, Where
from tiermoe.offload.tiers.store import ResidentStore

# A PCIe-like machine: NVMe 3 GB/s, copies 25 GB/s, CPU 20 GB/s streaming and 200 GFLOP/s, device 20 TFLOP/s.
PCIE = TierCosts(3e9, DeviceCosts(cpu_flops=2e11, cpu_bandwidth=2e10, copy_bandwidth=2.5e10, device_flops=2e13))
PARAMS = [SamplingParams(temperature=0, max_tokens=24, block_length=8, steps=8, threshold=0.95),
          SamplingParams(temperature=1.0, seed=1, max_tokens=16, block_length=16, steps=8)]


@pytest.fixture(scope="module")
def llm(folders):
    return LLM(folders["llada2_moe"])


def attach(llm, fraction: float, ops=None) -> RefreshAcceleratorStore:
    host = ResidentStore(llm.index, torch.float32)
    layers = [b.layer for b in llm.model.moe_blocks]
    budget = int(fraction * len(llm.index.experts()) * host.expert_nbytes(layers[0], 0))
    acc = RefreshAcceleratorStore(host, "cpu", budget, layers, torch.float32, costs=PCIE, ops=ops)
    for block in llm.model.moe_blocks:
        block.store = acc
    return acc


def decode(llm, store, tau):
    seqs = [llm._make_sequence(p, sp) for p, sp in zip([LONG, SHORT], PARAMS, strict=True)]
    stats = diffusion.generate(llm.model, seqs, llm.tokenizer, llm.diffusion, DiffusionOptions(tau=tau), store=store)
    return [s.output_ids for s in seqs], stats


@pytest.mark.parametrize("tau", [1, 2, 4, "auto"])
@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_every_tau_and_budget_is_token_identical(llm, fraction, tau):
    expected, _ = decode(llm, llm.store, None)
    acc = attach(llm, fraction)
    try:
        got, stats = decode(llm, acc, tau)
    finally:
        for block in llm.model.moe_blocks:
            block.store = llm.store
    assert got == expected
    assert acc.cache.used <= acc.budget and acc.placements[Where.HOST] > 0 and acc.placements[Where.PROMOTE] > 0
    if tau == "auto":
        assert acc.choice is not None and acc.choice.tau in acc.choice.predicted
        assert all(isinstance(s["tau"], int) for s in stats.values())  # every request had a second block


def test_reuse_steps_run_misses_on_the_host_and_copy_nothing(llm):
    acc = attach(llm, 0.25)
    layer = llm.model.moe_blocks[0].layer
    acc.begin_step(DenoiseStep(0, 0, True))
    counts = [5, 1, 7, 1, 1]
    first = dict(acc.fetch(layer, [0, 1, 2, 3, 4], counts))
    capacity = acc.placement.capacity // acc.expert_nbytes(layer, 0)
    assert 1 <= capacity < 5
    busiest = sorted(range(5), key=lambda e: (-counts[e], e))[:capacity]
    assert set(acc.weights) == {(layer, e) for e in busiest}
    assert acc.placements[Where.PROMOTE] == capacity and acc.placements[Where.HOST] == 5 - capacity
    acc.begin_step(DenoiseStep(1, 1, False))
    copies = acc.placements[Where.PROMOTE]
    served = dict(acc.fetch(layer, [2, 5, 6], [1, 99, 99]))
    assert acc.placements[Where.PROMOTE] == copies  # busy or not, nothing moves between refreshes
    assert served[2] is first[2]  # the device copy
    assert served[5] is acc.host.resident[(layer, 5)]  # computed where it lives
    assert acc.stats.streamed == (5 - capacity) + 2


def test_device_budget_holds_and_demoted_experts_stay_intact_through_refreshes(llm):
    gpu = FakeGPU()  # compute lags the host; freed memory is poisoned once the allocator may reuse it
    acc = attach(llm, 0.25, ops=gpu)
    layers = [b.layer for b in llm.model.moe_blocks]
    g = torch.Generator().manual_seed(0)
    for step in range(20):
        acc.begin_step(DenoiseStep(step // 5, step % 5, step % 2 == 0))
        for layer in layers:
            experts = sorted(torch.randperm(16, generator=g)[:6].tolist())
            for e, w in acc.fetch(layer, experts, torch.randint(1, 9, (6,), generator=g).tolist()):
                assert acc.cache.used <= acc.budget
                gpu.launch(w, acc.host.resident[(layer, e)])
            assert acc.placement.used(layer) <= acc.placement.capacity
    assert set(acc.weights) == {(layer, e) for layer in layers for e in acc.placement.fast(layer)}
    gpu.finish()
    assert gpu.errors == []
    assert acc.stats.demoted > 0 and gpu.freed_in_use > 0 and gpu.uses > 0
