"""`sim` commands: `sim cache` replays a routing trace through cache policies and reports hit rates.

The main CLI registers these with `add_parser(subparsers)` and runs `args.func(args)` (an exit code); until then,
`python -m tiermoe.sim.cli cache --trace FILE ...` runs them standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tiermoe.cli_flags import run_standalone
from tiermoe.offload.policies import POLICIES
from tiermoe.offload.tiers.fetch_order import fetch_order
from tiermoe.sim.cache_sim import CacheSimResult, Capacity, simulate
from tiermoe.sim.trace import Trace


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_cache_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("cache", help="hit rates of cache policies replayed on a routing trace",
                            description="Replay a routing trace through per-layer expert caches and report hit rates.")
    p.add_argument("--trace", required=True, type=Path, help="trace .npz (its .json sidecar is read beside it)")
    p.add_argument("--capacity", default="25%,50%", type=_csv,
                   help="comma-separated cache sizes per layer: 25%% / 0.25 (share of experts) or 16 (experts); "
                        "shares round half up (default: %(default)s)")
    p.add_argument("--policy", default="lru,lfu,belady", type=_csv,
                   help=f"comma-separated policies among {', '.join(POLICIES)} (default: %(default)s)")
    p.add_argument("--include-prefill", action="store_true", help="replay prompt tokens too (default: decode only)")
    p.add_argument("--warmup-prefill", nargs="?", const="tokens", choices=["tokens", "batched"], default=None,
                   help="replay each request's prompt first, warming the cache, but count hits on decode tokens "
                        "only: one request per prompt token (tokens, the default), or as the engine computes a "
                        "prompt, one forward pass asking for its experts by their latest token (batched)")
    p.add_argument("--learned-weights", type=Path, default=None, metavar="FILE.safetensors",
                   help="weights of the 'learned' policy (default: the shipped ones; see `tiermoe policy train`)")
    p.add_argument("--layout", choices=["per-layer", "global"], default="per-layer",
                   help="per-layer: a cache of CAPACITY items per layer (default); global: the live store's "
                        "layout, one cache of CAPACITY x layers experts for all layers under one budget")
    p.add_argument("--json", action="store_true", help="print only the result as JSON on stdout")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw mean hit rate vs capacity per policy")
    p.set_defaults(func=run_cache)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `sim` (with its `cache` and `run` commands) and `profile` on the main CLI's subparsers; returns the
    `sim` parser."""
    sim = subparsers.add_parser("sim", help="trace-driven simulation of offload policies")
    commands = sim.add_subparsers(dest="sim_command", required=True, metavar="COMMAND")
    _add_cache_command(commands)
    _add_run_command(commands)
    _add_profile_command(subparsers)
    return sim


