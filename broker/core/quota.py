"""GPU time used per user: per UTC day (quotas) and decayed over time (fair order). Pure.

The scheduler (``broker.core.scheduler.Scheduler``) owns one ``UsageLedger``: it adds a
``UsageRecord`` when a granted lease ends, and adds the running time of live leases itself when
it asks. After a restart the service feeds the ended leases of the last two days back with
``Scheduler.restore_usage(records)``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from broker.core.groups import DAY_SECONDS

KEEP_DAYS = 2  # daily totals older than this many days are forgotten


@dataclass(frozen=True)
class UsageRecord:
    """``user`` held a slot from ``start`` to ``end`` (unix seconds): one ended, granted lease."""

    user: str
    start: float
    end: float


def day_of(now: float) -> int:
    """The UTC day number of unix time ``now`` (days since 1970-01-01)."""
    return int(now // DAY_SECONDS)


def overlap_today(start: float, end: float, now: float) -> float:
    """Seconds of [start, end) that fall on ``now``'s UTC day."""
    day_start = day_of(now) * DAY_SECONDS
    return max(0.0, min(end, day_start + DAY_SECONDS) - max(start, day_start))


def quota_message(hours: float, now: float) -> str:
    """The refusal a user over quota reads, with the exact time the quota resets."""
    reset = (day_of(now) + 1) * DAY_SECONDS
    when = datetime.datetime.fromtimestamp(reset, tz=datetime.timezone.utc)
    return (
        f"daily quota of {hours:g} GPU-hours used; resets at 00:00 UTC ({when:%Y-%m-%d} 00:00 UTC)"
    )


class UsageLedger:
    """Ended usage per user: seconds per UTC day, and a total decaying with ``half_life``."""

    def __init__(self, half_life: float = 86400.0) -> None:
        self.half_life = half_life
        self.daily: dict[tuple[str, int], float] = {}  # (user, day) -> seconds
        self.decayed: dict[str, tuple[float, float]] = {}  # user -> (seconds, as of time)

    def add(self, record: UsageRecord) -> None:
        """Count one ended lease: split across UTC days, and into the decayed total at its end."""
        start, end = record.start, max(record.start, record.end)
        if end <= start:
            return
        day = day_of(start)
        while day * DAY_SECONDS < end:
            part = min(end, (day + 1) * DAY_SECONDS) - max(start, day * DAY_SECONDS)
            key = (record.user, day)
            self.daily[key] = self.daily.get(key, 0.0) + part
            day += 1
        value, at = self.decayed.get(record.user, (0.0, end))
        if end >= at:
            self.decayed[record.user] = (self._decay(value, end - at) + (end - start), end)
        else:
            self.decayed[record.user] = (value + self._decay(end - start, at - end), at)

    def used_on(self, user: str, day: int) -> float:
        """Ended usage of ``user`` on UTC day ``day``, in seconds."""
        return self.daily.get((user, day), 0.0)

    def decayed_at(self, user: str, now: float) -> float:
        """Ended usage of ``user``, each second weighted by 2^(-age / half_life)."""
        value, at = self.decayed.get(user, (0.0, now))
        return self._decay(value, max(0.0, now - at))

    def prune(self, now: float) -> None:
        """Forget daily totals older than ``KEEP_DAYS`` and decayed totals below a second."""
        oldest = day_of(now) - KEEP_DAYS
        self.daily = {key: v for key, v in self.daily.items() if key[1] >= oldest}
        self.decayed = {
            user: (v, at)
            for user, (v, at) in self.decayed.items()
            if self._decay(v, max(0.0, now - at)) >= 1.0
        }

    def _decay(self, value: float, age: float) -> float:
        if self.half_life <= 0:
            return value
        return value * 0.5 ** (age / self.half_life)
