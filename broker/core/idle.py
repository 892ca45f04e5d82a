"""When a granted lease should give its slot back: the idle and suspend rules. Pure, no clock.

On every ``Tick`` the scheduler (``broker.core.scheduler.Scheduler``) asks ``suspend_reason`` about
each granted lease that was not ``asked_recently`` and issues ``SuspendIdle(lease_id, reason)``
for the reason it gets. The reasons, first match wins:

- ``"quota"``: the user's GPU time today reached their group's ``gpu_hours_per_day``;
- ``"max_lease"``: the lease has been granted for ``policy.max_lease`` or longer;
- a busy lease (a cell running) is never suspended for idleness;
- ``"idle"``: no activity for ``policy.idle_suspend_after``;
- ``"idle_while_queued"``: no activity for ``policy.idle_suspend_when_queued`` while a queued
  request could use the slot (``wanted_kinds``, ``slot_wanted``: not a slot of a drained host,
  which no queued request can get);
- ``"after_cell"``: per-cell binding (``release_after``: the lease's group's
  ``release_after_cell``, else the policy's; None: off): no activity for that long since the
  last cell ended while a queued request could use the slot, once a cell ran on this lease
  (``ran_a_cell``: a resume takes seconds after the grant, and the cell that woke the kernel
  must run first). The next cell resumes the kernel, on any slot. Shorter than
  ``idle_suspend_when_queued`` (the config refuses otherwise).

"quota" and "max_lease" are ``FORCED``: the kernel must stop within ``policy.busy_grace`` even if
a cell runs; a lease that still holds its slot ``policy.obey_within`` after the first such order
is ended by the scheduler and fenced. Idle time counts from the last activity, and never from
before the grant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from broker.core.leases import ANY_KIND, Lease, since

if TYPE_CHECKING:
    from broker.core.groups import GroupConfig
    from broker.core.policy import Policy
    from broker.core.slots import SlotState

ANY_WANTED = "*"  # in wanted_kinds: some queued request takes any kind
FORCED = ("quota", "max_lease")  # orders a busy kernel must obey too (after Policy.busy_grace)


def asked_recently(lease: Lease, now: float, policy: Policy) -> bool:
    """True when ``lease`` was ordered to suspend less than ``policy.suspend_retry`` ago."""
    asked = lease.suspend_requested_at
    return asked is not None and now - asked < policy.suspend_retry


def idle_seconds(lease: Lease, now: float) -> float:
    """Seconds since the lease's last activity, or since its grant when that is later."""
    idle = now - (lease.last_activity if lease.last_activity is not None else 0.0)
    return min(idle, now - since(lease.granted_at, now))


def suspend_reason(
    lease: Lease,
    now: float,
    policy: Policy,
    over_quota: bool,
    slot_wanted: Callable[[], bool],
) -> str | None:
    """Why granted ``lease`` should suspend now (see the module doc), or None. ``over_quota``:
    its user reached today's quota; ``slot_wanted()``: a queued request could use its slot
    (asked only when the answer matters)."""
    idle = idle_seconds(lease, now)
    if over_quota:
        return "quota"
    if now - since(lease.granted_at, now) >= policy.max_lease:
        return "max_lease"
    if lease.busy:
        return None
    if idle >= policy.idle_suspend_after:
        return "idle"
    when_queued = policy.idle_suspend_when_queued
    per_cell = release_after(lease, policy) if ran_a_cell(lease) else None
    shortest = when_queued if per_cell is None else min(per_cell, when_queued)
    if idle >= shortest and slot_wanted():
        return "idle_while_queued" if idle >= when_queued else "after_cell"
    return None


def ran_a_cell(lease: Lease) -> bool:
    """True when the lease's holder reported activity after the grant: the cell that woke the
    kernel (asked for before the grant) has run, so "after a cell" applies."""
    return (
        lease.last_activity is not None
        and lease.granted_at is not None
        and lease.last_activity > lease.granted_at
    )


def release_after(lease: Lease, policy: Policy) -> float | None:
    """The per-cell binding in force for ``lease``: its group's ``release_after_cell`` when that
    group sets one, else ``policy.release_after_cell`` (None: off)."""
    if lease.group is not None:
        for group in policy.groups:
            if group.name == lease.group and group.release_after_cell is not None:
                return group.release_after_cell
    return policy.release_after_cell


def wanted_kinds(
    queued: Iterable[Lease], groups_of: Callable[[str], tuple[GroupConfig, ...]]
) -> set[str]:
    """Kinds some queued request could use (``ANY_WANTED``: any kind); ``groups_of(user)``:
    the user's groups (empty: an open user)."""
    wanted: set[str] = set()
    for lease in queued:
        groups = groups_of(lease.user)
        if lease.kind != ANY_KIND:
            if not groups or any(group.allows(lease.kind) for group in groups):
                wanted.add(lease.kind)
        elif not groups or any(not group.kinds for group in groups):
            wanted.add(ANY_WANTED)
        else:
            wanted.update(k for group in groups for k in group.kinds)
    return wanted


def slot_wanted(slot: SlotState | None, wanted: set[str]) -> bool:
    """True when a queued request could be served by ``slot`` once it is free: the slot is still
    in the config, not on a drained host, and of a kind in ``wanted``."""
    if slot is None or slot.retired or slot.drained:
        return False
    return ANY_WANTED in wanted or slot.kind in wanted
