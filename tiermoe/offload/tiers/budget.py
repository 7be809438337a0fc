"""Memory budgets as users write them: "2GiB", "512MB", "25%" (of all routed-expert bytes), or a byte count."""

from __future__ import annotations

import re

from tiermoe.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z%]*)\s*$", re.IGNORECASE)


def parse_budget(value: str | int | float, total: int) -> int:
    """Bytes meant by `value`; a percentage is of `total` (the bytes of every routed expert)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        nbytes = int(value)
    else:
        m = _PATTERN.match(str(value))
        unit = m and m[2].lower()
        if not m or (unit != "%" and unit not in _UNITS):
            raise ConfigError(f"cannot read budget {value!r}: use bytes, a size like 2GiB or 512MB, or a percentage")
        number = float(m[1])
        if unit == "%" and number > 100:
            raise ConfigError(f"budget {value!r} is more than all the experts (100%)")
        nbytes = int(total * number / 100) if unit == "%" else int(number * _UNITS[unit])
    if nbytes < 0:
        raise ConfigError(f"budget must be >= 0, got {value!r}")
    return nbytes


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
