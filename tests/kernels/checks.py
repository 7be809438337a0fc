"""Checks of the compiled kernels against float64 references, shared by the in-process tests and the subprocess
tests that pin the kernels to a lower instruction set (TIERMOE_KERNEL_ISA)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from tiermoe import kernels

EPS32 = 2.0**-24
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
SHAPES = list(itertools.product((1, 2, 3, 5, 8), (1, 7, 33, 130), (1, 15, 33, 100, 257)))  # M, N, K


def check_linear_close_to_float64(x_dtype: torch.dtype, w_dtype: torch.dtype, seed: int = 0) -> None:
    """Within fp32 accumulation error of the exact product, plus one rounding to x's dtype; asked for fp32, the
    same sums unrounded."""
    g = torch.Generator().manual_seed(seed)
    for m, n, k in SHAPES:
        x = torch.randn(m, k, generator=g).to(x_dtype)
        w = torch.randn(n, k, generator=g).to(w_dtype)
        b = torch.randn(n, generator=g).to(w_dtype)
        y = kernels.linear(x, w, b)
        assert y.dtype == x_dtype and y.shape == (m, n)
        exact = x.double() @ w.double().T + b.double()
        size = x.double().abs() @ w.double().abs().T + b.double().abs()
        bound = (k + 2) * EPS32 * size + (2.0**-8 if x_dtype == torch.bfloat16 else 0.0) * exact.abs()
        assert ((y.double() - exact).abs() <= bound + 1e-30).all(), (x_dtype, w_dtype, m, n, k)
        y32 = kernels.linear(x, w, b, torch.float32)
        assert y32.dtype == torch.float32 and torch.equal(y32.to(x_dtype), y)
        assert ((y32.double() - exact).abs() <= (k + 2) * EPS32 * size + 1e-30).all(), (x_dtype, w_dtype, m, n, k)


def check_rows_independent_of_batch(dtype: torch.dtype, seed: int = 0) -> None:
    """Row i of a batch equals the same row computed alone or among other rows, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    for n, k in ((130, 257), (64, 1024)):
        w = torch.randn(n, k, generator=g).to(dtype)
        gate_up = torch.randn(2 * 48, k, generator=g).to(dtype) / 8
        down = torch.randn(k, 48, generator=g).to(dtype) / 8
        rows = torch.randn(kernels.MAX_ROWS, k, generator=g).to(dtype)
        scale = torch.rand(kernels.MAX_ROWS, 1, generator=g)
        batch, mlp = kernels.linear(rows, w), kernels.swiglu(rows, gate_up, down, scale, torch.float32)
        for i in range(kernels.MAX_ROWS):
            assert torch.equal(kernels.linear(rows[i:i + 1], w)[0], batch[i])
            assert torch.equal(kernels.swiglu(rows[i:i + 1], gate_up, down, scale[i:i + 1], torch.float32)[0], mlp[i])
            others = torch.cat([rows[i:i + 1], torch.randn(2, k, generator=g).to(dtype)])
            assert torch.equal(kernels.linear(others, w)[0], batch[i])


def check_any_batch_gives_each_row_its_bits_alone(seed: int = 0) -> None:
    """In batch-invariant mode, for 1..40 rows and odd sizes (K not a multiple of any vector width, N not of the
    register block): each row of a product is bitwise the row computed alone, whatever rows share the product."""
    g = torch.Generator().manual_seed(seed)
    before = kernels.batch_invariant()
    kernels.set_batch_invariant(True)
    try:
        for x_dtype, w_dtype in DTYPES:
            for n, k in ((37, 257), (13, 33), (70, 1024), (5, 7)):
                w = torch.randn(n, k, generator=g).to(w_dtype)
                x = torch.randn(40, k, generator=g).to(x_dtype)
                alone = torch.cat([kernels.linear(x[i:i + 1], w) for i in range(40)])
                for m in range(1, 41):
                    assert torch.equal(kernels.linear(x[:m], w), alone[:m]), (x_dtype, w_dtype, n, k, m)
                order = torch.randperm(40, generator=g)  # another composition: the same rows, shuffled
                assert torch.equal(kernels.linear(x[order], w), alone[order]), (x_dtype, w_dtype, n, k)
            hidden, inner = 33, 23
            x = torch.randn(40, hidden, generator=g).to(x_dtype)
            gate_up = (torch.randn(2 * inner, hidden, generator=g) / 6).to(w_dtype)
            down = (torch.randn(hidden, inner, generator=g) / 5).to(w_dtype)
            scale = torch.rand(40, 1, generator=g)
            alone = torch.cat([kernels.swiglu(x[i:i + 1], gate_up, down, scale[i:i + 1]) for i in range(40)])
            for m in (2, 9, 31, 40):
                assert torch.equal(kernels.swiglu(x[:m], gate_up, down, scale[:m]), alone[:m]), (x_dtype, m)
    finally:
        kernels.set_batch_invariant(before)


