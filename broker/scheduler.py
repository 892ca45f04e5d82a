"""The scheduler core: who gets which GPU slot, and when. Pure: no clock, no I/O, no tornado.

Read it like h11's ``_state.py``. The broker's service (``broker.server.BrokerService``) turns
each HTTP request, admin command and periodic tick into one *event* (``broker.events``:
``RequestLease``, ``Release``, ``Heartbeat``, ``Tick``, ``SetDrain``, ``Reconfigure``, ``Fenced``,
``ResetSlot``), calls ``Scheduler.handle(event)``, and gets back a list of *decisions*
(``Granted``, ``Queued``, ``Released``, ``Expired``, ``Dropped``, ``Refused``, ``FenceNeeded``,
``SuspendIdle``) that it persists in one transaction and acts on. Every event carries ``now``
(unix seconds): the scheduler never reads a clock, so tests drive it with plain numbers.

Rules (``broker.fairness`` holds the order and the reservations, ``broker.quota`` the usage):

- a request for kind K (or "any") gets a free *grantable* slot of that kind (not drained, not
  being fenced, not unreachable), else it waits; a kind the pool lacks is refused;
- a member of groups may lease only kinds one of their groups allows, at most
  ``max_slots_per_user`` per group; everyone at most ``policy.max_leases_per_user``;
- a user whose GPU time today (UTC) reached their group's ``gpu_hours_per_day`` is refused
  (queued requests are dropped), and a lease that crosses it gets ``SuspendIdle("quota")``;
- the queue is served in ``grant_order``; a class in session keeps its reserved slots;
- a granted lease without a heartbeat for ``heartbeat_timeout`` expires: its slot is fenced
  (``FenceNeeded``) and granted again only after ``Fenced(ok=True)`` or ``ResetSlot``;
- idle leases get ``SuspendIdle`` (idle, idle while someone waits, max lease; never a busy one
  for idleness); a queued request older than ``queue_timeout`` is dropped (0: never).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from broker.classes import GroupConfig
from broker.events import (
    ENDING,
    Decision,
    Dropped,
    Event,
    Expired,
    Fenced,
    FenceNeeded,
    Granted,
    Heartbeat,
    Queued,
    Reconfigure,
    Refused,
    Release,
    Released,
    RequestLease,
    ResetSlot,
    SetDrain,
    SuspendIdle,
    Tick,
)
from broker.fairness import (
    ANY_KIND,
    GrantContext,
    blocked,
    charge_group,
    grant_order,
    groups_for,
    quota_hours,
    reservation_needs,
)
from broker.quota import UsageLedger, UsageRecord, day_of, overlap_today, quota_message
from broker.slots import Fence, SlotPool, SlotState

if TYPE_CHECKING:
    from broker.config import PolicyConfig

__all__ = [
    "ANY_KIND",
    "ENDING",
    "Decision",
    "Dropped",
    "Event",
    "Expired",
    "Fence",
    "FenceNeeded",
    "Fenced",
    "GrantContext",
    "Granted",
    "Heartbeat",
    "Lease",
    "Policy",
    "Queued",
    "Reconfigure",
    "Refused",
    "Release",
    "Released",
    "RequestLease",
    "ResetSlot",
    "Scheduler",
    "SetDrain",
    "SlotState",
    "SuspendIdle",
    "Tick",
    "UsageRecord",
    "fits",
    "grant_order",
    "may_hold",
]

LeaseState = Literal["queued", "granted", "released", "expired"]


@dataclass(frozen=True)
class Lease:
    """One lease. The scheduler holds only live ones (queued or granted); the store keeps all."""

    id: str
    user: str
    kind: str
    kernel_id: str
    seq: int
    created_at: float
    state: LeaseState = "queued"
    slot_id: str | None = None
    granted_at: float | None = None
    last_heartbeat: float | None = None
    busy: bool = False
    last_activity: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None  # "released", "heartbeat_timeout", "queue_timeout"
    group: str | None = None  # the group whose max_slots_per_user this lease counts against
    suspend_requested_at: float | None = None  # when SuspendIdle was last issued for it
    suspend_reason: str | None = None


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
    aging_after: float | None = None  # None: 4 x idle_suspend_when_queued, at least 2 min
    groups: tuple[GroupConfig, ...] = ()

    @property
    def aging(self) -> float:
        """A request waiting this long goes before newer ones, whatever its usage."""
        if self.aging_after is not None:
            return self.aging_after
        return max(120.0, 4 * self.idle_suspend_when_queued)

    @classmethod
    def from_config(cls, config: PolicyConfig, groups: Iterable[GroupConfig] = ()) -> Policy:
        """The scheduler's policy from ``Config.policy`` and ``Config.groups``."""
        return cls(
            heartbeat_timeout=config.heartbeat_timeout,
            queue_timeout=config.queue_timeout,
            max_leases_per_user=config.max_leases_per_user,
            idle_suspend_after=config.idle_suspend_after,
            idle_suspend_when_queued=config.idle_suspend_when_queued,
            max_lease=config.max_lease,
            usage_half_life=config.usage_half_life,
            fence_retry=config.fence_retry,
            groups=tuple(groups),
        )


