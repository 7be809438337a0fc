"""Compile the C++ kernels on first use (torch.utils.cpp_extension, cached per machine) or explain in one line why not.

The build lands in $TIERMOE_KERNELS_DIR, else $TORCH_EXTENSIONS_DIR, else <tiermoe cache dir>/kernels; torch rebuilds
it when the source or torch changes. TIERMOE_KERNELS=off skips it (torch ops everywhere).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("gemv.cpp")
log = logging.getLogger("tiermoe")


def build_dir() -> Path:
    """Where the compiled extension is kept."""
    for var in ("TIERMOE_KERNELS_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    from tiermoe.offload.placement.costs import cache_dir

    return cache_dir() / "kernels"


def staged_source(original: Path = SOURCE) -> tuple[Path, Path]:
    """The build folder for this source text and torch version, holding a copy of the source: every checkout of the
    same code then shares one build (torch rebuilds whenever the source path in its build file changes)."""
    text = original.read_bytes()
    key = hashlib.sha256(text + torch.__version__.encode() + platform.machine().encode()).hexdigest()[:16]
    folder = build_dir() / key
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / original.name
    if not source.exists() or source.read_bytes() != text:
        tmp = source.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(text)
        tmp.replace(source)  # atomic: a concurrent build never sees half a file
    return folder, source


def disabled() -> bool:
    return os.environ.get("TIERMOE_KERNELS", "").lower() in ("0", "off", "false", "no")


@contextmanager
def quiet_torch_build():
    """torch's compiler checks warn through both `warnings` and its logger; our one line says it all."""
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


@contextmanager
def build_lock(folder: Path):
    """Serialise builds with a lock the kernel drops when its holder dies, and clear torch's own `lock` file while
    holding it: torch leaves that file behind when a build is killed (Ctrl-C), and then waits for it forever."""
    import fcntl

    with open(folder / "tiermoe.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)  # no live build holds it: we hold the only way in
        yield


def with_venv_tools_on_path() -> None:
    """The `ninja` wheel puts its binary next to this interpreter, which is not on PATH unless the venv is active."""
    bin_dir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def compile_kernels() -> ModuleType | None:
    """The compiled module, or None (with one warning line) when disabled, not x86, or the build fails."""
    if disabled():
        return None
    # -fopenmp: at::parallel_for is inline OpenMP code; libgomp resolves to the copy torch has already loaded.
    # -ffp-contract=off: a*b + c stays two roundings, as in torch's elementwise ops.
    module = build_extension("tiermoe_gemv", SOURCE, ["-O3", "-fopenmp", "-ffp-contract=off"], ["-fopenmp"],
                             what="compiled kernels", instead="using torch ops",
                             announce="compiling the decode kernels for this machine (once, about 20 s)")
    return None if module is None or module.isa() == "none" else module


def build_extension(name: str, source: Path, cflags: list[str], ldflags: list[str] | None = None, *, what: str,
                    instead: str, announce: str | None = None) -> ModuleType | None:
    """Build (once per machine and source text) and load the C++ extension `name` from `source`; None, with one
    warning line "<what> unavailable (<why>); <instead>", when there is no compiler or the build fails. `announce`
    is said on a terminal before a first build."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        log.warning("tiermoe: %s unavailable (no C++ compiler %r); %s", what, compiler, instead)
        return None
    with_venv_tools_on_path()
    try:
        from torch.utils.cpp_extension import load

        folder, staged = staged_source(source)
        if announce and not (folder / f"{name}.so").exists() and sys.stderr.isatty():  # a first run: say why
            print(f"tiermoe: {announce}...", file=sys.stderr, flush=True)
        with quiet_torch_build(), build_lock(folder):
            return load(name=name, sources=[str(staged)], extra_cflags=cflags, extra_ldflags=ldflags or [],
                        build_directory=str(folder), verbose=False)
    except Exception as e:  # no ninja, a failed build: the caller's fallback computes the same results
        reason = str(e).strip().splitlines()[0].split(": [")[0] if str(e).strip() else type(e).__name__
        log.warning("tiermoe: %s unavailable (%s); %s", what, reason[:160], instead)
        return None
