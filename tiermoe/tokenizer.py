"""A model folder's tokenizer, loaded with the `tokenizers` library alone when that gives transformers' result.

Importing transformers costs about 90 MiB of RAM and a second of start-up, which matters under a memory limit. For
the generic fast tokenizer (tokenizer_config.json's `tokenizer_class` TokenizersBackend / PreTrainedTokenizerFast, or
none), transformers' encode and decode are tokenizer.json's pipeline plus a few settings, which `FastTokenizer`
applies as transformers 5.23 does: `clean_up_tokenization_spaces` (not for BPE models), no padding or truncation;
`add_bos_token` / `add_eos_token` are dropped when tokenizer.json exists (its post-processor decides). A folder with
any other setting or tokenizer class (family classes rebuild the pipeline in code), or special tokens
tokenizer.json lacks, gets transformers' AutoTokenizer. transformers is imported only to render a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERIC_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "cls_token", "sep_token")
# tokenizer_config.json keys that either do not change encode/decode or are applied by FastTokenizer.
HONOURED = {"tokenizer_class", "backend", "is_local", "local_files_only", "model_max_length", "padding_side",
            "truncation_side", "model_input_names", "name_or_path", "chat_template", "add_bos_token", "add_eos_token",
            "clean_up_tokenization_spaces", "added_tokens_decoder", "additional_special_tokens",
            "extra_special_tokens", *SPECIAL_NAMES}
# transformers' clean_up_tokenization: spaces before punctuation and contractions removed.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def load_tokenizer(folder: str | Path, model_type: str):
    """The folder's tokenizer (FastTokenizer, or transformers' when needed), or None without tokenizer files."""
    folder = Path(folder)
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    config = _read_json(folder / "tokenizer_config.json")
    if (folder / "tokenizer.json").exists() and _generic(config):
        tok = FastTokenizer(folder, config, model_type)
        if tok.complete:
            return tok
    return transformers_tokenizer(folder, model_type)


def transformers_tokenizer(folder: Path, model_type: str):
    """transformers' AutoTokenizer for the folder."""
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # A family transformers has no class for (llada2_moe, llada): an empty config keeps it from parsing config.json
    # only to warn about the unknown model type; the tokenizer files name the tokenizer.
    kwargs = {} if model_type in CONFIG_MAPPING else {"config": PretrainedConfig()}
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def _generic(config: dict) -> bool:
    return config.get("tokenizer_class") in GENERIC_CLASSES and not set(config) - HONOURED


class FastTokenizer:
    """encode / decode / special-token ids of a generic fast tokenizer, through `tokenizers` directly."""

    def __init__(self, folder: Path, config: dict[str, Any], model_type: str):
        from tokenizers import Tokenizer

        self.folder, self.model_type = folder, model_type
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.special = {name: _content(config.get(name)) for name in SPECIAL_NAMES}
        self.complete = self._special_tokens_present(config)
        # transformers skips the clean-up for BPE models (it would strip real spaces before punctuation)
        bpe = type(self.tokenizer.model).__name__ == "BPE"
        self.clean_up = bool(config.get("clean_up_tokenization_spaces")) and not bpe
        self.chat_template = config.get("chat_template")
        if self.chat_template is None and (folder / "chat_template.jinja").exists():
            self.chat_template = (folder / "chat_template.jinja").read_text()
        self._full = None  # transformers' tokenizer, made for chat templates only

    def _special_tokens_present(self, config: dict) -> bool:
        """Whether every special token the config names is a special added token of tokenizer.json (transformers
        would add the missing ones)."""
        added = {t.content: t.special for t in self.tokenizer.get_added_tokens_decoder().values()}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        named = [t for t in self.special.values() if t is not None] + [_content(t) for t in extra]
        decoder = config.get("added_tokens_decoder") or {}
        declared = [(v["content"], v.get("special", False)) for v in decoder.values()]
        return all(added.get(t) for t in named) and all(added.get(c) == s for c, s in declared)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up:
            for old, new in CLEAN_UP:
                text = text.replace(old, new)
        return text

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, name: str) -> int | None:
        token = self.special[name]
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def mask_token_id(self) -> int | None:
        return self._id("mask_token")

    def apply_chat_template(self, messages: list[dict], **kwargs) -> Any:
        """Rendered by transformers (imported now, once), exactly as its tokenizer renders it."""
        if self._full is None:
            self._full = transformers_tokenizer(self.folder, self.model_type)
        return self._full.apply_chat_template(messages, **kwargs)


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token["content"] if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
