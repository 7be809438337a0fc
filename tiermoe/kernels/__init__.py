"""Matrix-vector products for decode: a few rows of activations against a weight matrix, at memory bandwidth.

`linear(x, w, bias)` is F.linear and `swiglu(x, gate_up, down, scale)` is down(silu(gate) * up) * scale. For at most
MAX_ROWS rows of x on a CPU with AVX2 (AVX-512, AVX512-BF16) they run the compiled kernels (gemv.cpp): fp32
accumulation, parallel over output rows on torch's intra-op threads, and each output row independent of the other
rows in the batch, bit for bit. Larger batches, other devices and other dtypes use torch's own ops, as does
everything when the kernels cannot be built (one warning line) or TIERMOE_KERNELS=off. `rmsnorm`, `rotary_` and
`decode_attention` fuse the small ops of one decode step around them. In batch-invariant mode `sigmoid` (gates,
routers) and `silu` give an element the same bits wherever it sits in the tensor, and `logsumexp` a row the same
bits whatever rows share the call.

Batch-invariant mode (`set_batch_invariant`, on in the engine): products with any number of rows run the kernels
(row by row through torch where the kernels do not serve), so that a row's result never depends on how many rows
share the product; torch's GEMM picks different blockings for different row counts. With many rows the kernels are
a register-blocked GEMM whose per-output summation order is the one-row order.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from tiermoe.kernels.build import compile_kernels

MAX_ROWS = 8  # rows up to which the kernels beat torch's GEMM (decode); prefill keeps the GEMM
_UNSET = object()
_ops = _UNSET
_invariant = False


def weight_dtype(stored: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype a product's weight is kept in when the model computes in `compute`: a bf16 weight stays bf16 under
    fp32 compute (bf16 widens to fp32 exactly and the kernels widen as they read, so the products are those of the
    widened weight, bit for bit, at half the bytes); anything else is converted to the compute dtype."""
    return stored if stored == torch.bfloat16 and compute == torch.float32 else compute


def widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight in x's dtype for torch's own products (which take one dtype): a bf16 weight under fp32 compute."""
    return weight if weight.dtype == dtype else weight.to(dtype)


def compiled():
    """The compiled module, built on the first call; None when torch ops serve everything."""
    global _ops
    if _ops is _UNSET:
        _ops = compile_kernels()
    return _ops


def backend() -> str:
    """The code path the kernels use on this CPU ("avx512bf16", "avx512", "avx2"), or "torch"."""
    ops = compiled()
    return "torch" if ops is None else ops.isa()


def calls() -> int:
    """Products the compiled kernels have computed in this process (0 when they are not in use)."""
    ops = compiled()
    return 0 if ops is None else ops.calls()


def set_batch_invariant(on: bool) -> None:
    """Make every row of a product independent of the other rows, whatever their number (see the module doc)."""
    global _invariant
    _invariant = on


def batch_invariant() -> bool:
    return _invariant


def _tiles(x: torch.Tensor, ops) -> list[torch.Tensor] | None:
    """x's rows one by one where a batch-invariant product is not computed by the kernels (no build, another
    device); None: one product is invariant (the kernels' are, for any number of rows)."""
    if not _invariant or x.dim() != 2 or (ops is not None and x.device.type == "cpu") or x.shape[0] <= 1:
        return None
    return list(x.split(1))


def _max_rows() -> int:
    """Rows up to which the kernels serve a product: all of them in batch-invariant mode."""
    return sys.maxsize if _invariant else MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); x [M, K] or [K], weight [N, K] -> [M, N] (or [N]) in x's dtype, or in `out_dtype`
    (float32: the kernels store their fp32 sums unrounded; torch's ops round to x's dtype first)."""
    ops = _ops if _ops is not _UNSET else compiled()
    tiles = _tiles(x, ops)
    if tiles is not None:
        return torch.cat([linear(t, weight, bias, out_dtype) for t in tiles])
    if ops is None or x.dim() != 2 or x.device.type != "cpu":
        y = F.linear(x, widened(weight, x.dtype), None if bias is None else widened(bias, x.dtype))
        return y if out_dtype is None else y.to(out_dtype)
    return ops.linear(x, weight, bias, _max_rows(), out_dtype == torch.float32)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """down(silu(gate) * up) * scale: x [M, H], gate_up [2I, H] (gate rows, then up rows), down [H, I], scale [M, 1]
    or None -> [M, H] in x's dtype, or in `out_dtype` (float32 only).

    The kernels keep the gate/up products in fp32 through the activation and apply `scale` before the one rounding
    to the output dtype; torch's ops round at each step, as transformers' experts do.
    """
    ops = _ops if _ops is not _UNSET else compiled()
    tiles = _tiles(x, ops)
    if tiles is not None:
        scales = [None] * len(tiles) if scale is None else scale.split(tiles[0].shape[0])
        return torch.cat([swiglu(t, gate_up, down, s, out_dtype) for t, s in zip(tiles, scales, strict=True)])
    if ops is None or x.device.type != "cpu":
        gate, up = F.linear(x, widened(gate_up, x.dtype)).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, widened(down, x.dtype))
        return (y if scale is None else y * scale).to(out_dtype or x.dtype)
    return ops.swiglu(x, gate_up, down, scale, _max_rows(), out_dtype == torch.float32)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """torch.sigmoid(x). In batch-invariant mode on the CPU each element's result depends on its value alone: torch
    computes a tensor's vector-sized runs and its remainder by different exp code (last-bit differences) and splits
    large tensors between threads anywhere, so a row's gate or router scores would depend on its place in the batch.
    The kernel computes every fp32 element one way (torch's scalar formula); without it, torch row by row."""
    return _each_element(x, torch.sigmoid, "sigmoid")


def silu(x: torch.Tensor) -> torch.Tensor:
    """F.silu(x), batch-invariant as `sigmoid` is (a dense MLP with biases activates its gate rows here)."""
    return _each_element(x, F.silu, "silu")


def _each_element(x: torch.Tensor, torch_op, name: str) -> torch.Tensor:
    if not _invariant or x.device.type != "cpu" or x.dim() == 0:  # CUDA's elementwise code is the same everywhere
        return torch_op(x)
    ops = _ops if _ops is not _UNSET else compiled()
    if ops is not None and x.dtype == torch.float32:
        return getattr(ops, name)(x)
    return _by_rows(torch_op, x)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """x.logsumexp(-1): x [M, V] -> [M]. In batch-invariant mode row by row: whether torch splits a row's sum
    between threads depends on how many rows share the call, and so would the row's last bits (softmax
    probabilities of diffusion confidences, tests/decode)."""
    if not _invariant or x.dim() != 2:
        return x.logsumexp(-1)
    return _by_rows(lambda row: row.logsumexp(-1), x)


def _by_rows(op, x: torch.Tensor) -> torch.Tensor:
    """op(x) computed for each row of x as for that row alone (the batch-invariant form of a torch op)."""
    return torch.cat([op(row) for row in x.split(1)])


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) computed in fp32 and rounded once to the weight's dtype (the dtype of
    the products it feeds); x [..., n] in that dtype or fp32 (the residual stream)."""
    ops = _ops if _ops is not _UNSET else compiled()
    if ops is None or x.device.type != "cpu":
        xf = x.float()
        return (weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(weight.dtype)
    return ops.rmsnorm(x, weight, eps)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate-half rotary embedding applied in place to q [T, h, d] and k [T, g, d] (the first d_rot features, with
    cos, sin [T, d_rot]), bit-identical to x * cos + rotate_half(x) * sin. False (nothing done) if not served."""
    ops = _ops if _ops is not _UNSET else compiled()
    return ops is not None and q.device.type == "cpu" and ops.rotary_(q, k, cos, sin)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor | None:
    """Attention of one query row per head over every cached key: q [h, d], k [S, g, d], v [S, g, dv] -> [h, dv]
    (fp32 scores, softmax and sums); None when not served (then use scaled_dot_product_attention)."""
    ops = _ops if _ops is not _UNSET else compiled()
    if ops is None or q.device.type != "cpu":
        return None
    return ops.decode_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def grouped_swiglu(x: torch.Tensor, gate_ups: list[torch.Tensor], downs: list[torch.Tensor], counts: list[int],
                   scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Several experts' swiglu in one call: x [N, H] holds expert e's counts[e] rows after those of experts < e,
    scale [N, 1] or None -> [N, H], each row bit for bit what `swiglu` gives it with its expert's weights.

    Batch-invariant mode only (where `swiglu` runs the kernels for any number of rows), on the CPU; None when not
    served (no kernels, another mode, device or layout): then call `swiglu` per expert.
    """
    ops = _ops if _ops is not _UNSET else compiled()
    if ops is None or not _invariant or x.device.type != "cpu":
        return None
    return ops.grouped_swiglu(x, gate_ups, downs, counts, scale, out_dtype == torch.float32)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                    seq: torch.Tensor, end: torch.Tensor, window: int | None,
                    scale: float | None) -> torch.Tensor | None:
    """`decode_attention` of many query rows over paged caches in one call: q [T, h, d]; k_pool [P, B, g, d] and
    v_pool [P, B, g, dv] hold the sequences' rows in blocks of B, tables [n, b] (long) each sequence's block ids;
    row t is of sequence seq[t] and sees its cached rows [0, end[t]), the last `window` of them with a window.
    Returns [T, h, dv], each row bitwise `decode_attention` over the same keys; None when not served."""
    ops = _ops if _ops is not _UNSET else compiled()
    if ops is None or q.device.type != "cpu":
        return None
    return ops.paged_attention(q, k_pool, v_pool, tables, seq, end, window or 0,
                               1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
