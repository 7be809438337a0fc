"""The diffusion model the TIDE benchmarks run: a given folder, the trained default under tiermoe/assets/, or
(--random) a random llada2_moe shaped like LLaDA2.0-mini, scaled down (the routing structure -- 256 experts,
top-8 in 4 of 8 groups, one shared expert, a dense first layer -- kept; widths, depth and vocabulary shrunk).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tiny_diffusion_models import LLADA2_CONFIG, llada2_tensors
from tiermoe.models.registry import DEFAULT_MODEL

ASSETS = DEFAULT_MODEL.parent
CALIBRATION = ASSETS / "calibration.txt"


@dataclass(frozen=True, slots=True)
class Scale:
    """LLaDA2.0-mini is hidden 2048, 20 layers, 16/4 heads of 128, 256 experts of 512, vocab 157,184."""

    hidden: int = 512
    layers: int = 6  # the first dense, as in LLaDA2.0
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    experts: int = 256
    top_k: int = 8
    groups: int = 8
    topk_groups: int = 4
    moe_intermediate: int = 128
    intermediate: int = 1280
    vocab: int = 8192


def config_of(s: Scale) -> dict:
    return {**LLADA2_CONFIG, "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.intermediate,
            "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
            "head_dim": s.head_dim, "num_experts": s.experts, "num_experts_per_tok": s.top_k, "n_group": s.groups,
            "topk_group": s.topk_groups, "moe_intermediate_size": s.moe_intermediate, "first_k_dense_replace": 1,
            "max_position_embeddings": 4096, "mask_token_id": s.vocab - 1, "pad_token_id": s.vocab - 2}


def init(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Fan-in scaled weights, so activations keep their size through the layers and predictions are not all
    certain (a random model whose every guess clears the 0.95 threshold would finish each block in one step)."""
    if name.endswith("expert_bias"):
        return torch.rand(shape, generator=g) * 0.2 - 0.1
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    gain = 4.0 if name == "lm_head.weight" else 1.0
    return torch.randn(shape, generator=g) * gain / math.sqrt(shape[-1])


def build_random(folder: Path, scale: Scale = Scale(), seed: int = 0) -> Path:
    """Write config.json + model.safetensors of the scaled-down random model into `folder` (reused if present)."""
    config = config_of(scale)
    if (folder / "config.json").exists() and json.loads((folder / "config.json").read_text()) == config:
        return folder
    g = torch.Generator().manual_seed(seed)
    state = {name: init(name, shape, g) for name, shape in llada2_tensors(config).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def default_trained() -> Path | None:
    """A llada2_moe checkpoint shipped under tiermoe/assets/, if any."""
    for config in sorted(ASSETS.glob("*/config.json")):
        if json.loads(config.read_text()).get("model_type") == "llada2_moe":
            return config.parent
    return None


@dataclass(frozen=True, slots=True)
class BenchModel:
    """The folder a bench runs, a sentence saying what it is, and the suffix of its result files."""

    folder: Path
    what: str
    suffix: str = ""


def resolve(args, scale: Scale) -> BenchModel:
    """--model, else the random model with --random or when no trained one ships, else the shipped default."""
    if args.model is not None:
        return BenchModel(args.model, f"model {args.model}")
    trained = None if args.random else default_trained()
    if trained is not None:
        return BenchModel(trained, f"trained default model {trained.name}")
    folder = build_random(args.workdir / "llada2-mini-scaled", scale)
    what = (f"a RANDOM llada2_moe shaped like LLaDA2.0-mini scaled down ({json.dumps(asdict(scale))}); routing "
            "statistics of random weights are not those of a trained model")
    return BenchModel(folder, what, "_random-mini")


def prompts(llm, n: int, length: int, seed: int = 0, skip: int = 0) -> list[list[int]]:
    """`n` prompts of `length` tokens: slices of the calibration text from its token `skip` on with a tokenizer,
    else seeded random ids."""
    if llm.tokenizer is not None and CALIBRATION.exists():
        ids = llm.tokenizer.encode(CALIBRATION.read_text())[skip:]
        if len(ids) < n * length:
            raise ValueError(f"{CALIBRATION} has too few tokens after {skip} for {n} prompts of {length}")
        return [ids[i * length:(i + 1) * length] for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, llm.model.shape.vocab_size - 2, (n, length), generator=g).tolist()


def add_model_args(ap) -> None:
    """The flags every diffusion bench shares: which model, and the random model's scale when none is given."""
    ap.add_argument("--model", type=Path, default=None, help="default: the shipped diffusion model")
    ap.add_argument("--random", action="store_true",
                    help="run the random LLaDA2.0-mini-shaped model (results get the suffix _random-mini)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_tide"))
    ap.add_argument("--experts", type=int, default=Scale().experts, help="random model only: routed experts per layer")
    ap.add_argument("--layers", type=int, default=Scale().layers, help="random model only")

