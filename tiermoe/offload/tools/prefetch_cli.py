"""`prefetch` commands: `prefetch train` fits the affinity prefetcher's table on routing traces.

Each trace's sequences are split (seeded) into training and held-out ones; the training ones are split again into
fit and validation ones. The settings (top-p, smoothing, combine) are those whose table, fitted on the fit part,
predicts the validation part best (affinity_fit.choose); the table is then refitted on all the training
sequences with them, and its precision and recall are measured on the held-out sequences, which no choice looked
at. The main CLI registers the command with `add_parser(subparsers)`; standalone:
`python -m tiermoe.offload.tools.prefetch_cli train --trace FILE --out TABLE.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tiermoe.cli_flags import run_standalone

if TYPE_CHECKING:  # torch loads only when the command runs (`tiermoe --version` stays fast)
    from tiermoe.offload.prefetch import AffinityTable
    from tiermoe.sim.trace import Trace


def fit_affinity(traces: Sequence[Trace], split: float = 0.5, validation: float = 0.25, seed: int = 0,
                 top_p: int | None = None, smoothing: float | None = None, combine: str | None = None,
                 min_prob: float | None = None) -> tuple[AffinityTable, dict]:
    """The affinity table of `traces` (one shape) and its report: the settings chosen on validation, every candidate
    tried, and the held-out precision and recall. Training sequences per trace: a seeded `split` share (the same
    choice as `tiermoe policy train` makes with that split and seed); validation: a `validation` share of those."""
    from tiermoe.offload.prefetch import AffinityTable
    from tiermoe.offload.tools.affinity_fit import choose, count, quality
    from tiermoe.offload.tools.learned_train import split_sequences

    shapes = {(t.num_layers, t.num_experts, t.top_k) for t in traces}
    if len(shapes) != 1:
        raise ValueError(f"the traces have different shapes (layers, experts, top-k): {sorted(shapes)}")
    splits = [split_sequences(t, split, seed) for t in traces]
    train = [first for first, _, _ in splits if first.num_sequences]
    heldout = [rest for _, rest, _ in splits if rest.num_sequences]
    if not train:
        raise ValueError("the split leaves no sequence to train on")
    parts = [split_sequences(t, 1 - validation, seed + 1) for t in train]
    fit, check = [a for a, _, _ in parts if a.num_sequences], [b for _, b, _ in parts if b.num_sequences]
    if not fit or not check:
        raise ValueError("too few training sequences to hold some out for validation: need 2 or more")
    settings, tried = choose(sum(map(count, fit[1:]), count(fit[0])), check, top_p, smoothing, combine, min_prob)
    counts = sum(map(count, train[1:]), count(train[0]))
    table = AffinityTable(counts.probs(settings["smoothing"]), settings["top_p"], settings["combine"],
                          settings["min_prob"])
    info = {"traces": [t.name for t in traces], "shape": dict(zip(("layers", "experts", "top_k"), shapes.pop(),
                                                                    strict=True)),
            "split": {"fraction": split, "validation": validation, "seed": seed,
                      "train_sequences": {t.name: c for t, (_, _, c) in zip(traces, splits, strict=True)}},
            "settings": settings,
            "validation": tried,
            "heldout": quality(table, heldout) if heldout else None}
    return replace(table, info=info), info


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="fit the affinity prefetcher's table on routing traces",
                            description="Count which experts consecutive MoE layers pick together in routing traces, "
                                        "choose top-p and smoothing on validation sequences, and report precision "
                                        "and recall of the next-layer prediction on held-out ones.")
    p.add_argument("--trace", action="append", required=True, type=Path, help="trace .npz (repeatable, one shape)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="model folder: write the table where `--prefetch affinity` looks "
                                                  "(beside the model, else the user's cache)")
    where.add_argument("--out", type=Path, help="table file to write (.safetensors; a .json report beside it)")
    p.add_argument("--split", type=float, default=0.5,
                   help="share of each trace's sequences (a seeded random choice) to fit on; the rest is held out "
                        "(default: %(default)s)")
    p.add_argument("--validation", type=float, default=0.25,
                   help="share of the training sequences that chooses the settings (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits (default: %(default)s)")
    p.add_argument("--top-p", type=int, default=None, help="experts predicted per token at most (default: chosen)")
    p.add_argument("--smoothing", type=float, default=None, help="pseudo-counts towards an expert's frequency "
                                                                 "(default: chosen)")
    p.add_argument("--combine", choices=["mean", "max"], default=None,  # prefetch.COMBINE (which imports torch)
                   help="how a token's experts' rows combine (default: chosen)")
    p.add_argument("--min-prob", type=float, default=None, help="least score of an expert read ahead "
                                                                "(default: chosen)")
    p.set_defaults(func=run_train)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `prefetch` (with its `train` command) on the main CLI's subparsers; returns the `prefetch` parser."""
    prefetch = subparsers.add_parser("prefetch", help="fit prefetchers on routing traces")
    _add_train_command(prefetch.add_subparsers(dest="prefetch_command", required=True, metavar="COMMAND"))
    return prefetch


