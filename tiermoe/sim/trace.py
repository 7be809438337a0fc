"""Expert-routing traces in the shared layout (see ../shared/traces/README.md), and a recorder that writes them.

A trace is one `.npz` (no pickles) plus a `.json` sidecar of the same stem:

    experts     int16   [T, L, K]  expert ids per token and MoE layer, router rank order; -1 = layer not computed
    weights     float16 [T, L, K]  router weight of each picked expert
    seq_starts  int64   [S]        first row of each sequence (request)
    is_prefill  bool    [T]        prompt token routed in prefill (True) or generated token (False)
    positions   int32   [T]        position of the token in its request's context
    token_ids   int32   [T]        id of the routed token (optional: only where it was recorded)

Any other array is kept as an extra: `seq_*` arrays of length S are per sequence (e.g. `seq_domain`), arrays of
length T per row. T = tokens, L = MoE layers, K = top-k, S = sequences.

Diffusion traces (`tiermoe generate --record-trace` on a diffusion model) extend the layout: a denoising step's
forward recomputes a whole block, so a position appears once per step, and rows are grouped by forward pass:

    forward            int32 [T]  index of the forward pass the row went through (rows of one forward run together;
                                  a batched forward holds several sequences' rows)
    denoise_block      int32 [T]  the request's generated block at that forward (0 = its first)
    denoise_step       int32 [T]  the denoising step within that block (0 = its first)
    seq_output_tokens  int32 [S]  tokens each request output (what tokens/s counts)

`token_ids` then holds the canvas token at the time (the mask id, `mask_token_id` in the sidecar, where still
masked) and `is_prefill` marks prompt positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_CORE = ("experts", "weights", "seq_starts", "is_prefill", "positions", "token_ids")
_DTYPES = {"experts": np.int16, "weights": np.float16, "seq_starts": np.int64, "is_prefill": np.bool_,
           "positions": np.int32, "token_ids": np.int32}


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(npz, json) paths for a trace given as either file or as the stem."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


@dataclass
class Trace:
    """Routing decisions of a model over a sequence of tokens, in the order they went through the model."""

    experts: np.ndarray  # [T, L, K] int16, -1 where the layer was not computed for that token
    weights: np.ndarray  # [T, L, K] float16
    seq_starts: np.ndarray  # [S] int64, first row of each sequence
    is_prefill: np.ndarray  # [T] bool
    positions: np.ndarray  # [T] int32
    token_ids: np.ndarray | None = None  # [T] int32, None when the source did not record tokens
    meta: dict[str, Any] = field(default_factory=dict)  # the JSON sidecar (model, num_experts, source, ...)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # other arrays of the npz, kept as they are

    def __post_init__(self) -> None:
        for name in _CORE:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=_DTYPES[name]))
        self._check_shapes()

    def _check_shapes(self) -> None:
        if self.experts.ndim != 3:
            raise ValueError(f"experts must be [T, L, K], got shape {self.experts.shape}")
        if self.weights.shape != self.experts.shape:
            raise ValueError(f"weights shape {self.weights.shape} differs from experts shape {self.experts.shape}")
        t = self.num_tokens
        for name in ("is_prefill", "positions", "token_ids"):
            value = getattr(self, name)
            if value is not None and value.shape != (t,):
                raise ValueError(f"{name} must have shape ({t},), got {value.shape}")
        starts = self.seq_starts
        if starts.ndim != 1 or (t and (len(starts) == 0 or starts[0] != 0)) or np.any(np.diff(starts) <= 0) \
                or (len(starts) and starts[-1] >= max(t, 1)):
            raise ValueError(f"seq_starts must be strictly increasing row indices starting at 0, got {starts[:8]}...")

    # --- shape facts ---------------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def num_sequences(self) -> int:
        return len(self.seq_starts)

    @property
    def num_experts(self) -> int:
        """Experts per layer: from the sidecar when it says so, else the largest id seen plus one."""
        if "num_experts" in self.meta:
            return int(self.meta["num_experts"])
        return int(self.experts.max(initial=-1)) + 1

    @property
    def name(self) -> str:
        """The file stem the trace was loaded from or saved to (empty for an unsaved trace)."""
        return str(self.meta.get("file", "")).removesuffix(".npz")

    # --- rows and sequences ----------------------------------------------------------------------------------------

    def decode_rows(self) -> np.ndarray:
        """Row indices of generated (decode) tokens, in order."""
        return np.flatnonzero(~self.is_prefill)

    def sequence_bounds(self) -> list[tuple[int, int]]:
        """(first row, end row) of each sequence."""
        ends = [*self.seq_starts[1:].tolist(), self.num_tokens]
        return list(zip(self.seq_starts.tolist(), ends, strict=True))

    def layer_requests(self, layer: int, rows: np.ndarray | None = None) -> list[list[int]]:
        """Expert ids requested at `layer` by each of `rows` (all rows if None), rank order, -1 entries skipped."""
        ids = self.experts[:, layer, :] if rows is None else self.experts[rows, layer, :]
        out = ids.tolist()
        if (ids < 0).any():
            out = [[e for e in row if e >= 0] for row in out]
        return out

    def select_sequences(self, indices: Sequence[int]) -> Trace:
        """A new trace holding the sequences `indices` (in the given order)."""
        bounds = self.sequence_bounds()
        chosen = [bounds[i] for i in indices]
        rows = np.concatenate([np.arange(a, b) for a, b in chosen]) if chosen else np.zeros(0, dtype=np.int64)
        lengths = [b - a for a, b in chosen]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if chosen else np.zeros(0, dtype=np.int64)
        extras = {k: self._select_extra(k, v, rows, list(indices)) for k, v in self.extras.items()}
        meta = {k: v for k, v in self.meta.items() if k not in ("file", "arrays", "num_tokens", "num_sequences")}
        return Trace(self.experts[rows], self.weights[rows], starts, self.is_prefill[rows], self.positions[rows],
                     None if self.token_ids is None else self.token_ids[rows], meta, extras)

    def _select_extra(self, name: str, value: np.ndarray, rows: np.ndarray, seqs: list[int]) -> np.ndarray:
        if name.startswith("seq_") and value.ndim and len(value) == self.num_sequences:
            return value[seqs]
        if value.ndim and len(value) == self.num_tokens:
            return value[rows]
        return value

    def split_by_sequences(self, at: float | Sequence[int]) -> tuple[Trace, Trace]:
        """Splits whole sequences in two traces, e.g. for training and evaluating a learned policy.

        `at` is either a fraction (the first `round(at * S)` sequences go to the first part, the rest to the second)
        or the indices of the sequences of the first part (the others, in order, form the second).
        """
        s = self.num_sequences
        if isinstance(at, float | int) and not isinstance(at, bool):
            if not 0 <= at <= 1:
                raise ValueError(f"split fraction must be in [0, 1], got {at}")
            first = list(range(int(np.floor(at * s + 0.5))))
        else:
            first = [int(i) for i in at]
            bad = [i for i in first if not 0 <= i < s]
            if bad:
                raise ValueError(f"sequence indices {bad[:5]} out of range for {s} sequences")
        chosen = set(first)
        return self.select_sequences(first), self.select_sequences([i for i in range(s) if i not in chosen])

    # --- files -----------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Reads `<stem>.npz` and, when present, `<stem>.json`; `path` may name either file or the stem."""
        npz_path, json_path = _paths(path)
        if not npz_path.is_file():
            raise ValueError(f"no routing trace at {npz_path} (a trace is FILE.npz with FILE.json beside it, as "
                             "`tiermoe generate --record-trace FILE` writes)")
        with open(npz_path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # .npz files are zip archives
                raise ValueError(f"{npz_path} is not a routing trace: not an .npz archive")
        meta = json.loads(json_path.read_text()) if json_path.exists() else {}
        meta.setdefault("file", npz_path.name)
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        missing = [k for k in _CORE if k != "token_ids" and k not in arrays]
        if missing:
            raise ValueError(f"{npz_path} is not a routing trace: missing arrays {missing}")
        core = {k: arrays.pop(k) for k in _CORE if k in arrays}
        return cls(**core, meta=meta, extras=arrays)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
        """Writes `<stem>.npz` and `<stem>.json`; returns both paths.

        The sidecar is this trace's `meta` updated with `meta`, then with the facts of the arrays (num_layers,
        top_k, num_tokens, num_sequences, file, arrays); `num_experts` is kept if given, else inferred.
        """
        npz_path, json_path = _paths(path)
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k) for k in _CORE if getattr(self, k) is not None}
        arrays.update(self.extras)
        np.savez_compressed(npz_path, **arrays)
        sidecar = {**self.meta, **(meta or {})}
        sidecar.setdefault("num_experts", self.num_experts)
        sidecar.update(num_layers=self.num_layers, top_k=self.top_k, num_tokens=self.num_tokens,
                       num_prefill_tokens=int(self.is_prefill.sum()),
                       num_decode_tokens=int((~self.is_prefill).sum()), num_sequences=self.num_sequences,
                       file=npz_path.name,
                       arrays={k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in arrays.items()})
        json_path.write_text(json.dumps(sidecar, indent=1) + "\n")
        self.meta = sidecar
        return npz_path, json_path


