"""One engine run in its own process: `python -m bench.peers.worker '<RunSpec as JSON>'`.

Prints the EngineRun as JSON on its last line of stdout. The parent starts it (inside a cgroup when a memory limit
applies) so each engine's memory, reads and crashes are its own.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from bench.peers.runners import RUNNERS, RunSpec, process_io


def main() -> None:
    spec = RunSpec(**json.loads(sys.argv[1]))
    run = RUNNERS[spec.engine](spec)
    run.proc_read_bytes, run.peak_rss_bytes = process_io()
    print(json.dumps(asdict(run)), flush=True)


if __name__ == "__main__":
    main()
