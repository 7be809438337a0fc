"""The accelerator tier's copy protocol (`Stager`), checked on the CPU through `FakeGPU` (tests.offload.fake_gpu)."""

import torch

from tests.offload.fake_gpu import FakeGPU
from tiermoe.offload.tiers.accelerator import Stager
from tiermoe.offload.tiers.store import ExpertWeights


def experts(n: int) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(0)
    return [ExpertWeights(torch.randn(8, 4, generator=g), torch.randn(4, 4, generator=g)) for _ in range(n)]


def test_copies_queue_without_blocking_until_their_staging_buffer_comes_round():
    gpu = FakeGPU()
    stager = Stager(gpu, slots=2)
    ws = experts(3)
    out = [stager.copy_expert(ws[0]), stager.copy_expert(ws[1])]
    assert gpu.host_waits == 0 and gpu.copy_stream.done == 0  # both copies queued, none waited for
    out.append(stager.copy_expert(ws[2]))  # refills the first buffer
    assert gpu.host_waits == 1 and gpu.copy_stream.done == 2  # after the first expert's two copies only
    for w, ref in zip(out, ws, strict=True):
        gpu.launch(w, ref)
    gpu.finish()
    assert gpu.errors == [] and gpu.uses == 6


def test_a_staging_buffer_grows_for_a_larger_expert():
    gpu = FakeGPU()
    stager = Stager(gpu, slots=1)
    small, big = experts(1)[0], ExpertWeights(torch.randn(32, 16), torch.randn(16, 16))
    for w in (small, big, small):
        gpu.launch(stager.copy_expert(w), w)
    gpu.finish()
    assert gpu.errors == [] and gpu.uses == 6
