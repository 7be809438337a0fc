"""The shape of a MoE model as the simulator prices it: bytes and FLOPs of its experts and of everything else.

From a Hugging Face config.json (`ModelShape.from_config`) or a preset named after a public model (`SHAPES`, figures
from each model's published config.json).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from tiermoe.offload.tiers.direct_io import align_up

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """L = MoE layers, E = routed experts per layer, K = top-k, H = hidden, I = expert intermediate size."""

    name: str
    num_layers: int  # MoE layers (dense-MLP layers are folded into `extra_layer_params`)
    num_experts: int
    top_k: int
    hidden: int
    expert_dim: int
    vocab: int
    attn_params: int  # per layer: q, k, v, o projections
    kv_dim: int  # per layer and token: key + value widths (the KV cache read per attended token)
    shared_params: int = 0  # per MoE layer: shared experts, always computed
    extra_layer_params: int = 0  # total: dense-MLP layers (DeepSeek's first layers)
    dtype_bytes: int = 2
    dense_layers: int = 0  # how many layers `extra_layer_params` holds (their fixed costs are a layer's)
    q_dim: int = 0  # query width, heads x head dim (attention's FLOPs per attended key); 0: hidden
    heads: int = 0  # query heads; 0: one per 128 of the query width
    stored: str = "bfloat16"  # the checkpoint's dtype (what `with_dtype` keeps under fp32 compute)
    compute: str = ""  # the engine's compute dtype, when `with_dtype` set it ("": the weights' own)

    @property
    def query_width(self) -> int:
        return self.q_dim or self.hidden

    @property
    def query_heads(self) -> int:
        return self.heads or max(self.query_width // 128, 1)

    @property
    def dtype(self) -> str:
        """The compute dtype the engine's kernels run for these weights (2-byte weights as bfloat16)."""
        return "float32" if self.dtype_bytes == 4 else "bfloat16"

    @property
    def kernel_dtype(self) -> str:
        """Which of a profile's kernel tables prices these products: `dtype`, or "bfloat16-fp32" for 2-byte weights
        under fp32 compute (activations in fp32, each weight widened as it is read: slower than bf16 x bf16 beyond
        one row)."""
        return "bfloat16-fp32" if self.dtype_bytes == 2 and dtype_bytes(self.compute or "bf16") == 4 else self.dtype

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_dim  # gate, up, down

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert holds resident: whole pages, as the stores read them (offload.tiers.expert_reads)."""
        return align_up(self.expert_params * self.dtype_bytes)

    @property
    def expert_flops(self) -> float:
        """FLOPs of one expert per token (a multiply-add per weight)."""
        return 2.0 * self.expert_params

    @property
    def total_expert_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    @property
    def layer_params(self) -> int:
        """Per MoE layer, besides the routed experts: attention, router, shared experts, norms."""
        return self.attn_params + self.hidden * self.num_experts + self.shared_params + 2 * self.hidden

    @property
    def dense_bytes(self) -> int:
        """Every weight that is not a routed expert: layers, dense-MLP layers, embeddings and head (untied)."""
        return (self.num_layers * self.layer_params + self.extra_layer_params + 2 * self.vocab * self.hidden) \
            * self.dtype_bytes

    @property
    def forward_bytes(self) -> int:
        """Bytes a one-row decode forward streams: each layer's weights and top-k experts, and the head."""
        return (self.num_layers * (self.layer_params * self.dtype_bytes + self.top_k * self.expert_bytes)
                + (self.extra_layer_params + self.vocab * self.hidden) * self.dtype_bytes)

    def with_dtype(self, dtype: str) -> ModelShape:
        """The shape as an engine computing in `dtype` holds it: bf16 weights stay bf16 under fp32 compute (the
        kernels widen them as they read, kernels.weight_dtype); any other pair takes the compute dtype's bytes."""
        kept = self.stored in ("bfloat16", "bf16") and dtype_bytes(dtype) == 4
        return replace(self, dtype_bytes=2 if kept else dtype_bytes(dtype), compute=dtype)

    @classmethod
    def from_config(cls, path: Path, name: str | None = None) -> ModelShape:
        """Reads a Hugging Face config.json of a MoE model (mixtral, qwen2/3_moe, olmoe, deepseek_v2/v3, ...)."""
        c = json.loads(Path(path).read_text())
        c = c.get("text_config", c)
        experts = _first(c, "num_experts", "num_local_experts", "n_routed_experts")
        if not experts:
            raise ValueError(f"{path} is not a MoE config: no num_experts / num_local_experts / n_routed_experts")
        hidden, layers = c["hidden_size"], c["num_hidden_layers"]
        inter = _first(c, "moe_intermediate_size") or c["intermediate_size"]
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or hidden // heads
        attn = _attn(hidden, heads, kv_heads, head_dim)
        shared = 3 * hidden * ((_first(c, "n_shared_experts", "num_shared_experts") or 0) * inter
                               + (c.get("shared_expert_intermediate_size") or 0))
        dense = c.get("first_k_dense_replace") or 0
        stored = c.get("torch_dtype") or c.get("dtype") or "bfloat16"
        return cls(name or Path(path).parent.name, layers - dense, experts, c["num_experts_per_tok"], hidden, inter,
                   c["vocab_size"], attn, 2 * kv_heads * head_dim, shared,
                   dense * (attn + 3 * hidden * c["intermediate_size"]),
                   dtype_bytes(stored), dense, heads * head_dim, heads, stored)