def run_train(args: argparse.Namespace) -> int:
    """Runs `prefetch train` for parsed arguments; returns the exit code."""
    from tiermoe.offload.prefetch import AFFINITY_FILE, calibration_path
    from tiermoe.sim.trace import Trace

    try:
        if not 0 < args.validation < 1:
            raise ValueError(f"--validation must be in (0, 1), got {args.validation}")
        if args.top_p is not None and args.top_p < 1 or args.smoothing is not None and args.smoothing < 0:
            raise ValueError("--top-p must be >= 1 and --smoothing >= 0")
        if args.min_prob is not None and not 0 <= args.min_prob <= 1:
            raise ValueError(f"--min-prob must be in [0, 1], got {args.min_prob}")
        traces = [Trace.load(p) for p in args.trace]
        table, info = fit_affinity(traces, args.split, args.validation, args.seed, args.top_p, args.smoothing,
                                   args.combine, args.min_prob)
    except (OSError, ValueError) as e:
        print(f"tiermoe: error: {e}", file=sys.stderr)
        return 2
    info["command"] = command_line(args)
    path = table.save(args.out or calibration_path(args.model, AFFINITY_FILE, writing=True))
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {path} and {path.with_suffix('.json')}")
    print(format_report(info))
    return 0


def format_report(info: dict) -> str:
    s = info["settings"]
    lines = [f"settings (chosen on validation routing): top-p {s['top_p']}, min-prob {s['min_prob']}, smoothing "
             f"{s['smoothing']}, combine {s['combine']}"]
    h = info["heldout"]
    if h is not None:
        lines.append(f"held out ({h['tokens']} layer pairs): precision {h['precision']:.3f} recall {h['recall']:.3f}; "
                     f"within a token {h['within_token']['precision']:.3f} / {h['within_token']['recall']:.3f}, "
                     f"next token's first layer {h['next_token']['precision']:.3f} / "
                     f"{h['next_token']['recall']:.3f}")
    return "\n".join(lines)


def command_line(args: argparse.Namespace) -> str:
    """The command that makes this table, traces by file name, the output as given when relative."""
    words = ["tiermoe", "prefetch", "train"]
    for path in args.trace:
        words += ["--trace", path.name]
    out = args.out or args.model
    words += ["--out" if args.out else "--model", str(out) if not out.is_absolute() else out.name]
    words += ["--split", str(args.split), "--validation", str(args.validation), "--seed", str(args.seed)]
    for name in ("top_p", "smoothing", "combine", "min_prob"):
        if getattr(args, name) is not None:
            words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return shlex.join(words)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m tiermoe.offload.tools.prefetch_cli train ...`."""
    return run_standalone("tiermoe prefetch", "prefetchers", "prefetch_command", _add_train_command, argv)


if __name__ == "__main__":
    sys.exit(main())