def fits(lease: Lease, slot: SlotState) -> bool:
    """True when ``slot`` is free, not drained and of the kind ``lease`` asks for."""
    return (
        slot.lease_id is None
        and not slot.drained
        and (lease.kind == ANY_KIND or lease.kind == slot.kind)
    )


def _since(start: float | None, now: float) -> float:
    """``start``, or ``now`` when there is none (0.0 is a valid time in tests)."""
    return now if start is None else start


def may_hold(held: int, policy: Policy) -> bool:
    """True when a user holding ``held`` granted leases may be granted one more."""
    return held < policy.max_leases_per_user


class Scheduler:
    """Holds the pool's slots and the live leases; ``handle`` is the only way to change them.
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
        self._queue: list[str] = []  # lease ids, in grant_order as of the last event
        self._next_seq = next_seq
        self._granted: dict[str, tuple[str, ...]] = {}  # user -> granted lease ids
        self._in_group: dict[tuple[str, str], int] = {}  # (user, group) -> granted leases
        self.usage = UsageLedger(self.policy.usage_half_life)
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
        """All live leases, in seq order."""
        return sorted(self._leases.values(), key=lambda lease: lease.seq)

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
        """Queued leases, first to be served first."""
        return [self._leases[lease_id] for lease_id in self._queue]

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def positions(self) -> dict[str, int]:
        """Lease id -> queue position, 1..n."""
        return {lease_id: index for index, lease_id in enumerate(self._queue, start=1)}

    def position(self, lease_id: str) -> int | None:
        try:
            return self._queue.index(lease_id) + 1
        except ValueError:
            return None

    def held_by(self, user: str) -> int:
        """How many granted leases ``user`` holds."""
        return len(self._granted.get(user, ()))

    def held_in_group(self, user: str, group: str) -> int:
        """How many of ``user``'s granted leases count against ``group``'s slots per user."""
        return self._in_group.get((user, group), 0)

    def groups_of(self, user: str) -> tuple[GroupConfig, ...]:
        """``user``'s groups, highest priority first (empty: an open user)."""
        return groups_for(user, self.policy.groups)

    def quota_seconds(self, user: str) -> float | None:
        """``user``'s GPU-seconds per UTC day, or None for no limit."""
        hours = quota_hours(self.groups_of(user))
        return None if hours is None else hours * 3600.0

    def usage_today(self, user: str, now: float) -> float:
        """GPU-seconds ``user`` used on ``now``'s UTC day: ended leases and live ones."""
        used = self.usage.used_on(user, day_of(now))
        for lease_id in self._granted.get(user, ()):
            lease = self._leases[lease_id]
            used += overlap_today(_since(lease.granted_at, now), now, now)
        return used

    def recent_usage(self, user: str, now: float) -> float:
        """Decayed GPU-seconds of ``user`` (fair order): ended leases decayed, live ones whole."""
        used = self.usage.decayed_at(user, now)
        for lease_id in self._granted.get(user, ()):
            used += max(0.0, now - _since(self._leases[lease_id].granted_at, now))
        return used

    def snapshot(self) -> tuple:
        """An opaque copy of the state; ``rollback(snapshot)`` returns to it (the service does
        so when the store fails to commit an event's decisions)."""
        return (
            self.policy,
            self.pool.state_copy(),
            dict(self._leases),
            list(self._queue),
            self._next_seq,
            dict(self._granted),
            dict(self._in_group),
            self.usage.state(),
            self._pruned_day,
        )

    def rollback(self, snapshot: tuple) -> None:
        policy, pool, leases, queue, next_seq, granted, in_group, usage, pruned = snapshot
        self.policy, self._next_seq, self._pruned_day = policy, next_seq, pruned
        self.pool.set_state(pool)
        self._leases, self._queue = dict(leases), list(queue)
        self._granted, self._in_group = dict(granted), dict(in_group)
        self.usage.half_life = policy.usage_half_life
        self.usage.set_state(usage)

    # -- restoring after a restart ---------------------------------------------------------

    def restore_usage(self, records: Iterable[UsageRecord]) -> None:
        """Load ended leases (the service feeds those of the last 2 days from the store), so
        quotas and fair order survive a restart. Call before ``restore``."""
        for record in records:
            self.usage.add(record)

    def restore_fences(self, fences: Iterable[Fence], now: float) -> None:
        """Load slots that were being fenced when the broker stopped; they come back
        unreachable and the next ``Tick`` asks for fencing again. Unknown slots are skipped."""
        for fence in fences:
            self.pool.restore_fence(fence)

    def restore(self, leases: Iterable[Lease], now: float) -> list[Decision]:
        """Load live leases from the store (broker start). Granted ones keep their slots and get
        a fresh heartbeat deadline (clients could not reach a stopped broker). A granted lease
        whose slot is gone from the config goes back to the queue. Returns the grants this made.
        """
        for lease in sorted(leases, key=lambda lease: lease.seq):
            self._next_seq = max(self._next_seq, lease.seq + 1)
            slot = self.pool.get(lease.slot_id or "")
            if lease.state == "granted" and slot is not None and slot.lease_id is None:
                group = self._attribute(lease.user, slot.kind)
                self._take(slot.id, replace(lease, last_heartbeat=now, group=group))
            else:
                self._leases[lease.id] = replace(
                    lease, state="queued", slot_id=None, granted_at=None, group=None
                )
                self._queue.append(lease.id)
        return self._assign(now)

    # -- events ----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Decision]:
        """Apply one event; return what changed, in order."""
        if isinstance(event, RequestLease):
            return self._request(event)
        if isinstance(event, Release):
            return self._release(event)
        if isinstance(event, Heartbeat):
            return self._heartbeat(event)
        if isinstance(event, Tick):
            return self._tick(event.now)
        if isinstance(event, SetDrain):
            self.pool.set_drain(event.host, event.drained)
            return self._assign(event.now)
        if isinstance(event, Reconfigure):
            return self._reconfigure(event)
        if isinstance(event, Fenced):
            self.pool.fenced(event.slot_id, event.ok, event.now)
            return self._assign(event.now)
        if isinstance(event, ResetSlot):
            self.pool.reset(event.slot_id)
            return self._assign(event.now)
        raise TypeError(f"not a scheduler event: {event!r}")

    def _request(self, event: RequestLease) -> list[Decision]:
        if event.lease_id in self._leases:
            raise ValueError(f"lease id {event.lease_id!r} is already in use")
        reason = self._refusal(event.user, event.kind, event.now)
        if reason is not None:
            return [Refused(event.lease_id, reason)]
        lease = Lease(
            id=event.lease_id,
            user=event.user,
            kind=event.kind,
            kernel_id=event.kernel_id,
            seq=self._next_seq,
            created_at=event.now,
        )
        self._next_seq += 1
        self._leases[lease.id] = lease
        self._queue.append(lease.id)
        decisions = self._assign(event.now)
        if lease.id in self._queue:
            decisions.append(Queued(lease.id, self._queue.index(lease.id) + 1))
        return decisions

    def _refusal(self, user: str, kind: str, now: float) -> str | None:
        """Why a request can never be granted now, or None."""
        kinds = self.kinds
        if kind != ANY_KIND and kind not in kinds:
            listed = ", ".join(repr(k) for k in kinds) or "none"
            return f"no slot of kind {kind!r} in the pool; kinds: {listed} (or 'any')"
        groups = self.groups_of(user)
        if kind != ANY_KIND and groups and not any(group.allows(kind) for group in groups):
            allowed = sorted({k for group in groups for k in group.kinds})
            names = ", ".join(group.name for group in groups)
            return f"kind {kind!r} is not open to your groups ({names}); ask for " + " or ".join(
                repr(k) for k in allowed
            )
        quota = self.quota_seconds(user)
        if quota is not None and self.usage_today(user, now) >= quota:
            return quota_message(quota / 3600.0, now)
        return None

    def _release(self, event: Release) -> list[Decision]:
        lease = self._leases.get(event.lease_id)
        if lease is None:
            return []
        self._end(lease, event.now)
        return [Released(lease.id, lease.slot_id, event.reason), *self._assign(event.now)]

    def _heartbeat(self, event: Heartbeat) -> list[Decision]:
        lease = self._leases.get(event.lease_id)
        if lease is None:
            return []
        activity = event.last_activity if event.last_activity is not None else lease.last_activity
        asked = lease.suspend_requested_at
        if asked is not None and (event.busy or (activity is not None and activity > asked)):
            asked = None  # used since we asked: that order is moot; decide afresh when idle again
        self._leases[lease.id] = replace(
            lease,
            last_heartbeat=event.now,
            busy=event.busy,
            last_activity=activity,
            suspend_requested_at=asked,
        )
        return []

    def _tick(self, now: float) -> list[Decision]:
        decisions: list[Decision] = []
        for lease in self.leases():
            if lease.state == "granted" and lease.slot_id is not None:
                last = lease.last_heartbeat if lease.last_heartbeat is not None else now
                if now - last > self.policy.heartbeat_timeout:
                    self._end(lease, now, fence=True)
                    decisions.append(Expired(lease.id, lease.slot_id))
                    fence = self.pool.fence_of(lease.slot_id)
                    assert fence is not None
                    decisions.append(fence.decision())
            elif (
                self.policy.queue_timeout > 0 and now - lease.created_at > self.policy.queue_timeout
            ):
                self._end(lease, now)
                decisions.append(Dropped(lease.id, "queue_timeout"))
        decisions.extend(self.pool.fence_retries(now, self.policy.fence_retry))
        decisions.extend(self._suspensions(now))
        decisions.extend(self._assign(now))
        if day_of(now) != self._pruned_day:
            self._pruned_day = day_of(now)
            self.usage.prune(now)
        return decisions

    def _suspensions(self, now: float) -> list[Decision]:
        """SuspendIdle for each granted lease that should give its slot back (see module doc)."""
        policy = self.policy
        wanted = self._wanted_kinds()
        out: list[Decision] = []
        for lease in self.leases():
            if lease.state != "granted" or lease.slot_id is None:
                continue
            asked = lease.suspend_requested_at
            if asked is not None and now - asked < policy.suspend_retry:
                continue
            quota = self.quota_seconds(lease.user)
            idle = now - (lease.last_activity if lease.last_activity is not None else 0.0)
            idle = min(idle, now - _since(lease.granted_at, now))
            reason = None
            if quota is not None and self.usage_today(lease.user, now) >= quota:
                reason = "quota"
            elif now - _since(lease.granted_at, now) >= policy.max_lease:
                reason = "max_lease"
            elif lease.busy:
                continue
            elif idle >= policy.idle_suspend_after:
                reason = "idle"
            elif idle >= policy.idle_suspend_when_queued and self._is_wanted(lease.slot_id, wanted):
                reason = "idle_while_queued"
            if reason is not None:
                self._leases[lease.id] = replace(
                    lease, suspend_requested_at=now, suspend_reason=reason
                )
                out.append(SuspendIdle(lease.id, reason))
        return out

    def _wanted_kinds(self) -> set[str]:
        """Kinds some queued request could use ("*": any kind)."""
        wanted: set[str] = set()
        for lease in self.queue():
            groups = self.groups_of(lease.user)
            if lease.kind != ANY_KIND:
                if not groups or any(group.allows(lease.kind) for group in groups):
                    wanted.add(lease.kind)
            elif not groups or any(not group.kinds for group in groups):
                wanted.add("*")
            else:
                wanted.update(k for group in groups for k in group.kinds)
        return wanted

    def _is_wanted(self, slot_id: str, wanted: set[str]) -> bool:
        slot = self.pool.get(slot_id)
        return slot is not None and not slot.retired and ("*" in wanted or slot.kind in wanted)

    def _reconfigure(self, event: Reconfigure) -> list[Decision]:
        self.policy = replace(event.policy, groups=tuple(event.groups))
        self.usage.half_life = self.policy.usage_half_life
        self.pool.reconfigure(event.slots)
        self._in_group = {}
        for lease in self.leases():
            if lease.state == "granted" and lease.slot_id is not None:
                slot = self.pool.get(lease.slot_id)
                assert slot is not None
                group = self._attribute(lease.user, slot.kind)
                self._leases[lease.id] = replace(lease, group=group)
                if group is not None:
                    key = (lease.user, group)
                    self._in_group[key] = self._in_group.get(key, 0) + 1
        return self._assign(event.now)

    # -- internals -------------------------------------------------------------------------

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
            self._queue.remove(lease.id)
            return
        self.usage.add(UsageRecord(lease.user, _since(lease.granted_at, now), now))
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
        self.pool.occupy(slot_id, lease.id)
        self._leases[lease.id] = lease
        self._granted[lease.user] = (*self._granted.get(lease.user, ()), lease.id)
        if lease.group is not None:
            key = (lease.user, lease.group)
            self._in_group[key] = self._in_group.get(key, 0) + 1

    def _context(self, now: float, session_groups: tuple[GroupConfig, ...]) -> GrantContext:
        users = {self._leases[lease_id].user for lease_id in self._queue}
        priority = {}
        for user in users:
            groups = self.groups_of(user)
            if groups:
                priority[user] = groups[0].priority
        return GrantContext(
            now=now,
            aging_after=self.policy.aging,
            usage={user: self.recent_usage(user, now) for user in users},
            priority=priority,
            session_groups=session_groups,
        )

    def _assign(self, now: float) -> list[Decision]:
        """Sort the queue, then offer the free slots to it in that order (after any change)."""
        if not self._queue:
            return []
        sessions = tuple(g for g in self.policy.groups if g.in_session(now) is not None)
        if len(self._queue) > 1:
            order = grant_order(self.queue(), self._context(now, sessions))
            self._queue = [lease.id for lease in order]
        out: list[Decision] = []
        if not self.pool.any_free():
            return out
        reservations = reservation_needs(sessions, self._holders(), now) if sessions else []
        for lease in self.queue():
            if not may_hold(self.held_by(lease.user), self.policy):
                continue
            quota = self.quota_seconds(lease.user)
            if quota is not None and self.usage_today(lease.user, now) >= quota:
                self._end(lease, now)
                out.append(Dropped(lease.id, quota_message(quota / 3600.0, now)))
                continue
            picked = self._pick(lease, reservations)
            if picked is None:
                continue
            slot_id, group = picked
            self._queue.remove(lease.id)
            granted = replace(
                lease,
                state="granted",
                slot_id=slot_id,
                granted_at=now,
                last_heartbeat=now,
                group=group,
            )
            self._take(slot_id, granted)
            out.append(Granted(lease.id, slot_id))
            if not self.pool.any_free():
                break
            if reservations:
                reservations = reservation_needs(sessions, self._holders(), now)
        return out

    def _holders(self) -> list[tuple[str, str]]:
        out = []
        for lease in self._leases.values():
            if lease.slot_id is not None:
                slot = self.pool.get(lease.slot_id)
                if slot is not None:
                    out.append((lease.user, slot.kind))
        return out

    def _pick(self, lease: Lease, reservations: list) -> tuple[str, str | None] | None:
        """The first grantable slot in pool order the lease may take, and the group charged."""
        groups = self.groups_of(lease.user)
        held = {group.name: self.held_in_group(lease.user, group.name) for group in groups}
        free = self.pool.free_counts() if reservations else {}
        kinds = self.pool.free_kinds() if lease.kind == ANY_KIND else [lease.kind]
        best: tuple[int, str | None] | None = None
        for kind in kinds:
            index = self.pool.first_free(kind)
            if index is None or (best is not None and index > best[0]):
                continue
            group = None
            if groups:
                charged = charge_group(kind, groups, held)
                if charged is None:
                    continue
                group = charged.name
            if reservations and blocked(lease.user, kind, reservations, free):
                continue
            best = (index, group)
        if best is None:
            return None
        return self.pool.id_at(best[0]), best[1]


_ = ENDING  # re-exported
