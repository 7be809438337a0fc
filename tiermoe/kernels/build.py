"""Compile the C++ kernels on first use (torch.utils.cpp_extension, cached per machine) or explain in one line why not.

The build lands in $TIERMOE_KERNELS_DIR, else $TORCH_EXTENSIONS_DIR, else <tiermoe cache dir>/kernels; torch rebuilds
it when the source or torch changes. TIERMOE_KERNELS=off skips it (torch ops everywhere).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("gemv.cpp")
log = logging.getLogger("tiermoe")


def build_dir() -> Path:
    """Where the compiled extension is kept."""
    for var in ("TIERMOE_KERNELS_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    from tiermoe.offload.costs import cache_dir

    return cache_dir() / "kernels"


def disabled() -> bool:
    return os.environ.get("TIERMOE_KERNELS", "").lower() in ("0", "off", "false", "no")


def compile_kernels() -> ModuleType | None:
    """The compiled module, or None (with one warning line) when disabled, not x86, or the build fails."""
    if disabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        # -fopenmp: at::parallel_for is inline OpenMP code; libgomp resolves to the copy torch has already loaded.
        # -ffp-contract=off: a*b + c stays two roundings, as in torch's elementwise ops.
        module = load(name="tiermoe_gemv", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                      extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
    except Exception as e:  # a missing compiler or ninja, a failed build: torch ops still give the same tokens
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("tiermoe: compiled kernels unavailable (%s); using torch ops", reason[:200])
        return None
    if module.isa() == "none":
        return None
    return module
