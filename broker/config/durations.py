"""Durations as people write them in the broker config: "90s", "15m", "1h30m", "250ms".

Pure functions, no I/O. ``broker.config.loader`` parses ``[policy]`` values with ``parse_duration``;
the CLI and status output print seconds back with ``format_duration``.
"""

from __future__ import annotations

import math
import re

# Unit -> seconds, in the only order a compound duration may use them (largest first).
UNITS: dict[str, float] = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|d|h|m|s)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_EXAMPLES = '"90s", "15m", "2h", "1d", "1h30m", "250ms" or a number of seconds'


def parse_duration(text: str | int | float) -> float:
    """Return the duration in seconds.

    Accepts a non-negative number (seconds), a numeric string ("90"), or one or more
    number+unit parts with units d, h, m, s, ms, largest first ("1h30m", "1.5h", "250ms").
    Raises ``ValueError`` with a message that shows the accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a duration such as {_EXAMPLES}, got {text!r}")
    if isinstance(text, (int, float)):
        return _check_number(float(text), text)
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as {_EXAMPLES}, got {text!r}")
    raw = text
    text = text.strip().lower().replace(" ", "")
    if not text:
        raise ValueError(f"empty duration: write one such as {_EXAMPLES}")
    if text.startswith("-"):
        raise ValueError(f"negative duration {raw!r}: durations must be 0 or more")
    if _NUMBER.fullmatch(text):
        return _check_number(float(text), raw)
    total = 0.0
    pos = 0
    last_rank = -1
    ranks = list(UNITS)
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        unit = match.group(2)
        rank = ranks.index(unit)
        if rank <= last_rank:
            raise ValueError(
                f"bad duration {raw!r}: write each unit once, largest first (like '1h30m')"
            )
        last_rank = rank
        total += float(match.group(1)) * UNITS[unit]
        pos = match.end()
    if pos != len(text):
        rest = text[pos:]
        raise ValueError(
            f"bad duration {raw!r} (cannot read {rest!r}): use units d, h, m, s or ms, "
            f"as in {_EXAMPLES}"
        )
    return total


def _check_number(value: float, raw: object) -> float:
    """Reject negative, infinite and NaN numbers of seconds."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"bad duration {raw!r}: expected a finite number of seconds")
    if value < 0:
        raise ValueError(f"negative duration {raw!r}: durations must be 0 or more")
    return value


def format_duration(seconds: float) -> str:
    """Return the shortest compound form, to the millisecond: 90 -> "1m30s", 3600 -> "1h".

    ``parse_duration(format_duration(x)) == x`` for any x with at most millisecond precision.
    """
    if isinstance(seconds, bool) or math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration: expected seconds >= 0")
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    if millis:
        parts.append(f"{millis}ms")
    return "".join(parts)
