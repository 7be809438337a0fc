"""The peer model: random weights of a published architecture, saved as a Hugging Face folder with a tokenizer.

Nothing is downloaded. The tokenizer is a Llama-style BPE (byte fallback, Metaspace) trained with `tokenizers` on
the text tiermoe ships (tiermoe/assets/calibration.txt), padded with unused tokens to the shape's vocabulary so
llama.cpp's converter writes a vocabulary as long as the embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tiermoe.cli import CALIBRATION_TEXT

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mixtral's tokenizer
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback, as in Llama/Mixtral


@dataclass(frozen=True)
class Shape:
    """A Mixtral-architecture shape (MixtralConfig fields)."""

    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    hidden_size: int
    intermediate_size: int  # each expert's inner dimension
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    def params(self) -> int:
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        head = h // self.num_attention_heads
        attn = 2 * h * h + 2 * h * head * self.num_key_value_heads  # q, o; k, v
        per_layer = attn + e * 3 * h * i + h * e + 2 * h  # attention, experts, router, norms
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * h + h  # embed, lm_head, final norm

    def expert_params(self) -> int:
        return self.num_hidden_layers * self.num_local_experts * 3 * self.hidden_size * self.intermediate_size


SHAPES = {
    # ~0.64B params, 1.29 GB in bf16: Mixtral's layout (8 experts, top-2, 32k vocab) at a width this machine holds
    "mixtral-0.6b": Shape(8, 8, 2, 1024, 2816, 16, 4, 32000),
    # ~0.1B: the same layout, narrower and shallower, for a quicker full run
    "mixtral-0.1b": Shape(4, 8, 2, 512, 1408, 8, 2, 32000),
    # a few MB: smoke runs and tests
    "mixtral-tiny": Shape(2, 4, 2, 64, 128, 4, 2, 512),
}


def build_model(shape: Shape, folder: Path, seed: int = 0) -> Path:
    """Random bf16 weights of `shape` written by transformers into `folder`, with a trained tokenizer.

    Idempotent: a folder holding a finished build (marker file) is returned as is.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    marker = folder / "peers_shape.json"
    if marker.exists() and json.loads(marker.read_text()) == {**asdict(shape), "seed": seed}:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = MixtralConfig(**asdict(shape), max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = 2
    model.save_pretrained(folder)
    del model
    train_tokenizer(shape.vocab_size, folder)
    marker.write_text(json.dumps({**asdict(shape), "seed": seed}))
    return folder


def train_tokenizer(vocab_size: int, folder: Path, text: Path = CALIBRATION_TEXT) -> None:
    """A Llama-style BPE tokenizer of exactly `vocab_size` tokens: trained merges, then unused filler tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + BYTE_TOKENS, show_progress=False)
    tok.train([str(text)], trainer)
    # The text is short: pad with tokens nobody types so the vocabulary is as long as the embedding
    filler = vocab_size - tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<unused{i}>", normalized=False) for i in range(filler)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096}, indent=1))


def prompt_ids(folder: Path, n: int, text: Path = CALIBRATION_TEXT) -> list[int]:
    """The first `n` tokens of the calibration text (BOS first): the one prompt every engine is given as ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text.read_text()[: n * 16]).ids  # plenty of characters for n tokens
    return [1] + ids[: n - 1]


def model_bytes(folder: Path) -> int:
    """Bytes of the safetensors weights."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
