"""Time to first token of `tiermoe generate` as a user starts it: from launching the command to the first generated
character on its stdout (the prompt echo excluded), on the built-in model, 1 token, greedy.

    python -m bench.start_time [--reps 5] [--baseline DIR] [--drop-caches]

Page cache states: `warm` (the previous run left everything cached) and `cold` (the model folder's files evicted with
posix_fadvise DONTNEED before the run: what a first run after copying or downloading a model sees); with
--drop-caches (root) also `cold, all files` (the whole page cache dropped, torch's libraries included: a first run
after boot). --baseline DIR runs another tiermoe source tree (PYTHONPATH=DIR, same interpreter) in the same
repetitions, interleaved in shuffled order; medians over the repetitions. Also the whole process's wall time (the
command with --max-tokens 1, start to exit). Writes bench/results/start_time.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import machine, markdown_table, median, write
from tiermoe.models.registry import DEFAULT_MODEL
from tiermoe.offload.tiers.direct_io import drop_page_cache

PROMPT = "ROMEO:"


def launch(pythonpath: str | None, kernels_dir: Path) -> tuple[float, float, str]:
    """(seconds to the first generated character, seconds to exit, stdout) of one `tiermoe generate`."""
    env = {**os.environ, "TIERMOE_KERNELS_DIR": str(kernels_dir)}  # each tree its own build: no rebuilds between
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "tiermoe.cli", "generate", "--max-tokens", "1", PROMPT]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    shown = proc.stdout.read(len(PROMPT) + 1)  # the echo, then the first character of the first token
    first = time.perf_counter() - start
    rest = proc.stdout.read()
    proc.wait()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return first, total, (shown + rest).decode()


def evict(state: str) -> None:
    """Put the page cache in `state` before a run."""
    if state == "cold":
        for path in DEFAULT_MODEL.iterdir():
            drop_page_cache(path)
    elif state == "cold, all files":
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.start_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baseline", type=Path, default=None, help="another tiermoe source tree to compare with")
    ap.add_argument("--drop-caches", action="store_true", help="also measure with the whole page cache dropped")
    ap.add_argument("--kernels-dir", type=Path, default=Path(tempfile.gettempdir()) / "tiermoe-start-time-kernels",
                    help="where each tree's compiled kernels are kept (built before timing)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    trees = {"now": None} | ({"before": str(args.baseline.resolve())} if args.baseline else {})
    states = ["warm", "cold"] + (["cold, all files"] if args.drop_caches else [])
    outputs = {}
    for name, path in trees.items():  # first runs build the kernels (once per machine) and fill the page cache
        outputs[name] = launch(path, args.kernels_dir / name)[2]
    runs = {(tree, state): {"first_token_s": [], "exit_s": []} for tree in trees for state in states}
    rng = random.Random(0)
    for _ in range(args.reps):
        order = list(runs)
        rng.shuffle(order)
        for tree, state in order:
            evict(state)
            first, total, _ = launch(trees[tree], args.kernels_dir / tree)
            runs[tree, state]["first_token_s"].append(first)
            runs[tree, state]["exit_s"].append(total)
    rows = [[tree, state, median(r["first_token_s"]), min(r["first_token_s"]), max(r["first_token_s"]),
             median(r["exit_s"])] for (tree, state), r in runs.items()]
    table = markdown_table(["tree", "page cache", "first token s (median)", "min", "max", "process exit s"], rows)
    same = len(set(outputs.values())) == 1
    md = (f"`tiermoe generate --max-tokens 1 {PROMPT!r}` on the built-in model, {args.reps} repetitions, "
          f"interleaved; same output in every tree: {same}.\n\n{table}")
    write(args.out, "start_time", {"machine": machine(), "outputs": outputs, "same_output": same,
                                   "runs": [{"tree": t, "state": s, **r} for (t, s), r in runs.items()],
                                   "args": {"reps": args.reps, "baseline": args.baseline is not None,
                                            "drop_caches": args.drop_caches}}, md)


if __name__ == "__main__":
    main()
