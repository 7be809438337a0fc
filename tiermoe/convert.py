"""`tiermoe convert SRC DST`: rewrite a checkpoint so that every expert is one aligned, contiguous read.

DST holds the non-expert tensors in `model.safetensors` (canonical names), all routed experts in `experts.bin`
(each expert's gate | up | down bytes back to back, starting on a 4 KiB boundary and padded to one), and
`experts.json`, the index. config.json, tokenizer and generation files are copied unchanged. The source dtype is
kept: conversion moves bytes, it never rounds a weight.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from tiermoe.checkpoint import CONVERTED_INDEX, EXPERTS_FILE, CheckpointIndex
from tiermoe.errors import CheckpointError
from tiermoe.models.registry import family, read_config
from tiermoe.progress import progress

ALIGN = 4096
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def convert(src: str | Path, dst: str | Path) -> Path:
    """Write the aligned expert-contiguous copy of `src` into `dst` (created; must not hold a checkpoint)."""
    src, dst = Path(src), Path(dst)
    if (dst / CONVERTED_INDEX).exists() or any(dst.glob("*.safetensors")):
        raise CheckpointError(f"{dst} already holds a checkpoint; choose an empty folder")
    config = read_config(src)
    index = CheckpointIndex(src, family(config["model_type"]).sanitize)
    dst.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    save_file({n: index.load(n).contiguous() for n in index.non_expert_names()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    experts = _write_experts(index, dst / EXPERTS_FILE)
    stat = os.stat(dst / EXPERTS_FILE)
    meta = {"format": "tiermoe-experts", "version": 1, "alignment": ALIGN, "file": EXPERTS_FILE,
            "file_size": stat.st_size, "file_mtime_ns": stat.st_mtime_ns, "experts": experts}
    (dst / CONVERTED_INDEX).write_text(json.dumps(meta))
    return dst


def _write_experts(index: CheckpointIndex, path: Path) -> dict[str, dict]:
    entries = {}
    with open(path, "wb") as f:
        for (layer, e), spec in progress(sorted(index.experts().items()), desc="writing experts", unit="expert"):
            start = f.tell()
            parts = []
            for name, part in zip(("gate", "up", "down"), spec.parts, strict=True):
                parts.append({"name": name, "offset": f.tell() - start, "nbytes": part.nbytes,
                              "dtype": str(part.dtype).removeprefix("torch."), "shape": list(part.shape)})
                f.write(part.read_bytes())
            f.write(b"\0" * (-f.tell() % ALIGN))
            entries[f"{layer}/{e}"] = {"offset": start, "nbytes": spec.nbytes, "parts": parts}
    return entries
