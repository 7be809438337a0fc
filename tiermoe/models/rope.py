"""Rotary position embeddings of every type transformers implements for the supported families: default, linear,
dynamic (NTK), yarn (incl. DeepSeek's mscale / mscale_all_dim), llama3 and longrope.

The formulas follow transformers 5.23's `modeling_rope_utils.py` (and the papers it cites), including its float32 /
float64 arithmetic, so the tables are bit-identical. Loading never imports transformers.

config.json spells rope settings two ways: hub configs write `rope_theta` plus `rope_scaling` ({"type": ...} or
{"rope_type": ...}); transformers 5 writes `rope_parameters` with `rope_theta` inside. Both are read here.

dynamic and longrope depend on the sequence length at run time. transformers recomputes them per forward pass with
seq_len = max(position) + 1 of the whole batch; here that is done per sequence, which is what transformers does for
one request generated alone, and keeps a request's tokens independent of what it is batched with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tiermoe.errors import ConfigError
from tiermoe.models.layers import ForwardBatch

# The config.json keys this module reads; a family lists them among its honoured fields.
ROPE_CONFIG_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")

# Keys each rope type accepts inside rope_scaling / rope_parameters (transformers' _validate_*_rope_parameters).
_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
ROPE_TYPE_KEYS: dict[str, set[str]] = {
    "default": _COMMON,
    "linear": _COMMON | {"factor"},
    "dynamic": _COMMON | {"factor"},
    "yarn": _COMMON | {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"},
    "llama3": _COMMON | {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "longrope": _COMMON | {"short_factor", "long_factor", "factor", "attention_factor",
                           "original_max_position_embeddings"},
}
_REQUIRED = {"linear": {"factor"}, "dynamic": {"factor"}, "yarn": {"factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor"}, "longrope": {"short_factor", "long_factor"}}


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings as one dict (transformers' standardised form): rope_type, rope_theta and the type's keys."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings",
                          config.get("original_max_position_embeddings", config.get("max_position_embeddings")))
    return params


@dataclass(frozen=True)
class RopeSpec:
    """What the tables depend on: the standardised parameters, the rotated width and the model's context length."""

    params: dict[str, Any]
    dim: int  # rotated features per head (head_dim x partial_rotary_factor)
    max_position_embeddings: int
    rope_type: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "rope_type", self.params["rope_type"])

    @classmethod
    def from_config(cls, config: dict[str, Any], dim: int, max_position_embeddings: int) -> RopeSpec:
        """Parse and check config.json's rope settings; unknown types and keys are refused by name."""
        params = rope_parameters(config)
        kind = params["rope_type"]
        if kind not in ROPE_TYPE_KEYS:
            raise ConfigError(f"rope_type {kind!r} is not supported; supported: {', '.join(ROPE_TYPE_KEYS)}")
        unknown = sorted(set(params) - ROPE_TYPE_KEYS[kind])
        if unknown:
            raise ConfigError(f"rope_scaling/rope_parameters field(s) {unknown} are not understood for "
                              f"rope_type {kind!r}")
        missing = sorted(_REQUIRED.get(kind, set()) - set(params))
        if missing:
            raise ConfigError(f"rope_type {kind!r} needs rope_scaling field(s) {missing}")
        return cls(params, dim, max_position_embeddings)

    def inv_freq(self, seq_len: int | torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(inverse frequencies [dim / 2] fp32, attention factor applied to cos and sin) for a sequence length."""
        with torch.device("cpu"):  # models are built under torch.device("meta"); these tables are not weights
            return _INIT[self.rope_type](self, seq_len)

    @property
    def dynamic(self) -> bool:
        """Whether the tables depend on the sequence length at run time."""
        return self.rope_type in ("dynamic", "longrope")


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim  # [dim / 2]


def _default(s: RopeSpec, seq_len=None) -> tuple[torch.Tensor, float]:
    return 1.0 / (s.params["rope_theta"] ** _exponents(s.dim)), 1.0


def _linear(s: RopeSpec, seq_len=None) -> tuple[torch.Tensor, float]:
    inv_freq, _ = _default(s)
    return inv_freq / s.params["factor"], 1.0


def _dynamic(s: RopeSpec, seq_len=None) -> tuple[torch.Tensor, float]:
    """NTK-aware: past max_position_embeddings the base grows with the sequence (in fp32 once seq_len is a tensor)."""
    base, factor, dim, limit = s.params["rope_theta"], s.params["factor"], s.dim, s.max_position_embeddings
    if seq_len is None:
        seq_len = limit
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(seq_len, torch.tensor(limit, dtype=seq_len.dtype))
    else:
        seq_len = max(seq_len, limit)
    base = base * ((factor * seq_len / limit) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim)), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 when not scaled)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(s: RopeSpec, seq_len=None) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, a linear ramp in between."""
    p, dim = s.params, s.dim
    base, factor, original = p["rope_theta"], p["factor"], p["original_max_position_embeddings"]
    attention = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention is None:
        if mscale and mscale_all_dim:  # DeepSeek: the ratio; the rest goes into the softmax scale
            attention = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention = yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dim / 2]
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


