"""The accelerator tier's decisions, tested without a GPU (a CPU device stands in for the accelerator)."""

import pytest
import torch

from tests.offload.fake_gpu import FakeGPU
from tiermoe import LLM, SamplingParams
from tiermoe.errors import ConfigError
from tiermoe.offload.policies import LRUPolicy, make_policy
from tiermoe.offload.tiers.accelerator import AcceleratorStore
from tiermoe.offload.tiers.placement_rule import DeviceCosts, Where, place
from tiermoe.offload.tiers.store import ResidentStore

# A PCIe-like machine: copies at 25 GB/s, CPU 20 GB/s streaming and 200 GFLOP/s, device 20 TFLOP/s.
PCIE = DeviceCosts(cpu_flops=2e11, cpu_bandwidth=2e10, copy_bandwidth=2.5e10, device_flops=2e13)
MB = 1 << 20


def test_resident_experts_run_on_the_device():
    assert place(1, 12 * MB, 1e7, on_device=True, has_room=False, costs=PCIE) is Where.DEVICE


def test_decode_token_runs_on_the_cpu_when_copying_costs_more():
    # 1 token: CPU streams 12 MB in 0.6 ms; the copy alone takes 0.5 ms + compute -> close; make the copy slower
    slow_link = DeviceCosts(2e11, 2e10, 1.2e10, 2e13)
    assert place(1, 12 * MB, 2 * 6e6, on_device=False, has_room=False, costs=slow_link) is Where.HOST


def test_prefill_sized_workloads_are_promoted():
    # 512 tokens x 12 MFLOP on the CPU = 31 ms; copying 12 MB is 0.5 ms
    assert place(512, 12 * MB, 2 * 6e6, on_device=False, has_room=False, costs=PCIE) is Where.PROMOTE


def test_free_room_is_filled():
    slow_link = DeviceCosts(2e11, 2e10, 1e9, 2e13)
    assert place(1, 12 * MB, 1e7, on_device=False, has_room=True, costs=slow_link) is Where.PROMOTE


@pytest.fixture
def host(tiny_models):
    llm = LLM(tiny_models("mixtral"))
    return llm, ResidentStore(llm.index, torch.float32)