def _as_numpy(x: Any, dtype: type) -> np.ndarray:
    """Converts a numpy array, list or torch tensor (any device and dtype, bf16 included) without importing torch."""
    if hasattr(x, "detach"):  # torch.Tensor: bf16 has no numpy dtype, so widen first
        x = x.detach().to("cpu").float() if x.is_floating_point() else x.detach().to("cpu")
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


class TraceRecorder:
    """Collects routing decisions token by token while the engine runs, then writes them as a `Trace`.

    Usage: `begin_sequence()` at each new request, `record(...)` once per token that went through the model (prompt
    tokens included, flagged `is_prefill`), `save(path, meta)` at the end. A layer that was not computed for a token
    is recorded as a row of -1.
    """

    def __init__(self) -> None:
        self._experts: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._is_prefill: list[bool] = []
        self._positions: list[int] = []
        self._token_ids: list[int] = []
        self._seq_starts: list[int] = []
        self._extras: dict[str, list[int]] = {}  # per-row integer extras (e.g. a diffusion row's forward)

    def __len__(self) -> int:
        return len(self._experts)

    def begin_sequence(self) -> None:
        """Called when a new request starts: the next recorded token is the first row of a new sequence."""
        if not self._seq_starts or self._seq_starts[-1] != len(self):
            self._seq_starts.append(len(self))

    def record(self, experts: Any, weights: Any, is_prefill: bool, position: int, token_id: int | None = None,
               extras: dict[str, int] | None = None) -> None:
        """Called once per token: `experts` and `weights` are [L, K] (router rank order), numpy or torch; `extras`
        are per-row integers saved as int32 arrays of that name (every row must give the same names)."""
        e = _as_numpy(experts, np.int16)
        w = _as_numpy(weights, np.float16)
        if e.ndim != 2 or w.shape != e.shape:
            raise ValueError(f"record expects experts and weights of the same [L, K] shape, got {e.shape}, {w.shape}")
        if self._experts and e.shape != self._experts[0].shape:
            raise ValueError(f"token row shape {e.shape} differs from the first row's {self._experts[0].shape}")
        extras = extras or {}
        if self._experts and self._extras.keys() != extras.keys():
            raise ValueError(f"row extras {sorted(extras)} differ from the first row's {sorted(self._extras)}")
        if not self._seq_starts:
            self.begin_sequence()
        self._experts.append(e)
        self._weights.append(w)
        self._is_prefill.append(bool(is_prefill))
        self._positions.append(int(position))
        self._token_ids.append(-1 if token_id is None else int(token_id))
        for name, value in extras.items():
            self._extras.setdefault(name, []).append(int(value))

    def to_trace(self, meta: dict[str, Any] | None = None, extras: dict[str, Any] | None = None) -> Trace:
        """The recorded tokens as a `Trace` (token_ids omitted when no token id was given); `extras` adds arrays
        beside the per-row ones (e.g. per sequence, `seq_*`)."""
        if not self._experts:
            raise ValueError("no token was recorded")
        token_ids = np.array(self._token_ids, np.int32) if any(t >= 0 for t in self._token_ids) else None
        arrays = {k: np.array(v, np.int32) for k, v in self._extras.items()}
        arrays.update({k: np.asarray(v) for k, v in (extras or {}).items()})
        return Trace(np.stack(self._experts), np.stack(self._weights), np.array(self._seq_starts, np.int64),
                     np.array(self._is_prefill, np.bool_), np.array(self._positions, np.int32), token_ids,
                     dict(meta or {}), arrays)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None,
             extras: dict[str, Any] | None = None) -> Trace:
        """Writes the recorded tokens to `<stem>.npz` + `<stem>.json` (meta: model, num_experts, ...); returns them."""
        trace = self.to_trace(meta, extras)
        trace.save(path)
        return trace