def check_swiglu_close_to_float64(dtype: torch.dtype, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m, hidden, inner in ((1, 64, 48), (3, 33, 17), (8, 100, 70)):
        x = torch.randn(m, hidden, generator=g).to(dtype)
        gate_up = (torch.randn(2 * inner, hidden, generator=g) / hidden**0.5).to(dtype)
        down = (torch.randn(hidden, inner, generator=g) / inner**0.5).to(dtype)
        scale = torch.rand(m, 1, generator=g)
        y = kernels.swiglu(x, gate_up, down, scale)
        gate, up = F.linear(x.double(), gate_up.double()).chunk(2, dim=-1)
        exact = F.linear(F.silu(gate) * up, down.double()) * scale.double()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the activation is rounded once before `down`
        assert y.dtype == dtype and (y.double() - exact).abs().max() <= tol * exact.abs().max(), (dtype, m)
        y32 = kernels.swiglu(x, gate_up, down, scale, torch.float32)  # the same sums, not rounded to x's dtype
        assert y32.dtype == torch.float32 and torch.equal(y32.to(dtype), y), (dtype, m)


def check_grouped_swiglu_gives_each_expert_its_swiglu_bits(seed: int = 0) -> None:
    """A layer's experts in one grouped call: each row bit for bit swiglu of its expert's rows (alone too), for odd
    widths, 1..many rows per expert, and enough rows that the activation is split across threads."""
    g = torch.Generator().manual_seed(seed)
    before = kernels.batch_invariant()
    kernels.set_batch_invariant(True)
    try:
        for (x_dtype, w_dtype), (hidden, inner), experts in itertools.product(
                DTYPES, ((33, 23), (64, 100), (7, 5), (40, 300)), (1, 3, 9)):
            counts = torch.randint(1, 120 if inner == 300 else 12, (experts,), generator=g).tolist()
            x = torch.randn(sum(counts), hidden, generator=g).to(x_dtype)
            gate_ups = [(torch.randn(2 * inner, hidden, generator=g) / 6).to(w_dtype) for _ in counts]
            downs = [(torch.randn(hidden, inner, generator=g) / 5).to(w_dtype) for _ in counts]
            scale = torch.rand(sum(counts), 1, generator=g)
            for out_dtype in (None, torch.float32):
                with torch.inference_mode():  # as the engine calls it: torch ops on the pool's threads too
                    grouped = kernels.grouped_swiglu(x, gate_ups, downs, counts, scale, out_dtype)
                parts = torch.tensor([0, *counts]).cumsum(0).tolist()
                per_expert = torch.cat([kernels.swiglu(x[a:b], gu, dn, scale[a:b], out_dtype)
                                        for a, b, gu, dn in zip(parts[:-1], parts[1:], gate_ups, downs, strict=True)])
                assert torch.equal(grouped, per_expert), (x_dtype, w_dtype, hidden, inner, counts, out_dtype)
            e, row = experts - 1, parts[-1] - 1  # the last row alone, through its expert
            alone = kernels.swiglu(x[row:], gate_ups[e], downs[e], scale[row:], torch.float32)
            assert torch.equal(alone[0], grouped[row])
    finally:
        kernels.set_batch_invariant(before)


def check_paged_attention_gives_each_row_decode_attention_bits(seed: int = 0) -> None:
    """Rows of several sequences over paged caches (shuffled blocks, odd block sizes, grouped heads, windows) in one
    call: each row bit for bit decode_attention over its sequence's keys gathered in position order."""
    g = torch.Generator().manual_seed(seed)
    for dtype, (h, kv_heads, d, dv), block, window in itertools.product(
            (torch.float32, torch.bfloat16), ((8, 2, 24, 16), (4, 4, 33, 33), (6, 1, 7, 5)), (16, 3), (None, 5)):
        pool_k = torch.randn(40, block, kv_heads, d, generator=g).to(dtype)
        pool_v = torch.randn(40, block, kv_heads, dv, generator=g).to(dtype)
        lengths = (1, 7, 20, 33)
        tables = [torch.randperm(40, generator=g)[:-(-n // block)].tolist() for n in lengths]
        width = max(map(len, tables))
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        rows = [(i, end) for i, n in enumerate(lengths) for end in range(max(1, n - 3), n + 1)]  # (sequence, keys)
        q = torch.randn(len(rows), h, d, generator=g).to(dtype)
        out = kernels.paged_attention(q, pool_k, pool_v, padded, torch.tensor([i for i, _ in rows]),
                                      torch.tensor([end for _, end in rows]), window, None)
        for r, (i, end) in enumerate(rows):
            keys = pool_k[tables[i]].flatten(0, 1)[:end][-window if window else 0:]
            values = pool_v[tables[i]].flatten(0, 1)[:end][-window if window else 0:]
            assert torch.equal(out[r], kernels.decode_attention(q[r], keys, values, None)), (dtype, h, block, r)


def run_all() -> None:
    for x_dtype, w_dtype in DTYPES:
        check_linear_close_to_float64(x_dtype, w_dtype)
    check_any_batch_gives_each_row_its_bits_alone()
    check_grouped_swiglu_gives_each_expert_its_swiglu_bits()
    check_paged_attention_gives_each_row_decode_attention_bits()
    for dtype in (torch.float32, torch.bfloat16):
        check_rows_independent_of_batch(dtype)
        check_swiglu_close_to_float64(dtype)