def dtype_bytes(dtype: str) -> int:
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[dtype]


def _first(c: dict, *names: str):
    for n in names:
        if c.get(n):
            return c[n]
    return None


def _attn(hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    return hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden


# Published config.json figures (bf16): hidden, MoE layers, experts, top-k, expert intermediate, heads, KV heads,
# head dim, vocab.
SHAPES = {
    "olmoe-1b-7b": ModelShape("olmoe-1b-7b", 16, 64, 8, 2048, 1024, 50304, _attn(2048, 16, 16, 128), 2 * 16 * 128,
                              q_dim=16 * 128, heads=16),
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 48, 128, 8, 2048, 768, 151936, _attn(2048, 32, 4, 128),
                                2 * 4 * 128, q_dim=32 * 128, heads=32),
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 32, 8, 2, 4096, 14336, 32000, _attn(4096, 32, 8, 128), 2 * 8 * 128,
                               q_dim=32 * 128, heads=32),
    "gpt-oss-120b": ModelShape("gpt-oss-120b", 36, 128, 4, 2880, 2880, 201088, _attn(2880, 64, 8, 64), 2 * 8 * 64,
                               q_dim=64 * 64, heads=64),
}


def load_shape(name_or_path: str | Path) -> ModelShape:
    """A preset (`SHAPES`) by name, or a config.json (or the folder holding one)."""
    if str(name_or_path) in SHAPES:
        return SHAPES[str(name_or_path)]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"model shape {name_or_path!r}: not a preset ({', '.join(SHAPES)}) nor a config.json")
    shape = ModelShape.from_config(path)
    stored = _stored_dtype(path.parent)
    return replace(shape, stored=stored, dtype_bytes=dtype_bytes(stored)) if stored else shape


def _stored_dtype(folder: Path) -> str | None:
    """The dtype most of a checkpoint's first weight file is stored in, when the folder holds one: what the engine
    keeps goes by the tensors, and config.json's torch_dtype need not say it (a bf16 config saved in fp32)."""
    from tiermoe.checkpoint import read_header  # imports torch, which the CLI loads only when a command runs

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    sizes: Counter = Counter()
    for info in read_header(files[0]).values():
        sizes[str(info.dtype).removeprefix("torch.")] += info.nbytes
    best = max(sizes, key=sizes.get, default=None)
    return best if best in _DTYPE_BYTES else None
