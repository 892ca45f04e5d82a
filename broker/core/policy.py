"""The scheduler's knobs (``Policy``): the config's ``[policy]`` in seconds, and the groups.
Pure.

``broker.config.policy`` checks the ``[policy]`` table and turns it into a ``Policy``
(``scheduler_policy``); ``broker.core.scheduler`` reads it on every event.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.core.groups import GroupConfig


@dataclass(frozen=True)
class Policy:
    """The scheduler's knobs: ``[policy]`` of the config in seconds, and the groups."""

    heartbeat_timeout: float = 60.0
    queue_timeout: float = 0.0
    max_leases_per_user: int = 4
    idle_suspend_after: float = 900.0
    idle_suspend_when_queued: float = 30.0
    max_lease: float = 43200.0
    usage_half_life: float = 86400.0
    fence_retry: float = 30.0
    suspend_retry: float = 300.0
    busy_grace: float = 60.0  # a "quota" or "max_lease" order: seconds for the cell to end
    max_queued_per_user: int = 3  # requests one user may have waiting at once
    aging_after: float | None = None  # None: 4 x idle_suspend_when_queued, at least 2 min
    members_only: bool = False  # users in no group are refused (``[policy] members_only``)
    release_after_cell: float | None = None  # per-cell binding while others wait; None: off
    groups: tuple[GroupConfig, ...] = ()

    @property
    def obey_within(self) -> float:
        """Seconds after a forced order ("quota", "max_lease") after which the broker ends the
        lease itself: the grace for the cell, then up to a heartbeat timeout for the save."""
        return self.busy_grace + self.heartbeat_timeout

    @property
    def aging(self) -> float:
        """A request waiting this long goes before newer ones, whatever its usage."""
        if self.aging_after is not None:
            return self.aging_after
        return max(120.0, 4 * self.idle_suspend_when_queued)


def may_hold(held: int, policy: Policy) -> bool:
    """True when a user holding ``held`` granted leases may be granted one more."""
    return held < policy.max_leases_per_user
