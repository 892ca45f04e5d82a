"""The scheduler core: who gets which GPU slot, and when. Pure: no clock, no I/O, no tornado.

Read it like h11's ``_state.py``. The broker's service (``broker.service.service.BrokerService``)
turns each HTTP request, admin command and periodic tick into one *event* (``broker.core.events``:
``RequestLease``, ``Release``, ``Heartbeat``, ``Tick``, ``SetDrain``, ``Reconfigure``, ``Fenced``,
``ResetSlot``), calls ``Scheduler.handle(event)``, and gets back a list of *decisions* (``Granted``,
``Queued``, ``Released``, ``Expired``, ``Dropped``, ``Refused``, ``FenceNeeded``, ``SuspendIdle``)
that it persists in one transaction and acts on. Every event carries ``now`` (unix seconds): the
scheduler never reads a clock, so tests drive it with plain numbers.

Rules (``broker.core.fairness`` holds the order and the reservations, ``broker.core.quota`` the
usage):

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
from dataclasses import replace
from functools import partial

from broker.core.events import (
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
from broker.core.fairness import (
    GrantContext,
    blocked,
    charge_group,
    grant_order,
    reservation_needs,
)
from broker.core.groups import GroupConfig
from broker.core.idle import asked_recently, slot_wanted, suspend_reason, wanted_kinds
from broker.core.leases import ANY_KIND, Lease, fits
from broker.core.policy import Policy, may_hold
from broker.core.quota import UsageRecord, day_of, quota_message
from broker.core.slots import Fence, SlotState
from broker.core.state import SchedulerState

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


class Scheduler(SchedulerState):
    """Holds the pool's slots and the live leases; ``handle`` is the only way to change them.
    ``groups`` (or ``policy.groups``) turn on group rules; without any, every user is open."""

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
            prefer_host=event.prefer_host,
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
                    decisions.append(_fence_needed(fence))
            elif (
                self.policy.queue_timeout > 0 and now - lease.created_at > self.policy.queue_timeout
            ):
                self._end(lease, now)
                decisions.append(Dropped(lease.id, "queue_timeout"))
        retries = self.pool.fence_retries(now, self.policy.fence_retry)
        decisions.extend(_fence_needed(fence) for fence in retries)
        decisions.extend(self._suspensions(now))
        decisions.extend(self._assign(now))
        if day_of(now) != self._pruned_day:
            self._pruned_day = day_of(now)
            self.usage.prune(now)
        return decisions

    def _suspensions(self, now: float) -> list[Decision]:
        """SuspendIdle for each granted lease that should give its slot back (``core.idle``)."""
        policy = self.policy
        wanted = wanted_kinds(self.queue(), self.groups_of)
        over: dict[str, bool] = {}  # user -> over today's quota (no groups: nobody)
        out: list[Decision] = []
        for lease in self.leases():
            if lease.state != "granted" or lease.slot_id is None:
                continue
            if asked_recently(lease, now, policy):
                continue
            if lease.user not in over:
                over[lease.user] = bool(policy.groups) and self.over_quota(lease.user, now)
            reason = suspend_reason(
                lease,
                now,
                policy,
                over[lease.user],
                partial(self._is_wanted, lease.slot_id, wanted),
            )
            if reason is not None:
                self._leases[lease.id] = replace(
                    lease, suspend_requested_at=now, suspend_reason=reason
                )
                out.append(SuspendIdle(lease.id, reason))
        return out

    def _is_wanted(self, slot_id: str, wanted: set[str]) -> bool:
        return slot_wanted(self.pool.get(slot_id), wanted)

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

    # -- granting --------------------------------------------------------------------------

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

    def _pick(self, lease: Lease, reservations: list) -> tuple[str, str | None] | None:
        """The grantable slot the lease may take (on its ``prefer_host`` if one is free there,
        else the first in pool order), and the group charged."""
        groups = self.groups_of(lease.user)
        held = {group.name: self.held_in_group(lease.user, group.name) for group in groups}
        free = self.pool.free_counts() if reservations else {}
        kinds = self.pool.free_kinds() if lease.kind == ANY_KIND else [lease.kind]
        best: tuple[tuple[bool, int], str | None] | None = None  # (rank, group charged)
        for kind in kinds:
            rank = self._rank(kind, lease.prefer_host)
            if rank is None or (best is not None and rank > best[0]):
                continue
            group = None
            if groups:
                charged = charge_group(kind, groups, held)
                if charged is None:
                    continue
                group = charged.name
            if reservations and blocked(lease.user, kind, reservations, free):
                continue
            best = (rank, group)
        if best is None:
            return None
        return self.pool.id_at(best[0][1]), best[1]

    def _rank(self, kind: str, host: str | None) -> tuple[bool, int] | None:
        """The first free slot of ``kind``: (not on ``host``, pool index), lowest first."""
        if host is not None:
            index = self.pool.first_free_on(kind, host)
            if index is not None:
                return (False, index)
        index = self.pool.first_free(kind)
        return None if index is None else (True, index)


def _fence_needed(fence: Fence) -> FenceNeeded:
    return FenceNeeded(fence.slot_id, fence.lease_id, fence.host, fence.kernel_id)


_ = ENDING  # re-exported
