"""One expert from disk to weights: which byte ranges to read, and whether the read buffers become the weights.

An expert whose checkpoint dtype is the one its weights are kept in (kernels.weight_dtype) and whose gate and up
rows can be placed back to back (the converted layout, save_pretrained's per-expert tensors, fused `gate_up_proj`
rows, Mixtral's w1 | w2 | w3) is used in place: its `ExpertWeights` are views into one aligned read buffer, which goes
back to the reader's pool only once the last tensor over it is gone (an eviction frees the cache's reference; a
caller still computing with the expert keeps the bytes alive). Any other expert is converted (dtype, gate | up
concatenated) into new tensors and its read buffers are reused at once. An expert left out of place only by its
layout (whole pages around its bytes would pad it out, e.g. the shipped diffusion model's 96 KiB experts, or its parts
lie apart), with no dtype to change, is a `Gather`: its conversion is placement alone, byte ranges copied into one
exact-size buffer, which the native readers do on their own threads (tiers/native_reads.py).

NOTE: nothing here may run a torch op that splits its work over torch's intra-op threads: reads run on I/O threads
(why: store.build_expert's note, which makes the converted copies).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tiermoe.checkpoint import ExpertSpec, TensorInfo
from tiermoe.kernels import weight_dtype
from tiermoe.offload.tiers.direct_io import PAGE, DirectReader, Segment, align_down, align_up
from tiermoe.offload.tiers.store import ExpertWeights, build_expert, loaded_nbytes

# Parts of one expert closer together than this are fetched with one read (save_pretrained writes an expert's
# down, gate and up tensors next to each other; the converted layout writes gate | up | down).
COALESCE_GAP = 64 << 10

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
    """Whether the read buffer can be the weights: no dtype conversion, gate and up placeable as one [2I, H] with
    whole-page reads (what lies between them in the file, e.g. Mixtral's w2 between w1 and w3, is whole pages), and
    whole pages around the bytes costing at most 1/16 more RAM than the weights (no small expert padded out)."""
    g, u, _ = spec.parts
    return (all(p.dtype == weight_dtype(p.dtype, dtype) and p.offset % p.dtype.itemsize == 0 for p in spec.parts)
            and g.shape[1:] == u.shape[1:] and (u.offset - g.offset - g.nbytes) % PAGE == 0
            and layout(spec).size - spec.nbytes <= spec.nbytes // 16)


def slot_nbytes(spec: ExpertSpec, dtype: torch.dtype) -> int:
    """RAM a resident expert holds: its page-aligned read buffer when used in place, else its converted tensors."""
    return layout(spec).size if in_place(spec, dtype) else loaded_nbytes(spec, dtype)


@dataclass(frozen=True, slots=True)
class Layout:
    """An in-place expert's one page-aligned buffer: gate | up as one run from `gate_up`, down from `down`, each at
    its file offset's place within a page so that whole pages read straight into place."""

    reads: tuple[tuple[Path, int, int, int], ...]  # (file, page-aligned offset, bytes needed, page-aligned place)
    patches: tuple[tuple[int, int, int], ...]  # (from, to, bytes) moved inside the buffer once every read is in
    gate_up: int
    down: int
    size: int  # whole pages


@functools.cache
def layout(spec: ExpertSpec) -> Layout:
    """Where an expert's parts go when its buffer is its weights. Up follows gate; down follows up, in the same page
    when it follows up in the file too, else from the next page. A part whose first page is the previous read's last
    is read from its second page on and its head (less than a page) copied in from a read that holds it (Mixtral: the
    down read's last page holds up's head), else from an extra page at the end."""
    g, u, d = spec.parts
    at_g = g.offset % PAGE
    at_d = at_g + g.nbytes + u.nbytes
    if not (d.file == u.file and d.offset == u.offset + u.nbytes):
        at_d = align_up(at_d) + d.offset % PAGE
    runs: list[list] = []  # [file, offset, nbytes, place]: runs contiguous in the file and the buffer merged
    for f, off, n, at in ((g.file, g.offset, g.nbytes, at_g), (u.file, u.offset, u.nbytes, at_g + g.nbytes),
                          (d.file, d.offset, d.nbytes, at_d)):
        last = runs[-1] if runs else None
        if last is not None and f == last[0] and off == last[1] + last[2] and at == last[3] + last[2]:
            last[2] += n
        else:
            runs.append([f, off, n, at])
    reads, heads, end = [], [], 0  # end: the first buffer byte past every read so far
    for f, off, n, at in runs:
        head = min(align_up(at) - at, n) if align_down(at) < end else 0
        if head:
            heads.append((f, off, head, at))
        if head < n:
            first = align_down(at + head)  # place of the first page read: file offset first - at + off
            reads.append((f, off + first - at, at + n - first, first))
            end = first + align_up(at + n - first)
    data = [(at_g, g.nbytes + u.nbytes), (at_d, d.nbytes)]
    patches = []
    for f, off, n, at in heads:
        src = next((ra + off - ro for rf, ro, rn, ra in reads if rf == f and ro <= off <= ro + align_up(rn) - n), None)
        if src is None or any(src < a + m and a < src + n for a, m in [*data, *[(p[1], p[2]) for p in heads]]):
            reads.append((f, align_down(off), off + n - align_down(off), end))
            src, end = end + off % PAGE, end + align_up(off + n - align_down(off))
        patches.append((src, at, n))
    return Layout(tuple(reads), tuple(patches), at_g, at_d, end)


@dataclass(frozen=True, slots=True)
class Gather:
    """An expert whose conversion is placement alone (no dtype change): its reads land in a bounce buffer laid out
    as `bounce` (its reads; no patches), whose byte ranges `copies` (offset in the bounce buffer, offset in the weights,
    bytes) make up gate | up | down back to back in one buffer of exactly `nbytes` (the expert's `slot_nbytes`)."""

    bounce: Layout
    copies: tuple[tuple[int, int, int], ...]
    nbytes: int

    def weights(self, spec: ExpertSpec) -> tuple[torch.Tensor, ExpertWeights]:
        """A new slot (uninitialised) and the expert's weights as views of it; this runs on the model's thread for
        every miss, so with one dtype it is three tensor ops."""
        g, u, d = spec.parts
        if g.dtype == d.dtype:
            slot = torch.empty(self.nbytes // g.dtype.itemsize, dtype=g.dtype)
        else:
            slot = torch.empty(self.nbytes, dtype=torch.uint8)
        return slot, _views(spec, slot, 0, g.nbytes + u.nbytes)


def gather(spec: ExpertSpec, dtype: torch.dtype, ranges: tuple[Range, ...]) -> Gather | None:
    """The gather of an expert read as `ranges` (read_ranges), or None when it needs a dtype converted (or its gate
    and up rows differ in width or dtype, or down cannot follow them at a whole item)."""
    g, u, d = spec.parts
    if not (all(p.dtype == weight_dtype(p.dtype, dtype) for p in spec.parts) and g.dtype == u.dtype
            and g.shape[1:] == u.shape[1:] and (g.nbytes + u.nbytes) % d.dtype.itemsize == 0):
        return None
    reads, at = [], 0
    for f, off, n in ranges:
        first = align_down(off)
        reads.append((f, first, off + n - first, at))
        at += align_up(off + n - first)
    copies, to = [], 0
    for p in spec.parts:
        i, start, n, _, _ = _place(ranges, p)
        copies.append((reads[i][3] + ranges[i][1] - reads[i][1] + start, to, n))
        to += n
    return Gather(Layout(tuple(reads), (), 0, 0, at), tuple(copies), to)


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """How one expert is read and viewed, worked out once per expert: a reader thread then runs little Python around
    its reads (it holds the interpreter lock for that time, which the model's thread waits on)."""

    spec: ExpertSpec
    layout: Layout | None  # the read buffer becomes the weights (`in_place`)
    ranges: tuple[Range, ...]  # otherwise: one aligned read each, then converted
    views: tuple[tuple[int, int, int, torch.dtype, tuple[int, ...]], ...]  # (range, byte offset in it, bytes,
    # dtype, shape) of gate, up and down when converted
    files: tuple[Path, ...]  # distinct files read
    nbytes: int  # what the disk transfers: whole pages
    gather: Gather | None = None  # not in place, but placement alone: the native readers' way to read it

    @property
    def kept(self) -> bool:
        return self.layout is not None


def plan_read(spec: ExpertSpec, dtype: torch.dtype) -> ReadPlan:
    if in_place(spec, dtype):
        lay = layout(spec)
        return ReadPlan(spec, lay, (), (), tuple(dict.fromkeys(f for f, *_ in lay.reads)),
                        sum(align_up(n) for _, _, n, _ in lay.reads))
    ranges = tuple(read_ranges(spec))
    return ReadPlan(spec, None, ranges, tuple(_place(ranges, p) for p in spec.parts), tuple(dict.fromkeys(
        f for f, _, _ in ranges)), sum(align_up(off + n) - align_down(off) for _, off, n in ranges),
        gather(spec, dtype, ranges))


def read_expert(reader: DirectReader, plan: ReadPlan, dtype: torch.dtype) -> tuple[ExpertWeights, int]:
    """Read one expert; returns its weights and the bytes read (whole pages)."""
    if plan.layout is not None:
        return _read_in_place(reader, plan.spec, plan.layout), plan.nbytes
    segments = [reader.read(*r) for r in plan.ranges]
    try:
        flat = [seg.as_tensor() for seg in segments]  # [bytes] each
        parts = (flat[i][start:start + n].view(dt).view(shape) for i, start, n, dt, shape in plan.views)
        weights = build_expert(*parts, dtype)  # copies
    finally:
        for seg in segments:
            seg.release()
    return weights, plan.nbytes


def _read_in_place(reader: DirectReader, spec: ExpertSpec, lay: Layout) -> ExpertWeights:
    """The expert's weights as views of one read buffer, which returns to the reader's pool once they are gone."""
    seg = reader.buffer(lay.size)
    try:
        read_pages(reader, lay, seg)
        return in_place_weights(spec, lay, seg)
    finally:
        seg.release()  # nothing left to release once handed over


def read_pages(reader: DirectReader, lay: Layout, seg: Segment) -> None:
    """Fill an in-place expert's buffer with its reads, on the calling thread."""
    for f, off, n, at in lay.reads:
        reader.read_pages(f, off, n, seg, at)


def in_place_weights(spec: ExpertSpec, lay: Layout, seg: Segment) -> ExpertWeights:
    """An in-place expert's weights as views of its filled buffer, which passes to them (`Segment.hand_over`)."""
    g, u, d = spec.parts
    for src, dst, n in lay.patches:
        seg.view[dst:dst + n] = seg.view[src:src + n]
    # [buffer items], or [bytes] with two dtypes; views of it share its storage: no copy
    flat = torch.frombuffer(seg.view, dtype=g.dtype) if g.dtype == d.dtype else seg.as_tensor()
    return _handed(seg, _views(spec, flat, lay.gate_up, lay.down))


def _views(spec: ExpertSpec, flat: torch.Tensor, gate_up: int, down: int) -> ExpertWeights:
    """gate | up [2I, H] and down as views of `flat` from byte offsets `gate_up` and `down`: `flat` typed as the
    parts when they share one dtype (one tensor op per weight: this runs on the model's thread between a read
    landing and its compute; the offsets are whole items), else bytes."""
    g, u, d = spec.parts
    rows = (g.shape[0] + u.shape[0], *g.shape[1:])
    if flat.dtype == g.dtype == d.dtype:
        size = g.dtype.itemsize
        return ExpertWeights(flat.as_strided(rows, _strides(rows), gate_up // size),
                             flat.as_strided(d.shape, _strides(d.shape), down // size))
    return ExpertWeights(flat[gate_up:gate_up + g.nbytes + u.nbytes].view(g.dtype).view(rows),
                         flat[down:down + d.nbytes].view(d.dtype).view(d.shape))


def _handed(seg: Segment, weights: ExpertWeights) -> ExpertWeights:
    seg.hand_over()
    return weights


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A contiguous tensor's strides."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _place(ranges: tuple[Range, ...], part: TensorInfo) -> tuple[int, int, int, torch.dtype, tuple[int, ...]]:
    """Which range holds `part`'s bytes, and where in it."""
    for i, (f, off, n) in enumerate(ranges):
        if f == part.file and off <= part.offset <= off + n - part.nbytes:
            return i, part.offset - off, part.nbytes, part.dtype, part.shape
    raise AssertionError(f"no read covers {part}")  # read_ranges covers every part
