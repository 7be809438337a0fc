"""Planning for machines we don't have: simulated tokens/s vs GPU memory on every hardware preset, every strategy.

    python -m bench.hardware_plan [--presets all] [--models olmoe-1b-7b,qwen3-30b-a3b,mixtral-8x7b]
        [--gpu-fractions 0.25,0.5,0.75,1] [--decode-tokens 16] [--prompt-tokens 64] [--out bench/results]

For each preset (tiermoe/sim/hardware) and model shape, `tiermoe sim run`'s simulation at batch 1 and 16, decode and
prefill, at several shares of the GPU's memory (points where the dense weights do not fit are skipped), for every
strategy; RAM is the profile's. Routing: OLMoE-1B-7B replays the shared OLMoE trace (real routing); Qwen3-30B-A3B
the shared Qwen3 trace (real, but one request with top-k forced to 6: batches are made of that request's decode
rows rotated by 8 rows per sequence); Mixtral-8x7B has no public trace here, so it gets uniformly random top-2
routing (seeded), labelled as such. The exact `optimal` strategy runs at batch 1 decode only (its per-step solver
is slow on the larger problems; bench/dali_assignment.py measures its gap to the greedy there). Every tier starts
warm (`preload`: the most used experts of the first tenth of the sequences fill RAM and the GPU tier; static
strategies are placed as they are), then one untimed batch runs before the timed one.

Writes hardware_plan.json, hardware_plan.md (DALI / llama.cpp ratios beside DALI's published 3.97x decode and 7.62x
prefill) and one plot per preset under hardware_plan/.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.offload_speed import SHARED
from bench.report import machine, markdown_table, write
from tiermoe.sim.hardware import load_hardware, presets
from tiermoe.sim.machine_sim import simulate
from tiermoe.sim.model_shape import SHAPES
from tiermoe.sim.sim_config import SimConfig
from tiermoe.sim.strategies import STRATEGIES
from tiermoe.sim.trace import Trace

TRACES = {"olmoe-1b-7b": "olmoe-1b-7b-0924_decode_wikitext-mbpp",
          "qwen3-30b-a3b": "qwen3-30b-a3b-q4km-top6_prefill-decode_bigmoeonedge"}
CASES = [(1, "decode"), (16, "decode"), (1, "prefill"), (16, "prefill")]
DALI_PUBLISHED = {"decode": 3.97, "prefill": 7.62}  # DALI (arXiv 2602.03495) vs llama.cpp


def routing(model: str, batch: int, traces: Path) -> tuple[Trace, str]:
    """A trace with at least 2 x batch sequences for `model` (one warm-up batch, one timed)."""
    shape = SHAPES[model]
    if model in TRACES and (traces / f"{TRACES[model]}.npz").exists():
        trace = Trace.load(traces / f"{TRACES[model]}.npz")
        if trace.num_sequences >= 2 * batch:
            return trace.select_sequences(range(2 * batch)), "real (shared trace)"
        return rotated(trace, 2 * batch), "real, one request rotated per sequence"
    return random_routing(shape, 2 * batch, 200), "synthetic: uniform random top-k (no public trace here)"


def rotated(trace: Trace, n: int, shift: int = 8) -> Trace:
    """`n` sequences from the first: its prompt rows, then its decode rows rotated by `shift` rows per sequence."""
    a, b = trace.sequence_bounds()[0]
    prompt = np.arange(a, b)[trace.is_prefill[a:b]]
    decode = np.arange(a, b)[~trace.is_prefill[a:b]]
    rows = [np.concatenate([prompt, np.roll(decode, -shift * i)]) for i in range(n)]
    idx = np.concatenate(rows)
    starts = np.cumsum([0] + [len(r) for r in rows[:-1]])
    return Trace(trace.experts[idx], trace.weights[idx], starts, trace.is_prefill[idx], trace.positions[idx],
                 meta={**trace.meta, "num_experts": trace.num_experts, "file": trace.name + "-rotated"})


def random_routing(shape, sequences: int, length: int, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    t, layers, k = sequences * length, shape.num_layers, shape.top_k
    experts = np.argsort(rng.random((t, layers, shape.num_experts)), axis=-1)[..., :k].astype(np.int16)
    return Trace(experts, np.full(experts.shape, 1 / k, np.float16), np.arange(0, t, length),
                 np.zeros(t, bool), np.tile(np.arange(length), sequences),
                 meta={"num_experts": shape.num_experts, "file": f"random-{shape.name}"})


def run_point(trace, shape, hw, strategy, gpu, batch, phase, args) -> float | None:
    cfg = SimConfig(strategy, gpu_memory=gpu, batch=batch, phase=phase, max_tokens=args.decode_tokens,
                    prompt_tokens=args.prompt_tokens, warmup=1, preload=True)
    try:
        return simulate(trace, shape, hw, cfg).tokens_per_s
    except ValueError:  # the dense weights do not fit this GPU size
        return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="all")
    ap.add_argument("--models", default="olmoe-1b-7b,qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--gpu-fractions", default="0.25,0.5,0.75,1")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--traces", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    names = presets() if args.presets == "all" else args.presets.split(",")
    fractions = [float(f) for f in args.gpu_fractions.split(",")]
    points = []
    for name in names:
        hw = load_hardware(name)
        for model in args.models.split(","):
            for batch, phase in CASES:
                trace, source = routing(model, batch, args.traces)
                shape = replace(SHAPES[model], top_k=trace.top_k)
                for f in fractions:
                    gpu = int(hw.gpu.memory_gib * f * 2**30)
                    for strategy in STRATEGIES:
                        if strategy == "optimal" and (batch, phase) != (1, "decode"):
                            continue
                        tok_s = run_point(trace, shape, hw, strategy, gpu, batch, phase, args)
                        points.append({"hardware": name, "model": model, "batch": batch, "phase": phase,
                                       "gpu_gib": round(gpu / 2**30, 2), "strategy": strategy, "tok_s": tok_s,
                                       "routing": source})
                print(f"{name} {model} batch {batch} {phase}: done", flush=True)
        plot_preset(points, name, args.out / "hardware_plan" / f"{name}.png")
    table = ratio_table(points)
    write(args.out, "hardware_plan", {"machine": machine(), "points": points}, table)


def ratio_table(points: list[dict]) -> str:
    """DALI / llama.cpp and tiermoe / llama.cpp at half the GPU's memory, beside DALI's published ratios."""
    rows = []
    by = {(p["hardware"], p["model"], p["batch"], p["phase"], p["gpu_gib"], p["strategy"]): p["tok_s"]
          for p in points}
    for (hw, model, batch, phase, gpu, strategy), tok in sorted(by.items()):
        if strategy != "dali" or tok is None:
            continue
        sizes = sorted({k[4] for k in by if k[:4] == (hw, model, batch, phase)})
        if gpu != sizes[len(sizes) // 2]:
            continue
        llama, ours = by.get((hw, model, batch, phase, gpu, "llamacpp")), by.get((hw, model, batch, phase, gpu,
                                                                                  "tiermoe"))
        if not llama:
            continue
        rows.append([hw, model, phase, batch, gpu, tok, llama, ours, tok / llama, ours / llama if ours else None,
                     DALI_PUBLISHED[phase]])
    return markdown_table(["hardware", "model", "phase", "batch", "GPU GiB", "dali tok/s", "llamacpp tok/s",
                           "tiermoe tok/s", "dali / llamacpp", "tiermoe / llamacpp", "DALI published"], rows) + \
        ("\n\nSimulated (tiermoe sim run) on the hardware presets, RAM as each profile says, tiers warm; the middle "
         "GPU size of the sweep (3/4 of the GPU's memory). Routing: OLMoE and Qwen3 from the shared traces (Qwen3: one "
         "request, top-k forced to 6, rotated into batches), Mixtral synthetic (uniform random top-2). Plots per "
         "preset in hardware_plan/.")


def plot_preset(points: list[dict], name: str, path: Path) -> None:
    """One figure per preset: a panel per (model, case), tokens/s vs GPU memory, a line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [p for p in points if p["hardware"] == name]
    models = list(dict.fromkeys(p["model"] for p in mine))
    fig, axes = plt.subplots(len(models), len(CASES), figsize=(4 * len(CASES), 3 * len(models)), dpi=60,
                             squeeze=False)
    for i, model in enumerate(models):
        for j, (batch, phase) in enumerate(CASES):
            ax = axes[i][j]
            for strategy in STRATEGIES:
                xs = [(p["gpu_gib"], p["tok_s"]) for p in mine if (p["model"], p["batch"], p["phase"],
                                                                   p["strategy"]) == (model, batch, phase, strategy)
                      and p["tok_s"] is not None]
                if xs:  # a fixed colour per strategy: panels without `optimal` keep the legend's colours
                    ax.plot(*zip(*xs, strict=True), marker="o", label=strategy,
                            color=f"C{STRATEGIES.index(strategy)}")
            ax.set_title(f"{model}, {phase}, batch {batch}", fontsize=8)
            ax.set_xlabel("GPU memory (GiB)", fontsize=7)
            ax.set_ylabel("tokens/s", fontsize=7)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{name}: simulated tokens/s vs GPU memory", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
