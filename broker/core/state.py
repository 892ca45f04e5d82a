"""What the scheduler holds: the slot pool, the live leases, the queue and the usage ledger,
with the queries the service and the API read. Pure: no clock, no I/O.

``broker.core.scheduler.Scheduler`` subclasses ``SchedulerState`` and adds the rules (its ``handle``
is the only way to change the state); the bookkeeping here (``_take``, ``_end``) keeps the
per-user and per-group counts in step with the leases. When the store fails to commit an event,
the service builds a new scheduler from the store instead of undoing the event here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace

from broker.core.fairness import GrantContext, charge_group, groups_for, order_key, quota_hours
from broker.core.groups import GroupConfig
from broker.core.leases import Lease, since
from broker.core.policy import Policy
from broker.core.queue import Key, WaitingQueue
from broker.core.quota import UsageLedger, UsageRecord, day_of, overlap_today
from broker.core.slots import Fence, SlotPool, SlotState


class SchedulerState:
    """The scheduler's state and its queries (``broker.core.scheduler.Scheduler`` adds the rules).
    ``groups`` (or ``policy.groups``) turn on group rules; without any, every user is open."""

    def __init__(
        self,
        slots: Iterable[SlotState],
        policy: Policy | None = None,
        next_seq: int = 1,
        groups: Iterable[GroupConfig] = (),
    ) -> None:
        policy = policy or Policy()
        groups = tuple(groups)
        self.policy = replace(policy, groups=groups) if groups else policy
        self.pool = SlotPool(slots)
        self._leases: dict[str, Lease] = {}
        self._queue = WaitingQueue()  # queued lease ids (``broker.core.queue``)
        self._now = 0.0  # the time of the last event (positions are read as of then)
        self._next_seq = next_seq
        self._granted: dict[str, tuple[str, ...]] = {}  # user -> granted lease ids
        self._in_group: dict[tuple[str, str], int] = {}  # (user, group) -> granted leases
        self.usage = UsageLedger(self.policy.usage_half_life)
        self._ended_since_check: set[str] = set()  # users whose usage grew by an ended lease
        self._quota_users = quota_users(self.policy.groups)  # who may ever be over a quota
        self._groups_of: dict[str, tuple[GroupConfig, ...]] = {}  # until the groups change
        self._pruned_day = -1

    # -- queries ---------------------------------------------------------------------------

    @property
    def kinds(self) -> list[str]:
        """The slot kinds in the pool (retired slots aside), sorted."""
        return self.pool.kinds()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def lease(self, lease_id: str) -> Lease | None:
        """The live lease with that id, or None when it ended or never existed."""
        return self._leases.get(lease_id)

    def leases(self) -> list[Lease]:
        """All live leases, in seq order (the dict's: leases enter it in seq order, at request
        or at restore, and a changed lease replaces itself in place)."""
        return list(self._leases.values())

    def slots(self) -> list[SlotState]:
        """Every slot, retired ones (gone from the config, still leased or fenced) last."""
        return self.pool.all()

    def slot(self, slot_id: str) -> SlotState | None:
        return self.pool.get(slot_id)

    def slot_state(self, slot_id: str) -> str:
        """ "busy", "fencing", "unreachable", "drained" or "free" (KeyError: no such slot)."""
        return self.pool.state(slot_id)

    def fences(self) -> list[Fence]:
        """Slots waiting for fencing (the service persists them; ``restore_fences``)."""
        return self.pool.fences()

    def free_slots(self) -> list[SlotState]:
        """Slots that may be granted now, in pool order."""
        return self.pool.free()

    def queue(self) -> list[Lease]:
        """Queued leases, first to be served first (as of the last event)."""
        return [self._leases[lease_id] for lease_id in self._queue.ordered(self._order_key)]

    def waiting(self) -> Iterator[Lease]:
        """Queued leases in arrival order (no sorting: for questions order does not change)."""
        return (self._leases[lease_id] for lease_id in self._queue)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def queued_by(self, user: str) -> int:
        """How many requests ``user`` has waiting."""
        return self._queue.count(user)

    def positions(self) -> dict[str, int]:
        """Lease id -> queue position, 1..n."""
        order = self._queue.ordered(self._order_key)
        return {lease_id: index for index, lease_id in enumerate(order, start=1)}

    def position(self, lease_id: str) -> int | None:
        return self._queue.position(lease_id, self._order_key)

    def held_by(self, user: str) -> int:
        """How many granted leases ``user`` holds."""
        return len(self._granted.get(user, ()))

    def held_in_group(self, user: str, group: str) -> int:
        """How many of ``user``'s granted leases count against ``group``'s slots per user."""
        return self._in_group.get((user, group), 0)

    def groups_of(self, user: str) -> tuple[GroupConfig, ...]:
        """``user``'s groups, highest priority first (empty: an open user)."""
        groups = self._groups_of.get(user)
        if groups is None:
            groups = self._groups_of[user] = groups_for(user, self.policy.groups)
        return groups

    def quota_seconds(self, user: str) -> float | None:
        """``user``'s GPU-seconds per UTC day, or None for no limit."""
        hours = quota_hours(self.groups_of(user))
        return None if hours is None else hours * 3600.0

    def usage_today(self, user: str, now: float) -> float:
        """GPU-seconds ``user`` used on ``now``'s UTC day: ended leases and live ones."""
        used = self.usage.used_on(user, day_of(now))
        for lease_id in self._granted.get(user, ()):
            lease = self._leases[lease_id]
            used += overlap_today(since(lease.granted_at, now), now, now)
        return used

    def recent_usage(self, user: str, now: float) -> float:
        """Decayed GPU-seconds of ``user`` (fair order): ended leases decayed, live ones whole."""
        used = self.usage.decayed_at(user, now)
        for lease_id in self._granted.get(user, ()):
            used += max(0.0, now - since(self._leases[lease_id].granted_at, now))
        return used

    def over_quota(self, user: str, now: float) -> bool:
        """True when ``user``'s GPU time today reached their quota (no quota: never)."""
        quota = self.quota_seconds(user)
        return quota is not None and self.usage_today(user, now) >= quota

    # -- restoring after a restart ---------------------------------------------------------

    def restore_usage(self, records: Iterable[UsageRecord]) -> None:
        """Load ended leases (the service feeds those of the last 2 days from the store), so
        quotas and fair order survive a restart. Call before ``restore``."""
        for record in records:
            self.usage.add(record)
            self._ended_since_check.add(record.user)

    def restore_fences(self, fences: Iterable[Fence], now: float) -> None:
        """Load slots that were being fenced when the broker stopped; they come back
        unreachable and the next ``Tick`` asks for fencing again. Unknown slots are skipped."""
        for fence in fences:
            self.pool.restore_fence(fence)

    # -- bookkeeping (the rules in broker.core.scheduler call these) ----------------------------

    def _attribute(self, user: str, kind: str) -> str | None:
        """The group a lease of ``user`` on a slot of ``kind`` counts against (restore, reload):
        one with room, else the first that allows the kind, else None."""
        groups = self.groups_of(user)
        held = {group.name: self.held_in_group(user, group.name) for group in groups}
        group = charge_group(kind, groups, held)
        if group is None:
            group = next((g for g in groups if g.allows(kind)), None)
        return group.name if group is not None else None

    def _end(self, lease: Lease, now: float, fence: bool = False) -> None:
        """Forget a lease that ended; free its slot (fence it first: ``fence``) or take it out
        of the queue; count its GPU time."""
        del self._leases[lease.id]
        if lease.slot_id is None:
            self._queue.remove(lease)
            return
        self._queue.invalidate()  # its user's usage changed
        self.usage.add(UsageRecord(lease.user, since(lease.granted_at, now), now))
        self._ended_since_check.add(lease.user)
        remaining = tuple(i for i in self._granted[lease.user] if i != lease.id)
        if remaining:
            self._granted[lease.user] = remaining
        else:
            del self._granted[lease.user]
        if lease.group is not None:
            key = (lease.user, lease.group)
            self._in_group[key] -= 1
            if not self._in_group[key]:
                del self._in_group[key]
        self.pool.vacate(lease.slot_id, lease if fence else None, now)

    def _take(self, slot_id: str, lease: Lease) -> None:
        """Record ``lease`` (already granted, with its group) as holding ``slot_id``."""
        self._queue.invalidate()  # its user's usage changed
        self.pool.occupy(slot_id, lease.id)
        self._leases[lease.id] = lease
        self._granted[lease.user] = (*self._granted.get(lease.user, ()), lease.id)
        if lease.group is not None:
            key = (lease.user, lease.group)
            self._in_group[key] = self._in_group.get(key, 0) + 1

    def holders(self) -> list[tuple[str, str]]:
        """(user, slot kind) of every granted lease: what ``fairness.reservation_needs`` reads."""
        out = []
        for lease in self._leases.values():
            if lease.slot_id is not None:
                slot = self.pool.get(lease.slot_id)
                if slot is not None:
                    out.append((lease.user, slot.kind))
        return out

    # -- the grant order (``broker.core.fairness``) -------------------------------------------

    def _grant_context(self, now: float) -> GrantContext:
        """What ``order_key`` needs at ``now``: usage and priority are worked out per user the
        first time the sort asks (``_PerUser``), not for every user up front."""
        sessions = tuple(g for g in self.policy.groups if g.in_session(now) is not None)
        return GrantContext(
            now=now,
            aging_after=self.policy.aging,
            usage=_PerUser(lambda user: self.recent_usage(user, now)),
            priority=_PerUser(self._priority),
            session_groups=sessions,
        )

    def _priority(self, user: str) -> int:
        groups = self.groups_of(user)
        return groups[0].priority if groups else 0

    def _key_at(self, now: float) -> Key:
        """Lease id -> its ``grant_order`` key at ``now``."""
        key = order_key(self._grant_context(now))
        return lambda lease_id: key(self._leases[lease_id])

    def _order_key(self) -> Key:
        return self._key_at(self._now)


def quota_users(groups: Iterable[GroupConfig]) -> frozenset[str]:
    """Members of a group with a daily quota: the only users who may ever be over one."""
    return frozenset(
        user for group in groups if group.gpu_hours_per_day is not None for user in group.members
    )


class _PerUser(Mapping[str, float]):
    """A read-only mapping that computes ``value(user)`` once per user, when first asked."""

    def __init__(self, value: Callable[[str], float]) -> None:
        self._value = value
        self._seen: dict[str, float] = {}

    def __getitem__(self, user: str) -> float:
        if user not in self._seen:
            self._seen[user] = self._value(user)
        return self._seen[user]

    def get(self, user: str, default: object = None) -> float:  # type: ignore[override]
        return self[user]

    def __iter__(self) -> Iterator[str]:
        return iter(self._seen)

    def __len__(self) -> int:
        return len(self._seen)
