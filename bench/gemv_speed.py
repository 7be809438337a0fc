"""Weight-streaming speed of the decode matrix-vector kernels against torch's F.linear, per weight shape.

    python -m bench.gemv_speed [--threads 2] [--rows 1,8] [--reps 5] [--out bench/results]

Shapes are those one decode token reads in the 0.64B Mixtral-shaped model of bench/peers (hidden 1024, expert inner
2816, 16 query / 8 KV heads of 64, vocab 32000). Each product cycles through copies of its weight spanning 256 MiB,
so weights come from DRAM, not the last-level cache, as in decode. The roofline is torch.sum over 1 GiB. Reported:
GB/s of weight bytes (median of interleaved repetitions).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.report import machine, markdown_table, median, write
from tiermoe import kernels

SHAPES = {"qkv": (2048, 1024), "o_proj": (1024, 1024), "expert gate_up": (5632, 1024), "expert down": (1024, 2816),
          "router": (8, 1024), "lm_head": (32000, 1024)}
WORKING_SET = 256 << 20


def gbps(fn, weights: list[torch.Tensor], x: torch.Tensor, calls: int) -> float:
    """Weight bytes per second of `fn(x, w)` cycling through `weights`."""
    fn(x, weights[0])
    start = time.perf_counter()
    for i in range(calls):
        fn(x, weights[i % len(weights)])
    return weights[0].nbytes * calls / (time.perf_counter() - start) / 1e9


def roofline() -> float:
    big = torch.ones(1 << 28)  # 1 GiB of fp32
    big.sum()
    start = time.perf_counter()
    big.sum()
    return big.nbytes / (time.perf_counter() - start) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8", help="activation rows M, comma-separated")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engines = {"kernel": kernels.linear, "F.linear": F.linear}
    rows, records = [], []
    for dtype in (torch.bfloat16, torch.float32):
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k).to(dtype)
            weights = [w.clone() for _ in range(max(1, WORKING_SET // w.nbytes))]
            calls = max(20, min(400, (2 << 30) // w.nbytes))
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k).to(dtype)
                speeds = {e: [] for e in engines}
                for _ in range(args.reps):  # interleaved
                    for e, fn in engines.items():
                        speeds[e].append(gbps(fn, weights, x, calls))
                rec = {"dtype": str(dtype).removeprefix("torch."), "weight": name, "shape": [n, k], "rows": m,
                       **{e: median(v) for e, v in speeds.items()}, "runs": speeds}
                records.append(rec)
                rows.append([rec["dtype"], name, f"{n}x{k}", m, rec["kernel"], rec["F.linear"],
                             rec["kernel"] / rec["F.linear"]])
                print(rows[-1], flush=True)
    bound = roofline()
    table = markdown_table(["dtype", "weight", "N x K", "rows", "kernel GB/s", "F.linear GB/s", "kernel / F.linear"],
                           rows)
    table += f"\n\nDRAM roofline (torch.sum over 1 GiB, {args.threads} threads): {bound:.1f} GB/s; kernel path: " \
             f"{kernels.backend()}."
    write(args.out, "gemv_speed", {"machine": machine(), "backend": kernels.backend(), "roofline_gbps": bound,
                                   "records": records, "args": vars(args) | {"out": str(args.out)}}, table)


if __name__ == "__main__":
    main()
