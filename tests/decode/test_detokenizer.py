"""Incremental detokenization gives the text of decoding all ids at once, at every step, for a bounded amount of
decoding per token; stop strings and streaming behave as with a whole decode per token.

Three real tokenizers: the shipped model's byte-level BPE, a byte-level BPE trained here on text full of multi-byte
characters (its tokens split them), and a Llama/Mixtral-style BPE with SentencePiece spaces and byte-fallback tokens.
"""

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tiermoe import LLM, SamplingParams
from tiermoe.decode.detokenizer import INCOMPLETE, Detokenizer
from tiermoe.decode.kv_cache import KVCache
from tiermoe.engine.request import Request
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.tokenizer import load_tokenizer

CORPUS = ("naïve café — 日本語のテキスト、絵文字 🎉🙂 Ελληνικά русский текст ñandú façade Zürich 東京 €100; "
          "the quick brown fox jumps over the lazy dog. ROMEO: But, soft! what light through yonder window breaks?")
SPECIAL = ["<unk>", "<s>", "</s>"]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2/Qwen-style: every byte is a symbol, merges learnt on CORPUS split multi-byte characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS] * 3, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def byte_fallback_bpe() -> PreTrainedTokenizerFast:
    """Llama/Mixtral-style: "▁" for spaces, the first one dropped when decoding; characters outside the vocabulary
    as <0xNN> byte tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator([CORPUS.replace("日本語", "")] * 3,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


TOKENIZERS = {"shipped": lambda: load_tokenizer(DEFAULT_MODEL, "qwen2_moe"), "byte_level": byte_level_bpe,
              "byte_fallback": byte_fallback_bpe}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: make() for name, make in TOKENIZERS.items()}


def id_lists(tok, any_ids: bool) -> st.SearchStrategy[list[int]]:
    """Runs of CORPUS's ids cut anywhere (so characters split across tokens, and broken), mixed with any ids of the
    vocabulary, special ones included, when `any_ids`."""
    text_ids = tok.encode(CORPUS, add_special_tokens=False)
    run = st.integers(0, len(text_ids) - 1).flatmap(lambda i: st.just(text_ids[i:i + 6]))
    chunk = st.one_of(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=4), run) if any_ids else run
    return st.lists(chunk, max_size=12).map(lambda chunks: [i for c in chunks for i in c])


# Byte fallback with any ids: "<0x20>" then a stray "<0x97>" turns a settled space into U+FFFD for good, unseen by
# the window check (the window alone strips that space); `finish` decodes all ids once for such runs.
CASES = [("shipped", True), ("byte_level", True), ("byte_fallback", False)]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("name, any_ids", CASES, ids=[c[0] for c in CASES])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_incremental_text_is_the_whole_decode_at_every_step(tokenizers, name, any_ids, skip_special_tokens, data):
    tok = tokenizers[name]
    ids = data.draw(id_lists(tok, any_ids))
    detok = Detokenizer(tok, skip_special_tokens)
    wholes = [tok.decode(ids[:n], skip_special_tokens=skip_special_tokens) for n in range(len(ids) + 1)]
    settled = []
    for n in range(1, len(ids) + 1):
        text = detok.update(ids[:n])
        if text != wholes[n]:  # only while an unfinished character garbles its byte run
            assert name == "byte_fallback" and text == detok.settled + INCOMPLETE and wholes[n].endswith(INCOMPLETE)
        assert not detok.pending or detok.pending.endswith(INCOMPLETE)
        settled.append(detok.settled)
    assert detok.finish(ids) == wholes[-1]
    if name != "byte_fallback":  # settled text never changes (byte fallback: see the Detokenizer's NOTE)
        assert all(later.startswith(s) for n, s in enumerate(settled, 1) for later in wholes[n:])


class CountingTokenizer:
    """The real tokenizer, counting the ids each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def decode(self, ids, **kwargs):
        self.calls.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_work_per_token_does_not_grow_with_the_output(tokenizers, name):
    tok = tokenizers[name]
    ids = tok.encode(" ".join([CORPUS] * 12), add_special_tokens=False)  # 700-2000 tokens, multi-byte characters
    counting = CountingTokenizer(tok)
    detok = Detokenizer(counting)
    per_token = []
    for n in range(1, len(ids) + 1):
        counting.calls.clear()
        detok.update(ids[:n])
        per_token.append(sum(counting.calls))
    assert detok.text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 600 and max(per_token) <= 24  # two short windows; decoding it all would be n ids per token
    assert max(per_token[-200:]) <= max(per_token[:200])


def feed(tok, ids, stop) -> tuple[Request, list[str]]:
    """A request fed `ids` one by one as the decoders feed it, and the text it would stream after each."""
    seq = Request("r", None, [1], SamplingParams(max_tokens=len(ids), stop=stop), KVCache(1), 10**6, frozenset())
    streamed = []
    for token in ids:
        seq.append(token, tok)
        streamed.append(seq.stable_text())
        if seq.finished:
            break
    return seq, streamed


def whole_decode_stop(tok, ids, stop) -> tuple[int, str, str]:
    """Tokens kept, text and finish reason when the whole output is decoded and searched after every token."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            return n, text[:min(hits)[0]], "stop"
    return len(ids), text, "length"


@pytest.mark.parametrize("name, any_ids", CASES, ids=[c[0] for c in CASES])
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_stop_strings_end_the_request_where_a_whole_decode_would(tokenizers, name, any_ids, data):
    tok = tokenizers[name]
    ids = data.draw(id_lists(tok, any_ids).filter(bool))
    full = tok.decode(ids, skip_special_tokens=True)
    stop = data.draw(st.lists(st.one_of(st.sampled_from(CORPUS.split()), st.text(min_size=1, max_size=3),
                                        st.integers(0, max(0, len(full) - 1)).map(lambda i: full[i:i + 3])),
                              min_size=1, max_size=3).filter(lambda s: all(s)))
    assume(name != "byte_fallback" or not any(INCOMPLETE in s for s in stop))  # garbled runs differ meanwhile
    seq, _ = feed(tok, ids, stop)
    assert (len(seq.output_ids), seq.text, seq.finish_reason) == whole_decode_stop(tok, ids, stop)


def test_streamed_text_holds_back_incomplete_characters_and_stop_prefixes(tokenizers):
    tok = tokenizers["byte_level"]
    ids = tok.encode("café 🎉 東京 the end", add_special_tokens=False)
    assert any(tok.decode(ids[:n]).endswith(INCOMPLETE) for n in range(len(ids)))  # characters split over tokens
    seq, streamed = feed(tok, ids, ["the end"])
    assert seq.finish_reason == "stop" and seq.text == "café 🎉 東京 "
    assert all(INCOMPLETE not in s and seq.text.startswith(s) for s in streamed)
    assert "café 🎉 東京" in streamed  # shown once complete, while " the" might still begin the stop string


def test_llm_stream_text_grows_to_the_final_decode():
    llm = LLM(DEFAULT_MODEL)
    chunks = list(llm.stream("ROMEO:", SamplingParams(temperature=0, max_tokens=24)))
    final = chunks[-1].outputs[0]
    assert final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    assert all(final.text.startswith(c.outputs[0].text) for c in chunks)
