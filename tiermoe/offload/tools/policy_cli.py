"""`policy` commands: `policy train` fits the learned eviction policy on routing traces and checks it on held-out ones.

The main CLI registers these with `add_parser(subparsers)` and runs `args.func(args)` (an exit code); standalone:
`python -m tiermoe.offload.tools.policy_cli train --trace FILE --out W.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from tiermoe.cli_flags import run_standalone
from tiermoe.offload.policies.learned import DEFAULT_FEATURES, FEATURES, LearnedConfig, LearnedWeights
from tiermoe.offload.tools.learned_train import TrainConfig, split_sequences, train
from tiermoe.sim.cache_sim import Capacity, simulate
from tiermoe.sim.trace import Trace

EVAL_POLICIES = ("lru", "lfu", "learned", "belady")
_DEFAULTS = TrainConfig()
# The policy's settings (LearnedConfig fields besides the features), each a flag of `policy train`.
_SETTINGS = {"window": "requests of a layer over which `frequency` counts uses",
             "horizon": "next-use distances are clamped to this many requests of the layer (the target's scale)",
             "reuse_horizon": "`reuse` predicts a use within this many requests",
             "reuse_history": "...from the experts of this many latest requests",
             "reuse_lr": "AdaGrad step of the `reuse` predictor",
             "hidden": "width of the MLP's two hidden layers"}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train the learned eviction policy on routing traces",
                            description="Mine features and Belady next-use distances from routing traces, fit the "
                                        "per-layer MLPs, and evaluate on the held-out sequences.")
    p.add_argument("--trace", action="append", required=True, type=Path, help="trace .npz (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="weights file to write (.safetensors; a .json beside it)")
    p.add_argument("--split", type=float, default=0.5,
                   help="share of each trace's sequences (a seeded random choice) to train on; the rest is held out "
                        "for evaluation; 1 trains on everything (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the row sampling and the MLP init")
    p.add_argument("--features", type=_csv, default=list(DEFAULT_FEATURES),
                   help=f"MLP inputs among {', '.join(FEATURES)} (default: {','.join(DEFAULT_FEATURES)})")
    for name, text in _SETTINGS.items():
        default = getattr(_DEFAULTS.policy, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"{text} (default: %(default)s)")
    p.add_argument("--per-layer", action="store_true",
                   help="also fit one MLP per MoE layer, used on models with the trained layer count (default: the "
                        "pooled MLP serves every layer)")
    p.add_argument("--rows-per-layer", type=int, default=_DEFAULTS.rows_per_layer,
                   help="training rows mined per layer and trace (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=_DEFAULTS.epochs, help="MLP epochs (default: %(default)s)")
    p.add_argument("--capacity", type=_csv, default=["25%", "50%"], help="held-out capacities (default: 25%%,50%%)")
    p.set_defaults(func=run_train)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `policy` (with its `train` command) on the main CLI's subparsers; returns the `policy` parser."""
    policy = subparsers.add_parser("policy", help="train learned cache policies")
    _add_train_command(policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND"))
    return policy


def run_train(args: argparse.Namespace) -> int:
    """Runs `policy train` for parsed arguments; returns the exit code."""
    try:
        policy = LearnedConfig(features=tuple(args.features), **{name: getattr(args, name) for name in _SETTINGS})
        config = TrainConfig(policy, per_layer=args.per_layer, rows_per_layer=args.rows_per_layer, epochs=args.epochs,
                             seed=args.seed)
        capacities = [Capacity.parse(c) for c in args.capacity]
        traces = [Trace.load(p) for p in args.trace]
        splits = [split_sequences(t, args.split, args.seed) for t in traces]
    except (OSError, ValueError) as e:
        print(f"tiermoe: error: {e}", file=sys.stderr)
        return 2
    parts = [first for first, _, _ in splits if first.num_sequences]
    if not parts:
        print("tiermoe: error: the split leaves no sequence to train on", file=sys.stderr)
        return 2
    weights = train(parts, config, log=lambda m: print(m, file=sys.stderr))
    weights.info["traces"] = [t.name for t, (first, _, _) in zip(traces, splits, strict=True) if first.num_sequences]
    weights.info["split"] = {"fraction": args.split, "seed": args.seed,
                             "train_sequences": {t.name: chosen for t, (_, _, chosen) in zip(traces, splits,
                                                                                            strict=True)}}
    heldout = [evaluate(rest, weights, capacities, name=t.name)
               for t, (_, rest, _) in zip(traces, splits, strict=True) if rest.num_sequences]
    weights.info["heldout"] = heldout
    weights.info["command"] = command_line(args)
    path = weights.save(args.out)
    path.with_suffix(".json").write_text(json.dumps(weights.info, indent=1) + "\n")
    print(f"wrote {path} ({weights.num_params} parameters) and {path.with_suffix('.json')}")
    for h in heldout:
        print(format_heldout(h))
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The `policy train` command that makes these weights, every setting spelled out; traces by file name, the
    output as given when relative (no machine paths in the record)."""
    words = ["tiermoe", "policy", "train"]
    for path in args.trace:
        words += ["--trace", path.name]
    words += ["--split", str(args.split), "--seed", str(args.seed), "--features", ",".join(args.features)]
    words += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in _SETTINGS]
    words += ["--per-layer"] if args.per_layer else []
    words += ["--rows-per-layer", str(args.rows_per_layer), "--epochs", str(args.epochs),
              "--out", str(args.out) if not args.out.is_absolute() else args.out.name]
    return shlex.join(words)


def evaluate(trace: Trace, weights: LearnedWeights, capacities: Sequence[Capacity],
             policies: Sequence[str] = EVAL_POLICIES, name: str | None = None) -> dict:
    """Mean hit rates of `policies` on `trace` (the learned one with `weights`) and the share of the LRU-to-Belady
    gap the learned policy closes, per capacity. Decode tokens count; prefill tokens, if any, warm the cache first."""
    result = simulate(trace, policies, capacities, policy_args={"learned": {"weights": weights}},
                      warmup_prefill=True)
    out = {"trace": name or trace.name or trace.meta.get("model", "?"), "sequences": trace.num_sequences,
           "tokens": result.tokens, "capacities": {}}
    for cap in capacities:
        rates = {p: result.run(p, cap.label).mean for p in policies}
        out["capacities"][cap.label] = {"hit_rate": rates, "gap_closed": gap_closed(rates)}
    return out


def gap_closed(rates: dict[str, float], policy: str = "learned") -> float | None:
    """(policy - LRU) / (Belady - LRU); None when the gap is too small to divide by."""
    gap = rates["belady"] - rates["lru"]
    return (rates[policy] - rates["lru"]) / gap if gap > 1e-9 else None


def format_heldout(h: dict) -> str:
    lines = [f"held out: {h['trace']} ({h['sequences']} sequences, {h['tokens']} decode tokens)"]
    for label, c in h["capacities"].items():
        rates = " ".join(f"{p} {r:.4f}" for p, r in c["hit_rate"].items())
        gap = "n/a" if c["gap_closed"] is None else f"{100 * c['gap_closed']:.1f}%"
        lines.append(f"  {label:>4}: {rates}; gap closed {gap}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m tiermoe.offload.tools.policy_cli train ...`."""
    return run_standalone("tiermoe policy", "learned cache policies", "policy_command", _add_train_command, argv)


if __name__ == "__main__":
    sys.exit(main())
