"""Progress bars for long commands (simulation, calibration, training, conversion, generation batches).

Bars go to stderr, only when it is a terminal, and never after `quiet(True)` (the CLI's --quiet).
"""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm

_quiet = False


def quiet(on: bool) -> None:
    """Turn every progress bar of this process off (True) or back to the terminal's choice (False)."""
    global _quiet
    _quiet = on


def shown() -> bool:
    """Whether a bar started now would be drawn."""
    import sys

    return not _quiet and sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr that disappears when done; disabled when quiet or stderr is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=not shown())
