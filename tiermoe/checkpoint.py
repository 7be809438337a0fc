"""Safetensors index: every tensor and every (layer, expert) mapped to a file, byte range, dtype and shape.

Only headers are read here. Non-expert weights are read once at start; expert weights are byte ranges handed to an
expert store, which decides when and how to read them. Both on-disk expert layouts are supported:
per expert (`...mlp.experts.E.gate_proj.weight`) and fused 3-D (`...mlp.experts.gate_up_proj [E, 2I, H]`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tiermoe.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# The aligned expert-contiguous layout written by `tiermoe convert`.
CONVERTED_INDEX = "experts.json"
EXPERTS_FILE = "experts.bin"

# Canonical expert names, after a family's `sanitize` has renamed its checkpoint keys.
PER_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor (or one contiguous slice of a tensor) lives on disk."""

    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read_bytes(self) -> bytearray:
        """The tensor's raw bytes, with a plain buffered read straight into the returned buffer (no second copy)."""
        data = bytearray(self.nbytes)
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(data)
        if got != self.nbytes:
            raise CheckpointError(f"{self.file}: short read at byte {self.offset} ({got} of {self.nbytes} bytes)")
        return data

    def read(self) -> torch.Tensor:
        """Read the tensor with a plain buffered read."""
        return from_bytes(self.read_bytes(), self.dtype, self.shape)

    def row_slice(self, first: int, count: int) -> TensorInfo:
        """The contiguous sub-tensor `self[first:first + count]` along dim 0."""
        row_bytes = self.nbytes // self.shape[0]
        return TensorInfo(self.file, self.offset + first * row_bytes, count * row_bytes, self.dtype,
                          (count, *self.shape[1:]))


def from_bytes(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Build a tensor over a byte buffer (no copy when the buffer is writable)."""
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(data) if isinstance(data, bytes) else data
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


@dataclass(frozen=True, slots=True)
class ExpertSpec:
    """The three projections of one routed expert: gate [I, H], up [I, H], down [H, I]."""

    gate: TensorInfo
    up: TensorInfo
    down: TensorInfo

    @property
    def parts(self) -> tuple[TensorInfo, TensorInfo, TensorInfo]:
        return (self.gate, self.up, self.down)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def contiguous(self) -> bool:
        """True when gate, up and down lie back to back in one file (one read fetches the expert)."""
        g, u, d = self.parts
        return g.file == u.file == d.file and u.offset == g.offset + g.nbytes and d.offset == u.offset + u.nbytes


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header; check that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if f.read(1) != b"{":  # a safetensors header is a JSON object right after its 8-byte length
            raise CheckpointError(f"{path}: not a safetensors file (it does not start with a safetensors header)")
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: malformed safetensors header ({e})") from e
    header.pop("__metadata__", None)
    base = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, base, size)
    return tensors


def _tensor_info(path: Path, name: str, entry: dict, base: int, size: int) -> TensorInfo:
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
    begin, end = entry["data_offsets"]
    if base + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensor {name} ends at byte {base + end} but the file has {size}"
        )
    return TensorInfo(path, base + begin, end - begin, dtype, tuple(entry["shape"]))


class CheckpointIndex:
    """All tensors of a Hugging Face checkpoint folder, under canonical names.

    `rename` maps a checkpoint key to the canonical key (a family's `sanitize`), or None to drop it.
    """

    def __init__(self, folder: str | Path, rename: Callable[[str], str | None] = lambda k: k):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            for name, info in read_header(path).items():
                canonical = rename(name)
                if canonical is not None:
                    self.tensors[canonical] = info
        converted = self.folder / CONVERTED_INDEX
        self._experts = _read_converted(converted) if converted.exists() else _index_experts(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def load(self, name: str) -> torch.Tensor:
        """Read one non-expert tensor."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.folder}: missing tensor {name}")
        return self.tensors[name].read()

    def non_expert_names(self) -> list[str]:
        return [n for n in self.tensors if not (PER_EXPERT_KEY.match(n) or FUSED_EXPERT_KEY.match(n))]

    def experts(self) -> dict[tuple[int, int], ExpertSpec]:
        """Every routed expert found, keyed by (layer, expert)."""
        return dict(self._experts)

    def expert(self, layer: int, expert: int) -> ExpertSpec:
        """Byte ranges of one routed expert; raises CheckpointError naming the missing tensor."""
        spec = self._experts.get((layer, expert))
        if spec is None:
            raise CheckpointError(
                f"{self.folder}: missing tensor model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight "
                f"(expert {expert} of layer {layer})"
            )
        return spec

    def check_experts(self, moe_layers: list[int], num_experts: int) -> None:
        """Fail at start, not mid-generation, if any routed expert of any MoE layer is absent."""
        for layer in moe_layers:
            for e in range(num_experts):
                self.expert(layer, e)

    @property
    def expert_layout(self) -> str:
        if (self.folder / CONVERTED_INDEX).exists():
            return "converted"
        return "fused" if any(FUSED_EXPERT_KEY.match(n) for n in self.tensors) else "per_expert"


def _read_converted(path: Path) -> dict[tuple[int, int], ExpertSpec]:
    """Experts of a folder written by `tiermoe convert`; refuses an experts file changed since conversion."""
    try:
        meta = json.loads(path.read_text())
        data = path.parent / meta["file"]
        if not data.exists():
            raise CheckpointError(f"{data}: missing (listed in {path})")
        st = data.stat()
        if st.st_size != meta["file_size"] or st.st_mtime_ns != meta["file_mtime_ns"]:
            raise CheckpointError(f"{data} changed after conversion (size or modification time differs from {path}); "
                                  "convert the checkpoint again")
        experts = {}
        for key, entry in meta["experts"].items():
            layer, e = map(int, key.split("/"))
            parts = [TensorInfo(data, entry["offset"] + p["offset"], p["nbytes"], getattr(torch, p["dtype"]),
                                tuple(p["shape"])) for p in entry["parts"]]
            experts[(layer, e)] = ExpertSpec(*parts)
        return experts
    except (KeyError, ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed expert index ({e!r})") from e


def _index_experts(tensors: dict[str, TensorInfo]) -> dict[tuple[int, int], ExpertSpec]:
    parts: dict[tuple[int, int], dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        if m := PER_EXPERT_KEY.match(name):
            parts.setdefault((int(m[1]), int(m[2])), {})[m[3]] = info
        elif m := FUSED_EXPERT_KEY.match(name):
            _split_fused(int(m[1]), m[2], info, parts)
    experts = {}
    for key, p in parts.items():
        missing = [k for k in ("gate", "up", "down") if k not in p]
        if missing:
            layer, e = key
            raise CheckpointError(
                f"missing tensor model.layers.{layer}.mlp.experts.{e}.{missing[0]}_proj.weight "
                f"(expert {e} of layer {layer} has only {sorted(p)})"
            )
        experts[key] = ExpertSpec(p["gate"], p["up"], p["down"])
    return experts


def _split_fused(layer: int, kind: str, info: TensorInfo, parts: dict) -> None:
    """gate_up_proj [E, 2I, H] -> per expert gate rows [0, I) and up rows [I, 2I); down_proj [E, H, I]."""
    num_experts = info.shape[0]
    for e in range(num_experts):
        one = info.row_slice(e, 1)  # [1, rows, cols]
        one = TensorInfo(one.file, one.offset, one.nbytes, one.dtype, one.shape[1:])
        slot = parts.setdefault((layer, e), {})
        if kind == "down_proj":
            slot["down"] = one
        else:
            half = one.shape[0] // 2
            slot["gate"], slot["up"] = one.row_slice(0, half), one.row_slice(half, half)
