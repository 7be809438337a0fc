"""The byte-level BPE tokenizer the models are trained with, its special tokens and chat template."""

from __future__ import annotations

import torch

from .config import REPO, ModelConfig, RunConfig, TokenizerConfig

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
MASK = "<|mask|>"  # the diffusion model's mask token

# Role-prefixed turns in the same shape as the plays' speeches ("NAME:\nspeech\n\n"), so the model's prior applies.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}:\n{{ message['content'] | trim }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


def train_tokenizer(texts: list[str], cfg: TokenizerConfig, special_tokens: tuple[str, ...]):
    """Train a byte-level BPE on ``texts`` and wrap it as a PreTrainedTokenizerFast.

    BOS marks the start of a whole work in training (before its title), while training windows start anywhere in
    the text; so prompts are encoded without BOS (as GPT-2 does), which is the context they resemble.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK if MASK in special_tokens else None,
        add_bos_token=False,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=ModelConfig.max_position_embeddings,
    )


def encode_works(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: each work as BOS + tokens + EOS, concatenated. Returns int64 [N]."""
    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.bos_token_id)
        # The backend encoder: the wrapper warns about texts longer than model_max_length, which is expected here.
        ids.extend(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def special_ids(tokenizer) -> dict:
    """The token ids a model builder needs."""
    return {
        "vocab_size": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "mask": tokenizer.mask_token_id,
    }


def load_or_train_tokenizer(run: RunConfig, corpus: dict, special: tuple[str, ...]):
    """Tokenizer trained on the training works only, cached in the run folder so a resume reuses it exactly."""
    from transformers import AutoTokenizer

    tok_dir = REPO / run.run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(tok_dir)
    tokenizer = train_tokenizer([corpus["texts"][n] for n in corpus["train_works"]], run.tokenizer, special)
    tokenizer.save_pretrained(tok_dir)
    return AutoTokenizer.from_pretrained(tok_dir)
