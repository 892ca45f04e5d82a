"""The dashboard's plot: a class's slots in use over the day (UTC) against its reservation, as
inline SVG drawn on the server (no script, no CDN). Pure: numbers in, text out.

``broker.http.board_model`` calls ``in_use_steps`` and ``reserved_steps`` to turn leases and class
hours into step series, and ``class_plot`` to draw them; the dashboard template inlines the SVG.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from broker.core.groups import DAY_SECONDS, ClassSession

Step = tuple[float, int]  # (seconds after the day's 00:00 UTC, value from then on)

WIDTH, HEIGHT = 720, 180
LEFT, RIGHT, TOP, BOTTOM = 34, 22, 12, 24


def in_use_steps(
    intervals: Iterable[tuple[float, float]], day_start: float, now: float
) -> list[Step]:
    """How many of ``intervals`` (unix start, end) overlap each moment of the day until
    ``now``, as steps (offset, count) starting at offset 0."""
    changes: dict[float, int] = {}
    end_of_day = min(now, day_start + DAY_SECONDS)
    for start, end in intervals:
        lo, hi = max(start, day_start), min(end, end_of_day)
        if hi <= lo:
            continue
        changes[lo - day_start] = changes.get(lo - day_start, 0) + 1
        changes[hi - day_start] = changes.get(hi - day_start, 0) - 1
    steps: list[Step] = [(0.0, 0)]
    count = 0
    for offset in sorted(changes):
        count += changes[offset]
        if offset == steps[-1][0]:
            steps[-1] = (offset, count)
        elif count != steps[-1][1]:
            steps.append((offset, count))
    return steps


def reserved_steps(sessions: Iterable[ClassSession], day_start: float) -> list[Step]:
    """The slots a class keeps for itself during its class hours on the day starting at
    ``day_start`` (the most any session active then reserves), as steps."""
    weekday = (int(day_start // DAY_SECONDS) + 3) % 7  # 1970-01-01 was a Thursday
    today = [s for s in sessions if weekday in s.days and s.reserved_slots > 0]
    edges = sorted(
        {0.0, *(s.start_minute * 60.0 for s in today), *(s.end_minute * 60.0 for s in today)}
    )
    steps: list[Step] = []
    for offset in edges:
        if offset >= DAY_SECONDS:
            continue
        minute = offset / 60.0
        value = max(
            (s.reserved_slots for s in today if s.start_minute <= minute < s.end_minute),
            default=0,
        )
        if not steps or steps[-1][1] != value:
            steps.append((offset, value))
    return steps or [(0.0, 0)]


def class_plot(
    name: str, in_use: Sequence[Step], reserved: Sequence[Step], now_offset: float, capacity: int
) -> str:
    """An SVG of ``in_use`` (filled steps, until ``now_offset``) and ``reserved`` (dashed steps,
    the whole day) for class ``name``; the y axis goes to at least ``capacity`` slots."""
    top = max([capacity, 1, *(v for _, v in in_use), *(v for _, v in reserved)])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(offset: float) -> float:
        return LEFT + plot_w * min(max(offset, 0.0), DAY_SECONDS) / DAY_SECONDS

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    def path(steps: Sequence[Step], until: float) -> str:
        points = []
        for i, (offset, value) in enumerate(steps):
            if offset > until:
                break
            end = steps[i + 1][0] if i + 1 < len(steps) else until
            end = min(end, until)
            points.append(f"{x(offset):.1f},{y(value):.1f} {x(end):.1f},{y(value):.1f}")
        return " ".join(points)

    used_line = path(in_use, now_offset)
    area = f"{x(0):.1f},{y(0):.1f} {used_line} {x(now_offset):.1f},{y(0):.1f}"
    peak = max((v for _, v in in_use), default=0)
    title = f"{name}: slots in use today (UTC), peak {peak}, against its reservation"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" class="plot">',
        f"<title>{escape(title)}</title>",
    ]
    for value in range(0, top + 1, max(1, top // 4)):
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            'class="grid"/>'
            f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value}</text>'
        )
    for hour in range(0, 25, 3):
        parts.append(
            f'<text x="{x(hour * 3600):.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
            f"{hour:02d}:00</text>"
        )
    parts.append(f'<polygon points="{area}" class="used"/>')
    parts.append(f'<polyline points="{used_line}" class="used-line"/>')
    parts.append(f'<polyline points="{path(reserved, DAY_SECONDS)}" class="reserved"/>')
    parts.append(
        f'<line x1="{x(now_offset):.1f}" x2="{x(now_offset):.1f}" y1="{TOP}" '
        f'y2="{TOP + plot_h}" class="now"/>'
    )
    parts.append("</svg>")
    return "".join(parts)