def _llama3(s: RopeSpec, seq_len=None) -> tuple[torch.Tensor, float]:
    """Llama 3.1: divide long wavelengths by factor, keep short ones, smooth in between."""
    p = s.params
    inv_freq, _ = _default(s)
    factor, low, high, original = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                                   p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _longrope(s: RopeSpec, seq_len=None) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-frequency factors, the long set once the sequence passes the original context."""
    p = s.params
    original = p["original_max_position_embeddings"]
    factor, attention = p.get("factor"), p.get("attention_factor")
    if factor is None:
        factor = s.max_position_embeddings / original
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = p["long_factor"] if seq_len and seq_len > original else p["short_factor"]
    if len(factors) != s.dim // 2:
        raise ConfigError(f"longrope factors have {len(factors)} entries, the rotary dimension needs {s.dim // 2}")
    ext = torch.tensor(factors, dtype=torch.float32)
    return 1.0 / (ext * p["rope_theta"] ** _exponents(s.dim)), attention


_INIT = {"default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3,
         "longrope": _longrope}


class Rope:
    """cos/sin tables for a forward pass; sequence-length-dependent types are resolved per sequence."""

    def __init__(self, spec: RopeSpec):
        self.spec = spec
        inv_freq, self.scaling = spec.inv_freq()
        self.inv_freq = inv_freq.float()  # [dim / 2]
        self._long: torch.Tensor | None = None  # longrope's long factors, computed when first needed

    def inv_freq_for(self, seq_len: int) -> torch.Tensor:
        """The frequencies transformers uses for a forward pass whose last position is seq_len - 1."""
        s = self.spec
        if s.rope_type == "dynamic" and seq_len > s.max_position_embeddings:
            return s.inv_freq(torch.tensor(seq_len))[0]
        if s.rope_type == "longrope" and seq_len > s.params["original_max_position_embeddings"]:
            if self._long is None:
                self._long = s.inv_freq(s.params["original_max_position_embeddings"] + 1)[0]
            return self._long
        return self.inv_freq

    def cos_sin(self, batch: ForwardBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, dim] for every row of the batch."""
        if not self.spec.dynamic:
            return self._cos_sin(batch.positions, self.inv_freq, dtype)
        cos = torch.empty(batch.positions.shape[0], self.spec.dim, dtype=dtype, device=batch.positions.device)
        sin = torch.empty_like(cos)
        for s in batch.seqs:
            rows = slice(s.start, s.start + s.length)
            positions = batch.positions[rows]
            inv_freq = self.inv_freq_for(int(positions.max()) + 1)
            cos[rows], sin[rows] = self._cos_sin(positions, inv_freq, dtype)
        return cos, sin

    def _cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        freqs = positions[:, None].float() * inv_freq.to(positions.device)  # [T, dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, dim]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def make_rope(config: dict[str, Any], dim: int, max_position_embeddings: int) -> Rope:
    """The rotary embedding config.json describes, over `dim` rotated features per head."""
    return Rope(RopeSpec.from_config(config, dim, max_position_embeddings))


def softmax_scale_factor(config: dict[str, Any]) -> float:
    """DeepSeek's correction of the softmax scale under scaled rope: yarn_mscale(factor, mscale_all_dim) squared."""
    p = rope_parameters(config)
    if p["rope_type"] == "default" or not p.get("mscale_all_dim"):
        return 1.0
    m = yarn_mscale(p["factor"], p["mscale_all_dim"])
    return m * m
