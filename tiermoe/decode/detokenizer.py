"""Incremental detokenization: the text of a growing list of token ids, decoding a few ids per new token.

Decoding the whole output after every token costs O(n) per token, O(n^2) in all. Instead two offsets are kept:
`read`, the ids whose text is settled (it ends on a complete character), and `prefix` <= `read`, ids decoded again
as context so that the new ids render as they do inside the whole text (a SentencePiece decoder drops the leading
space of a text's first token; with context in front, the new token is not first). Each update decodes
ids[prefix:read] and ids[prefix:], and the new text is what the second adds to the first. While that ends in U+FFFD
(an incomplete UTF-8 character: a byte-level token may hold part of one) nothing settles, so the window grows
until the character is complete; then prefix moves to the old read offset and read to the end.

NOTE: this needs the new ids to leave the text of the earlier ones as it was, which byte-level decoders (GPT-2,
Qwen, Llama 3) and SentencePiece's leading space do. Byte-fallback decoders (Llama 2, Mixtral) render a run of
<0xNN> tokens together, so an unfinished character turns the finished ones of its run into U+FFFD too
("<0xE6><0x97><0xA5>" is one character, one more <0xE6> makes all four U+FFFD): then the settled text is kept and
the new text shown as one U+FFFD until the character is complete. A run that stays invalid (a stray <0xAC> after
"<0x41>") is caught when the window no longer starts with its context: the whole output is decoded once and the
offsets start over. Degenerate runs can slip past that check, so `finish` decodes all ids once: the final text is
exactly the whole decode for any tokenizer, at the cost of one decode per request instead of one per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INCOMPLETE = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


@dataclass(slots=True)
class Detokenizer:
    """The text of one request's output ids, updated as they are appended: `text` is decoding them all at once (but
    for byte-fallback runs, see the NOTE)."""

    tokenizer: Any  # a Hugging Face tokenizer: decode(ids, skip_special_tokens=...)
    skip_special_tokens: bool = True
    settled: str = ""  # the text of ids[:read]; later ids do not change it (see the NOTE for byte fallback)
    pending: str = ""  # what ids[read:] add: it ends in an incomplete character (or is empty)
    prefix: int = 0  # ids[prefix:read] are decoded again as context for the new ones
    read: int = 0
    unchanged: int = 0  # text[:unchanged] is as it was before the last update

    @property
    def text(self) -> str:
        return self.settled + self.pending

    def update(self, ids: list[int]) -> str:
        """The text of `ids`, the whole output so far (extending the previous call's ids)."""
        self.unchanged = len(self.settled)
        context = self._decode(ids[self.prefix:self.read])
        window = self._decode(ids[self.prefix:])
        if not window.startswith(context):
            if window.endswith(INCOMPLETE):  # an unfinished character garbles its byte run: wait for the rest
                self.pending = INCOMPLETE
                return self.text
            self.settled, self.prefix, self.read, self.unchanged = "", 0, 0, 0  # earlier text rewritten for good
            context, window = "", self._decode(ids)
        new = window[len(context):]
        if new and not new.endswith(INCOMPLETE):
            self.settled += new
            self.pending = ""
            self.prefix, self.read = self.read, len(ids)
        else:
            self.pending = new
        return self.text

    def finish(self, ids: list[int]) -> str:
        """The final text of `ids`: decoding them all at once (see the NOTE). No update may follow."""
        self.settled, self.pending = self._decode(ids), ""
        return self.settled

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