def test_device_budget_is_never_exceeded_and_weights_are_exact(host):
    llm, store = host
    size = store.expert_nbytes(0, 0)
    acc = AcceleratorStore(store, "cpu", 3 * size, make_policy("lru"), PCIE)
    reference = ResidentStore(llm.index, torch.float32)
    for step in range(30):
        layer, experts = (step // 2) % 3, sorted({(step // 2) % 8, (step // 2 * 3) % 8})  # each asked twice
        counts = [1000] * len(experts)  # heavy: always worth promoting
        for e, w in acc.fetch(layer, experts, counts):
            assert acc.cache.used <= acc.budget
            (_, ref), = reference.fetch(layer, [e])
            assert torch.equal(w.gate_up, ref.gate_up) and torch.equal(w.down, ref.down)
    assert acc.placements[Where.PROMOTE] > 0 and acc.placements[Where.DEVICE] > 0
    assert len(acc.weights) <= 3


def test_light_steps_stay_on_the_host_once_the_device_is_full(host):
    _, store = host
    size = store.expert_nbytes(0, 0)
    slow_link = DeviceCosts(2e11, 2e10, 1e6, 2e13)  # copying is never worth it
    acc = AcceleratorStore(store, "cpu", 2 * size, make_policy("lru"), slow_link)
    list(acc.fetch(0, [0, 1], [1, 1]))  # fills the free room
    list(acc.fetch(0, [2, 3], [1, 1]))
    assert set(acc.weights) == {(0, 0), (0, 1)}
    assert acc.placements[Where.HOST] == 2


def test_generation_through_the_accelerator_tier_is_token_identical(host):
    llm, store = host
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = [[3, 17, 42, 9], [88, 1, 64, 5, 6, 7, 8]]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    acc = AcceleratorStore(store, "cpu", 2 * store.expert_nbytes(0, 0), make_policy("lfu"), PCIE)
    for block in llm.model.moe_blocks:
        block.store = acc
    llm.store = acc
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    assert acc.placements[Where.PROMOTE] > 0


def test_gpu_options_without_a_gpu_are_refused(tiny_models):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA device"):
        LLM(tiny_models("mixtral"), device="cuda")
    with pytest.raises(ConfigError, match="gpu_expert_cache needs device"):
        LLM(tiny_models("mixtral"), gpu_expert_cache="1GiB")
    assert LLM(tiny_models("mixtral"), device="auto").model.lm_head.weight.device.type == "cpu"


class RecordingLRU(LRUPolicy):
    """LRU that keeps every access it is told of, to check what the device tier reports."""

    def __init__(self):
        super().__init__()
        self.accesses: list[tuple[tuple[int, int], int]] = []

    def on_access(self, key, step):
        self.accesses.append((key, step))
        super().on_access(key, step)


def test_the_policy_sees_each_requested_expert_once_per_step_wherever_it_runs(host):
    _, store = host
    size = store.expert_nbytes(0, 0)
    slow_link = DeviceCosts(2e11, 2e10, 1e6, 2e13)  # copying only fills free room
    policy = RecordingLRU()
    acc = AcceleratorStore(store, "cpu", 3 * size, policy, slow_link)
    requests = [[0, 1], [0, 1, 2], [0, 2, 3], [3, 4]]  # room, hits + room, hits + host, host only
    for experts in requests:
        list(acc.fetch(0, experts, [1] * len(experts)))
    assert acc.placements == {Where.PROMOTE: 3, Where.DEVICE: 4, Where.HOST: 3}
    assert len(set(policy.accesses)) == len(policy.accesses)  # no expert counted twice in a step
    expected = {((0, e), step) for step, experts in enumerate(requests, 1) for e in experts}
    assert set(policy.accesses) == expected  # the ones run on the CPU included


def test_an_expert_busy_on_the_cpu_is_swapped_onto_the_device_by_dali(host):
    # DALI counts routed tokens per window; at the boundary the busiest non-resident replaces the idlest resident,
    # which is how a popular expert that never pays for its own copy still reaches the device.
    llm, store = host
    slow_link = DeviceCosts(2e11, 2e10, 1e6, 2e13)
    acc = AcceleratorStore(store, "cpu", store.expert_nbytes(0, 0), make_policy("dali", window=4, swaps=1), slow_link)
    list(acc.fetch(0, [0]))  # fills the free room
    for _ in range(3):  # expert 5 runs on the CPU: the device is full and copying never pays
        (e, w), = acc.fetch(0, [5])
        assert w.down.data_ptr() == store.resident[(0, 5)].down.data_ptr()
    assert (0, 5) in acc.cache and (0, 0) not in acc.weights  # swapped at the window boundary
    (_, w), = acc.fetch(0, [5])  # copied on its first use after the swap
    (_, ref), = ResidentStore(llm.index, torch.float32).fetch(0, [5])
    assert torch.equal(w.gate_up, ref.gate_up) and torch.equal(w.down, ref.down)
    assert set(acc.weights) == {(0, 5)} and acc.placements[Where.PROMOTE] == 2
    list(acc.fetch(0, [5]))
    assert acc.placements[Where.DEVICE] == 1


def test_evicted_experts_stay_intact_while_queued_compute_reads_them(host):
    llm, store = host
    gpu = FakeGPU()  # compute lags the host; freed memory is poisoned once the allocator may reuse it
    acc = AcceleratorStore(store, "cpu", 3 * store.expert_nbytes(0, 0), make_policy("lru"), PCIE, ops=gpu)
    reference = ResidentStore(llm.index, torch.float32)
    g = torch.Generator().manual_seed(0)
    for step in range(24):
        layer, chosen = step % 2, sorted(torch.randperm(3, generator=g)[:2].tolist())
        for e, w in acc.fetch(layer, chosen, [1000] * len(chosen)):  # heavy: every miss is promoted
            (_, ref), = reference.fetch(layer, [e])
            gpu.launch(w, ref)
        if step % 8 == 7:
            gpu.compute.run_to(len(gpu.compute.queue) // 2)  # the device catches up partly, now and then
    gpu.finish()
    assert gpu.errors == []
    assert gpu.freed_in_use > 0 and acc.placements[Where.PROMOTE] > 10 and acc.placements[Where.DEVICE] > 0
