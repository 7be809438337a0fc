"""Shared benchmark plumbing: machine description, medians, JSON + Markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import torch


def machine() -> dict:
    """What the numbers were measured on."""
    mem = None
    if Path("/proc/meminfo").exists():
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1) if mem else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
            "python": platform.python_version()}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(out_dir: Path, name: str, result: dict, table: str) -> None:
    """Write NAME.json and NAME.md into out_dir and echo the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # paths under the user's home are written as ~/...: a result file names no machine's folders
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2).replace(str(Path.home()), "~"))
    m = result["machine"]
    header = f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch {m['torch']}, " \
             f"{m['torch_threads']} threads, GPU: {m['gpu']}.\n\n"
    (out_dir / f"{name}.md").write_text(header + table + "\n")
    print(header + table)
