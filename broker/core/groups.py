"""Groups (classes, teams) and their class hours, as the scheduler reads them. Pure.

``broker.config.groups`` checks ``[[groups]]`` tables and builds these frozen objects into
``Config.groups``; the scheduler (``broker.core.scheduler``, ``broker.core.fairness``)
reads the same frozen ``GroupConfig`` objects to decide which kinds a user may lease, how many slots
at once, their daily GPU-hours, their priority, and which slots a class in session keeps for itself.
All times are UTC; ``ClassSession.active(now)`` takes unix seconds and reads no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_SECONDS = 86400.0


@dataclass(frozen=True)
class ClassSession:
    """Class hours of a group: on ``days`` (0 = Monday), from ``start_minute`` to ``end_minute``
    (minutes after 00:00 UTC), ``reserved_slots`` of the group's kinds are kept for members."""

    days: frozenset[int]
    start_minute: int
    end_minute: int
    reserved_slots: int = 0

    def active(self, now: float) -> bool:
        """True when unix time ``now`` falls inside these class hours (UTC)."""
        day_index = int(now // DAY_SECONDS)
        weekday = (day_index + 3) % 7  # 1970-01-01 was a Thursday
        minute = (now - day_index * DAY_SECONDS) / 60.0
        return weekday in self.days and self.start_minute <= minute < self.end_minute


@dataclass(frozen=True)
class GroupConfig:
    """A class or team. Scheduling rules apply to ``members``; ``teachers`` may see the group's
    usage (the API's business), and are bound by its rules only when they are members too."""

    name: str
    members: frozenset[str] = frozenset()
    teachers: frozenset[str] = frozenset()
    kinds: tuple[str, ...] = ()  # empty: any kind
    max_slots_per_user: int = 1
    gpu_hours_per_day: float | None = None
    priority: int = 0
    sessions: tuple[ClassSession, ...] = ()
    # Where more members and teachers come from (``[[groups]] hub_group``): the service adds the
    # hub group's users to ``members``/``teachers`` before the scheduler sees the group; the
    # scheduler reads only ``members``.
    hub_group: str | None = None
    teacher_hub_group: str | None = None
    release_after_cell: float | None = None  # overrides Policy.release_after_cell; None: inherit

    def allows(self, kind: str) -> bool:
        """True when members of this group may lease a slot of ``kind``."""
        return not self.kinds or kind in self.kinds

    def in_session(self, now: float) -> ClassSession | None:
        """The session active at ``now`` with the most reserved slots, or None."""
        active = [s for s in self.sessions if s.active(now)]
        return max(active, key=lambda s: s.reserved_slots) if active else None