def _add_run_command(commands: argparse._SubParsersAction) -> None:
    from tiermoe.sim.strategies import STRATEGIES

    p = commands.add_parser("run", help="simulate the engine on a hardware profile: tokens/s per strategy",
                            description="Event-level simulation of decode or prefill on a hardware profile, the "
                                        "engine's cache, placement and prefetch objects deciding (one byte budget "
                                        "across layers, as the live store keeps it).")
    p.add_argument("--trace", required=True, type=Path, help="routing trace .npz")
    p.add_argument("--model-shape", required=True,
                   help="config.json (or its folder) or a preset: olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b, "
                        "gpt-oss-120b")
    p.add_argument("--dtype", default=None, help="weights' dtype (default: the config's; presets bf16)")
    p.add_argument("--hardware", required=True, help="a preset (tiermoe/sim/hardware) or a profile file")
    p.add_argument("--gpu-memory", default=None, help="GPU memory the engine may use, e.g. 8GiB; 0: no GPU "
                                                      "(default: the profile's)")
    p.add_argument("--ram", default=None, help="RAM the engine may use (default: the profile's)")
    p.add_argument("--expert-cache", default=None,
                   help="RAM bytes for experts, as the engine's expert_cache (e.g. 2GiB or 25%% of all expert "
                        "bytes); default: --ram less the dense weights and 2 GiB")
    p.add_argument("--strategy", default="tiermoe", type=_csv,
                   help=f"comma-separated strategies among {', '.join(STRATEGIES)} (default: %(default)s)")
    p.add_argument("--cache-policy", default="lru", help="the RAM tier's policy (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    p.add_argument("--prefetch", choices=["off", "oracle"], default="off",
                   help="oracle: the trace's next-layer top-1 experts (an upper bound on a router-based predictor)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores of the profile)")
    p.add_argument("--n-cpu-moe", type=int, default=None, help="llamacpp: layers whose experts run on the CPU")
    p.add_argument("--tau", type=int, default=8, help="tide: refresh interval in steps (default: %(default)s)")
    p.add_argument("--sequences", type=int, default=None, help="replay the first N sequences only")
    p.add_argument("--max-tokens", type=int, default=None, help="decode rows per sequence")
    p.add_argument("--warmup", type=int, default=0, help="batches replayed untimed first (default: %(default)s)")
    p.add_argument("--preload", action="store_true",
                   help="start with warm tiers: the most used experts of the first tenth of the sequences fill RAM "
                        "and the GPU tier (default: cold, as a fresh engine)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="bar chart of tokens/s per strategy")
    p.set_defaults(func=run_machine)


def run_machine(args: argparse.Namespace) -> int:
    """Runs `sim run`; returns the exit code."""
    from tiermoe.sim.hardware import load_hardware
    from tiermoe.sim.machine_sim import simulate
    from tiermoe.sim.model_shape import load_shape
    from tiermoe.sim.sim_config import SimConfig

    try:
        shape = load_shape(args.model_shape)
        shape = shape.with_dtype(args.dtype) if args.dtype else shape
        hw = load_hardware(args.hardware)
        trace = Trace.load(args.trace)
        results = []
        for strategy in args.strategy:
            cfg = SimConfig(strategy, _bytes(args.gpu_memory, 0), _bytes(args.ram, 0),
                            _bytes(args.expert_cache, shape.total_expert_bytes), args.cache_policy, args.batch,
                            args.phase, args.prefetch, args.threads, args.n_cpu_moe, args.tau,
                            sequences=args.sequences, max_tokens=args.max_tokens, warmup=args.warmup,
                            preload=args.preload)
            results.append(simulate(trace, shape, hw, cfg))
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"tiermoe sim run: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print(format_machine_runs(results))
    if args.plot:
        plot_machine_runs(results, args.plot)
    return 0


def _bytes(text: str | None, total: int) -> int | None:
    from tiermoe.offload.tiers.budget import parse_budget

    return None if text is None else parse_budget(text, total)


def format_machine_runs(results) -> str:
    r0 = results[0]
    lines = [f"{r0.model} on {r0.hardware}, {r0.phase}, batch {r0.batch}: GPU experts "
             f"{r0.gpu_expert_budget / 2**30:.2f} GiB, RAM experts {r0.ram_expert_budget / 2**30:.2f} GiB",
             f"{'strategy':<10} {'tok/s':>9} {'RAM hit':>8} {'GiB read':>9} {'gpu/copy/cpu experts':>22}"]
    for r in results:
        n = r.hits + r.misses
        where = "/".join(str(r.placements.get(k, 0)) for k in ("gpu", "copy", "cpu"))
        lines.append(f"{r.strategy:<10} {r.tokens_per_s:>9.2f} {r.hits / n if n else 1:>8.3f} "
                     f"{r.bytes_read / 2**30:>9.2f} {where:>22}")
    lines += [f"note: {n}" for r in results for n in r.notes]
    return "\n".join(lines)


def plot_machine_runs(results, path: Path) -> None:
    """Writes a PNG bar chart of simulated tokens/s per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.bar([r.strategy for r in results], [r.tokens_per_s for r in results])
    r0 = results[0]
    ax.set_ylabel(f"simulated {r0.phase} tokens/s")
    ax.set_title(f"{r0.model} on {r0.hardware}, batch {r0.batch}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _add_profile_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="measure this machine into a hardware profile for `tiermoe sim run`",
                              description="Measure CPU GEMV/GEMM rates per thread count, DRAM, the disk (direct "
                                          "reads), the GPU if any, and the engine's own costs (its kernels, "
                                          "attention, fixed costs per expert, layer, forward and read), and write "
                                          "a hardware profile (JSON). Takes one to two minutes.")
    p.add_argument("--out", type=Path, default=None, help="profile file to write (default: print it)")
    p.add_argument("--disk-dir", type=Path, default=None, help="a folder on the disk to measure (default: the "
                                                               "temporary folder; use the one holding your models)")
    p.add_argument("--name", default="this-machine", help="the profile's name (default: %(default)s)")
    p.add_argument("--read-size", default="1MiB", help="size of the random reads (one expert; default %(default)s)")
    p.set_defaults(func=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from tiermoe.offload.tiers.budget import parse_budget
    from tiermoe.sim.hardware import measure_this_machine

    hw = measure_this_machine(args.disk_dir, parse_budget(args.read_size, 0), args.name)
    if args.out is None:
        print(json.dumps(hw.to_dict(), indent=1))
    else:
        hw.save(args.out)
        print(f"wrote {args.out}")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    """Runs `sim cache` for parsed arguments; returns the exit code."""
    try:
        if args.plot and not args.plot.parent.is_dir():
            raise ValueError(f"--plot {args.plot}: folder {args.plot.parent} does not exist")
        trace = Trace.load(args.trace)
        capacities = [Capacity.parse(c) for c in args.capacity]
        policy_args = {"learned": {"weights": args.learned_weights}} if args.learned_weights else None
        result = simulate(trace, args.policy, capacities, include_prefill=args.include_prefill,
                          policy_args=policy_args, warmup_prefill=args.warmup_prefill is not None,
                          prefill_order=fetch_order if args.warmup_prefill == "batched" else None,
                          layout=args.layout)
    except (OSError, ValueError) as e:
        print(f"tiermoe: error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        plot_hit_rates(result, args.plot)
        print(f"tiermoe: wrote {args.plot}", file=sys.stderr)
    print(result.to_json() if args.json else format_result(result))
    return 0


def _tokens(result: CacheSimResult) -> str:
    if result.include_prefill:
        return "all"
    if result.prefill_order is not None:
        return "decode (warmed by batched prefill)"
    return "decode (prefill-warmed)" if result.warmup_prefill else "decode"


def format_result(result: CacheSimResult) -> str:
    """A summary table (policy x capacity) followed by a per-layer table (layers x runs)."""
    tokens = _tokens(result)
    layout = "one cache per layer" if result.layout == "per-layer" else "one cache for all layers (live store)"
    lines = [f"trace {result.trace} ({layout}): {result.tokens} {tokens} tokens, {result.num_layers} layers x "
             f"{result.num_experts} experts, top-{result.top_k}", "",
             f"{'policy':<8} {'capacity':>8} {'experts':>7} {'mean hit':>8} {'min layer':>9} {'max layer':>9}"]
    prefetching = any(r.prefetches for r in result.runs)
    if prefetching:  # loads = misses + prefetches: a prefetching policy's hits are not free
        lines[-1] += f" {'prefetch':>8} {'loads/req':>9}"
    for r in result.runs:
        lines.append(f"{r.policy:<8} {r.capacity:>8} {r.capacity_items:>7} {r.mean:>8.4f} "
                     f"{min(r.per_layer):>9.4f} {max(r.per_layer):>9.4f}")
        if prefetching:
            loads = (r.requests - r.hits + r.prefetches) / max(r.requests, 1)
            lines[-1] += f" {r.prefetches:>8} {loads:>9.4f}"
    heads = [f"{r.policy}@{r.capacity}" for r in result.runs]
    width = max(8, *map(len, heads))
    lines += ["", "per-layer hit rate", f"{'layer':<5} " + " ".join(f"{h:>{width}}" for h in heads)]
    for layer in range(result.num_layers):
        lines.append(f"{layer:<5} " + " ".join(f"{r.per_layer[layer]:>{width}.4f}" for r in result.runs))
    return "\n".join(lines)


def plot_hit_rates(result: CacheSimResult, path: Path) -> None:
    """Writes a PNG of mean hit rate against cache capacity (experts per layer), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")  # no display here; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for policy in dict.fromkeys(r.policy for r in result.runs):
        runs = sorted((r for r in result.runs if r.policy == policy), key=lambda r: r.capacity_items)
        x = [100 * r.capacity_items / result.num_experts for r in runs]
        ax.plot(x, [r.mean for r in runs], marker="o", label=policy)
    ax.set_xlabel(f"cache capacity (% of the {result.num_experts} experts per layer)")
    ax.set_ylabel("mean hit rate over layers")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    tokens = _tokens(result)
    ax.set_title(f"{result.trace}\n{result.tokens} {tokens} tokens, top-{result.top_k}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m tiermoe.sim.cli cache ...`."""
    return run_standalone("tiermoe sim", "trace-driven simulation of offload policies", "sim_command",
                          _add_cache_command, argv)


if __name__ == "__main__":
    sys.exit(main())
