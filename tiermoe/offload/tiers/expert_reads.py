"""One expert from disk to weights: which byte ranges to read, and whether the read buffers become the weights.

An expert whose checkpoint dtype is the compute dtype and whose gate and up rows lie back to back (the converted
layout, save_pretrained's per-expert tensors, fused `gate_up_proj` rows) is used in place: its `ExpertWeights` are
views into the aligned read buffers, which go back to the reader's pool only once the last tensor over them is gone
(an eviction frees the cache's reference; a caller still computing with the expert keeps the bytes alive). Any other
expert is converted (dtype, gate | up concatenated) into new tensors and its read buffers are reused at once.

NOTE: nothing here may run a torch op that splits its work over torch's intra-op threads. Reads run on I/O
threads, and with OpenMP (libgomp) every other thread that enters a parallel region gets a team of its own; once
the process has more OpenMP threads than cores, libgomp makes every idle worker sleep at once instead of spinning,
so each of the model's parallel regions then waits for its workers to wake (bench/results/peers_memory.md: decode
with every expert cached ran at 0.7x the resident speed, with 50x the context switches). Copies are made with
numpy, conversions in pieces below torch's parallel grain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiermoe.checkpoint import ExpertSpec, TensorInfo
from tiermoe.offload.tiers.direct_io import PAGE, DirectReader, align_down, align_up
from tiermoe.offload.tiers.store import ExpertWeights, loaded_nbytes

# Parts of one expert closer together than this are fetched with one read (save_pretrained writes an expert's
# down, gate and up tensors next to each other; the converted layout writes gate | up | down).
COALESCE_GAP = 64 << 10
SERIAL_GRAIN = 32768  # elements: torch runs an elementwise op over fewer than this (at::internal::GRAIN_SIZE) serially

Range = tuple[Path, int, int]  # (file, offset, nbytes)


def read_ranges(spec: ExpertSpec, gap: int = COALESCE_GAP) -> list[Range]:
    """The reads that fetch an expert: its parts by position, those of one file at most `gap` apart in one range."""
    ranges: list[list] = []
    for p in sorted(spec.parts, key=lambda p: (os.fspath(p.file), p.offset)):
        last = ranges[-1] if ranges else None
        if last is not None and last[0] == p.file and p.offset - (last[1] + last[2]) <= gap:
            last[2] = max(last[2], p.offset + p.nbytes - last[1])
        else:
            ranges.append([p.file, p.offset, p.nbytes])
    return [(f, off, n) for f, off, n in ranges]


def in_place(spec: ExpertSpec, dtype: torch.dtype) -> bool:
    """Whether the read buffers can be the weights: no dtype conversion, gate then up contiguous (one [2I, H]), and
    whole pages around the bytes costing at most 1/16 more RAM than the weights (no small expert padded out)."""
    g, u, _ = spec.parts
    return (all(p.dtype == dtype and p.offset % dtype.itemsize == 0 for p in spec.parts)
            and g.file == u.file and u.offset == g.offset + g.nbytes and g.shape[1:] == u.shape[1:]
            and _pages(spec) - spec.nbytes <= spec.nbytes // 16)


def slot_nbytes(spec: ExpertSpec, dtype: torch.dtype) -> int:
    """RAM a resident expert holds: its page-aligned read buffers when used in place, else its converted tensors."""
    return _pages(spec) if in_place(spec, dtype) else loaded_nbytes(spec, dtype)


def _pages(spec: ExpertSpec) -> int:
    """Bytes of the whole pages that in-place reads hold (parts less than a page apart share one read)."""
    return sum(align_up(off + n) - align_down(off) for _, off, n in read_ranges(spec, gap=PAGE))


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """How one expert is read and viewed, worked out once per expert: a reader thread then runs little Python around
    its reads (it holds the interpreter lock for that time, which the model's thread waits on)."""

    spec: ExpertSpec
    kept: bool  # the read buffers become the weights (`in_place`)
    ranges: tuple[Range, ...]  # one aligned read each
    views: tuple[tuple[int, int, int, torch.dtype, tuple[int, ...]], ...]  # (range, byte offset in it, bytes,
    # dtype, shape) of gate | up and down when kept, else of gate, up and down
    files: tuple[Path, ...]  # distinct files read
    nbytes: int  # what the disk transfers: whole pages


def plan_read(spec: ExpertSpec, dtype: torch.dtype) -> ReadPlan:
    kept = in_place(spec, dtype)
    ranges = tuple(read_ranges(spec, gap=PAGE if kept else COALESCE_GAP))  # kept buffers hold no other's bytes
    parts = spec.parts
    if kept:
        g, u, d = parts
        parts = (TensorInfo(g.file, g.offset, g.nbytes + u.nbytes, dtype, (g.shape[0] + u.shape[0], *g.shape[1:])), d)
    return ReadPlan(spec, kept, ranges, tuple(_place(ranges, p) for p in parts), tuple(dict.fromkeys(
        f for f, _, _ in ranges)), sum(align_up(off + n) - align_down(off) for _, off, n in ranges))


def read_expert(reader: DirectReader, plan: ReadPlan, dtype: torch.dtype) -> tuple[ExpertWeights, int]:
    """Read one expert (one aligned read per range); returns its weights and the bytes read (whole pages)."""
    segments = [reader.read(*r) for r in plan.ranges]
    try:
        flat = [seg.as_tensor() for seg in segments]  # [bytes] each; views of it share its storage: no copy
        tensors = [flat[i][start:start + n].view(dt).view(shape) for i, start, n, dt, shape in plan.views]
        if plan.kept:
            weights = ExpertWeights(*tensors)
            for seg in segments:
                seg.hand_over()
        else:
            weights = assemble(*tensors, dtype)  # copies
    finally:
        for seg in segments:
            seg.release()  # nothing left to release for a handed-over segment
    return weights, plan.nbytes


def assemble(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> ExpertWeights:
    """store.build_expert's weights (gate | up concatenated, everything in `dtype`, never aliasing the inputs), made
    on the calling thread alone (see the module's note)."""
    gate_up = torch.empty((gate.shape[0] + up.shape[0], *gate.shape[1:]), dtype=dtype)  # [2I, H]
    out = torch.empty(down.shape, dtype=dtype)  # [H, I]
    serial_copy(gate_up[:gate.shape[0]], gate)
    serial_copy(gate_up[gate.shape[0]:], up)
    serial_copy(out, down)
    return ExpertWeights(gate_up, out)


def serial_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src (contiguous, same shape), converting the dtype as `Tensor.copy_` does, without intra-op
    threads: a byte copy by numpy (which releases the interpreter lock), else copy_ over pieces below the grain."""
    if dst.dtype == src.dtype:
        np.copyto(_bytes(dst), _bytes(src))
        return
    d, s = dst.view(-1), src.reshape(-1)
    for i in range(0, d.numel(), SERIAL_GRAIN):
        d[i:i + SERIAL_GRAIN].copy_(s[i:i + SERIAL_GRAIN])


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(-1).view(torch.uint8).numpy()


def _place(ranges: tuple[Range, ...], part: TensorInfo) -> tuple[int, int, int, torch.dtype, tuple[int, ...]]:
    """Which range holds `part`'s bytes, and where in it."""
    for i, (f, off, n) in enumerate(ranges):
        if f == part.file and off <= part.offset <= off + n - part.nbytes:
            return i, part.offset - off, part.nbytes, part.dtype, part.shape
    raise AssertionError(f"no read covers {part}")  # read_ranges covers every part
