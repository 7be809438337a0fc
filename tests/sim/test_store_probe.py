"""The store probe (tiermoe.sim.store_probe) on the shipped models' real stores: its terms price what they name, so
slowing one piece of the store by a known CPU time moves that term, and only that one, by about as much."""

import time

import pytest

from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL
from tiermoe.offload.placement.refresh import RefreshPlacement
from tiermoe.offload.policies import LRUPolicy
from tiermoe.offload.tiers.native_reads import engine_module
from tiermoe.sim.store_probe import TERMS, measure_store

SLOW_US = 1000.0


def _busy(fn):
    """`fn` after SLOW_US of the calling thread's CPU (the probe counts the model thread's CPU, not its waits)."""
    def slow(*args, **kwargs):
        end = time.thread_time() + SLOW_US * 1e-6
        while time.thread_time() < end:
            pass
        return fn(*args, **kwargs)
    return slow


@pytest.fixture(scope="module")
def lru():
    return measure_store(DEFAULT_MODEL, {"cache_policy": "lru"}, requests=240)


def test_a_policy_store_has_every_term_and_its_experts_size(lru):
    assert set(lru) == {*TERMS, "load_us", "expert_bytes", "read_slowdown"} and all(v >= 0 for v in lru.values())
    assert lru["read_us"] > 0 and lru["expert_bytes"] > 0 and lru["refresh_us"] == 0


def test_a_slower_eviction_raises_the_eviction_cost_by_as_much(lru, monkeypatch):
    monkeypatch.setattr(LRUPolicy, "victim", _busy(LRUPolicy.victim))
    slow = measure_store(DEFAULT_MODEL, {"cache_policy": "lru"}, requests=240)
    assert slow["evict_us"] - lru["evict_us"] == pytest.approx(SLOW_US, rel=0.3)
    assert abs(slow["request_us"] - lru["request_us"]) < 0.3 * SLOW_US


def test_a_slower_tide_refresh_raises_the_refresh_cost_by_as_much(monkeypatch):
    base = measure_store(DEFAULT_DIFFUSION_MODEL, {"tau": 4}, requests=240)
    # its 96 KiB experts are gathered on the native readers (no Python I/O thread's load), else loaded in Python
    assert (base["load_us"] == 0) == (engine_module() is not None)
    monkeypatch.setattr(RefreshPlacement, "refresh", _busy(RefreshPlacement.refresh))
    slow = measure_store(DEFAULT_DIFFUSION_MODEL, {"tau": 4}, requests=240)
    assert slow["refresh_us"] - base["refresh_us"] == pytest.approx(SLOW_US, rel=0.3)


def test_a_policy_stores_reads_slow_the_models_compute_by_a_measured_factor(lru):
    """The slowdown is measured on the policy's own store (>= 1: reads never speed the compute up); TIDE's store has
    none (priced as 1)."""
    assert lru["read_slowdown"] >= 1.0
    assert "read_slowdown" not in measure_store(DEFAULT_DIFFUSION_MODEL, {"tau": 4}, requests=120)
