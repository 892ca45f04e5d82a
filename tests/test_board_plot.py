"""The dashboard's plot, pure: leases and class hours into steps, steps into SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from broker.core.groups import ClassSession
from broker.http.board_plot import class_plot, in_use_steps, reserved_steps

DAY = 19_723 * 86400.0  # a Monday (2024-01-01), 00:00 UTC
H = 3600.0


def test_slots_in_use_count_overlapping_leases_clipped_to_the_day_and_to_now() -> None:
    intervals = [
        (DAY - 2 * H, DAY + 1 * H),  # from yesterday: counts from 00:00
        (DAY + 0.5 * H, DAY + 2 * H),
        (DAY + 2 * H, DAY + 30 * H),  # still running: ends at now
    ]
    steps = in_use_steps(intervals, DAY, now=DAY + 3 * H)
    assert steps == [(0.0, 1), (0.5 * H, 2), (1 * H, 1), (3 * H, 0)]
    assert in_use_steps([], DAY, DAY + H) == [(0.0, 0)]


def test_the_reservation_follows_the_class_hours_of_that_weekday() -> None:
    monday = ClassSession(frozenset({0}), 9 * 60, 11 * 60, reserved_slots=5)
    overlap = ClassSession(frozenset({0}), 10 * 60, 12 * 60, reserved_slots=2)
    tuesday = ClassSession(frozenset({1}), 9 * 60, 10 * 60, reserved_slots=7)
    steps = reserved_steps([monday, overlap, tuesday], DAY)
    assert steps == [(0.0, 0), (9 * H, 5), (11 * H, 2), (12 * H, 0)]
    assert reserved_steps([tuesday], DAY) == [(0.0, 0)]


def test_the_plot_is_one_svg_with_a_title_that_escapes_the_group_name() -> None:
    svg = class_plot("a<b", [(0.0, 1), (H, 3)], [(0.0, 0), (9 * H, 2)], 2 * H, capacity=4)
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag.endswith("svg") and root.get("role") == "img"
    title = root.find("{http://www.w3.org/2000/svg}title")
    assert title is not None and title.text.startswith("a<b: slots in use today")
    assert "<b:" not in svg  # escaped in the markup
    assert "peak 3" in root.get("aria-label", "")
