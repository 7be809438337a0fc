"""DALI's per-step CPU/GPU assignment of a layer's activated experts: greedy, and the exact optimum as a bound.

The problem (DALI, arXiv 2602.03495): a MoE layer's activated experts each run either on the GPU (copying its
weights over the host link first unless resident there) or on the CPU; the two devices work in parallel, so the
layer takes max(T_gpu, T_cpu). Choose x_i in {0, 1} (1 = GPU) to minimise

    max(base_gpu + sum_i x_i g_i, sum_i (1 - x_i) c_i)

with g_i the GPU time of expert i (copy + compute) and c_i its CPU time; `base_gpu` is the GPU work already fixed
(resident experts, the dense part). `greedy` is DALI's: experts by workload (most tokens first), each put where the
running makespan grows least. `optimal` solves the 0-1 program exactly with scipy.optimize.milp.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def makespan(on_gpu: Sequence[bool], gpu: Sequence[float], cpu: Sequence[float], base_gpu: float = 0.0) -> float:
    t_gpu = base_gpu + sum(g for g, x in zip(gpu, on_gpu, strict=True) if x)
    t_cpu = sum(c for c, x in zip(cpu, on_gpu, strict=True) if not x)
    return max(t_gpu, t_cpu)


def greedy(gpu: Sequence[float], cpu: Sequence[float], tokens: Sequence[int], base_gpu: float = 0.0) -> list[bool]:
    """DALI's greedy: most loaded expert first, each to the device where the makespan after it is smaller (the GPU
    on a tie)."""
    on_gpu = [False] * len(gpu)
    t_gpu, t_cpu = base_gpu, 0.0
    for i in sorted(range(len(gpu)), key=lambda i: (-tokens[i], i)):
        if max(t_gpu + gpu[i], t_cpu) <= max(t_gpu, t_cpu + cpu[i]):
            on_gpu[i], t_gpu = True, t_gpu + gpu[i]
        else:
            t_cpu += cpu[i]
    return on_gpu


ENUMERATE_UP_TO = 12  # experts: below this, trying every assignment (vectorised) is faster than the solver


def optimal(gpu: Sequence[float], cpu: Sequence[float], base_gpu: float = 0.0, method: str = "auto") -> list[bool]:
    """The exact minimum of the makespan: by trying all 2^n assignments (`method="enumerate"`, "auto" for up to
    `ENUMERATE_UP_TO` experts), else as a mixed-integer program (n binaries and the makespan z) with milp."""
    n = len(gpu)
    if n == 0:
        return []
    if method == "enumerate" or (method == "auto" and n <= ENUMERATE_UP_TO):
        return _enumerate(np.asarray(gpu, float), np.asarray(cpu, float), base_gpu)
    return _milp(gpu, cpu, base_gpu)


def _enumerate(g: np.ndarray, c: np.ndarray, base_gpu: float) -> list[bool]:
    n = len(g)
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # [2^n, n]: row m assigns expert i to the GPU if bit i
    span = np.maximum(base_gpu + masks @ g, (1 - masks) @ c)  # [2^n]
    return [bool(v) for v in masks[int(np.argmin(span))]]


def _milp(gpu: Sequence[float], cpu: Sequence[float], base_gpu: float) -> list[bool]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(gpu)
    g, c = np.asarray(gpu, float), np.asarray(cpu, float)
    cost = np.zeros(n + 1)
    cost[-1] = 1.0  # minimise z
    rows = np.zeros((2, n + 1))
    rows[0, :n], rows[0, -1] = -g, 1.0  # z - sum g x >= base_gpu
    rows[1, :n], rows[1, -1] = c, 1.0  # z + sum c x >= sum c
    cons = LinearConstraint(rows, [base_gpu, c.sum()], [np.inf, np.inf])
    integrality = np.r_[np.ones(n), 0]
    res = milp(cost, constraints=cons, integrality=integrality, bounds=Bounds(np.r_[np.zeros(n), 0],
                                                                                np.r_[np.ones(n), np.inf]))
    if not res.success:
        raise RuntimeError(f"milp failed: {res.message}")
    return [bool(v > 0.5) for v in res.x[:n]]
