"""Start a worker process for one RunSpec, optionally inside a memory cgroup, and collect its EngineRun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

from bench.peers.cgroup import MemoryGroup
from bench.peers.runners import EngineRun, RunSpec, describe

REPO = Path(__file__).resolve().parents[2]  # the folder holding the `bench` package


def run_engine(spec: RunSpec, limit: int | None = None, group_name: str | None = None, timeout: float = 3600,
               env: dict | None = None) -> EngineRun:
    """Run `spec` in a fresh process; with `group_name`, inside a new memory cgroup limited to `limit` bytes.

    A process that fails or is killed gives an EngineRun with no timings, its exit code and the error's tail.
    """
    cmd = [sys.executable, "-m", "bench.peers.worker", json.dumps(asdict(spec))]
    if group_name is None:
        return _collect(spec, *_spawn(cmd, None, timeout, env), None)
    with MemoryGroup(group_name, limit) as group:
        return _collect(spec, *_spawn(cmd, group.join, timeout, env), group)


def _spawn(cmd: list[str], preexec, timeout: float, env: dict | None) -> tuple[subprocess.CompletedProcess, int]:
    """Run to the end; also (polled) the last read_bytes of /proc/PID/io, which survives an OOM kill."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True, preexec_fn=preexec, env=env)
        io, deadline = Path(f"/proc/{proc.pid}/io"), time.monotonic() + timeout
        read_bytes, code = 0, None
        while code is None and time.monotonic() < deadline:
            try:
                read_bytes = int(io.read_text().split("read_bytes: ")[1].split()[0])
            except (OSError, IndexError):
                pass  # exiting
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if code is None:
            proc.kill()
            proc.wait()
        out.seek(0)
        err.seek(0)
        stderr = err.read() if code is not None else f"timed out after {timeout:.0f} s"
        return subprocess.CompletedProcess(cmd, code, out.read(), stderr), read_bytes


def _collect(spec: RunSpec, proc: subprocess.CompletedProcess, read_bytes: int,
             group: MemoryGroup | None) -> EngineRun:
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        data = json.loads(lines[-1])
        run = EngineRun(**{f.name: data[f.name] for f in fields(EngineRun)})
    else:
        run = EngineRun(spec.engine, spec.dtype, describe(spec), error=_tail(proc.stderr))
    run.exit_code = proc.returncode
    run.proc_read_bytes = max(run.proc_read_bytes, read_bytes)
    if group is not None:
        stats = group.stats()
        run.group_peak_bytes, run.group_read_bytes = stats.peak_bytes, stats.read_bytes
        run.group_cache_bytes = stats.cache_bytes
        # the kernel's count; a SIGKILL nobody else sent (no timeout) is the OOM killer too
        run.oom_killed = stats.oom_kills > 0 or proc.returncode == -signal.SIGKILL
    return run


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
