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
- with ``policy.members_only``, a user in no group is refused;
- a member of groups may lease only kinds one of their groups allows, at most
  ``max_slots_per_user`` per group; everyone at most ``policy.max_leases_per_user``;
- a user whose GPU time today (UTC) reached their group's ``gpu_hours_per_day`` is refused
  (queued requests are dropped), and a lease that crosses it gets ``SuspendIdle("quota")``;
- the queue is served in ``grant_order``; a class in session keeps its reserved slots;
- a granted lease without a heartbeat for ``heartbeat_timeout`` expires: its slot is fenced
  (``FenceNeeded``) and granted again only after ``Fenced(ok=True)`` or ``ResetSlot``;
- idle leases get ``SuspendIdle`` (idle, idle while someone waits, released after a cell while
  someone waits when per-cell binding is on, max lease; never a busy one for idleness);
  a queued request older than ``queue_timeout`` is dropped (0: never).
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
    grant_order,
    pick_slot,
    reservation_needs,
)
from broker.core.idle import FORCED, asked_recently, slot_wanted, suspend_reason, wanted_kinds
from broker.core.leases import ANY_KIND, Lease, fits
from broker.core.policy import Policy, may_hold
from broker.core.queue import in_grant_order
from broker.core.quota import UsageRecord, day_of, quota_message
from broker.core.slots import Fence, SlotState
from broker.core.state import SchedulerState, quota_users

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
                queued = replace(lease, state="queued", slot_id=None, granted_at=None, group=None)
                self._leases[lease.id] = queued
                self._queue.add(queued)
        self._now = now
        self._queue.invalidate()
        return self._assign(now)

    # -- events ----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Decision]:
        """Apply one event; return what changed, in order."""
        if not isinstance(event, Heartbeat | RequestLease) and event.now != self._now:
            self._queue.invalidate()  # aging and usage move with time: sort again when read
        self._now = event.now
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
            self._queue.invalidate()  # priorities and groups may have changed
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
        if self.policy.members_only and not self.groups_of(event.user):
            names = ", ".join(group.name for group in self.policy.groups) or "none yet"
            reason = (
                f"the GPU pool is only for members of its classes ({names}) and "
                f"{event.user!r} is in none: ask your teacher to add you to your class's group"
            )
            return [Refused(event.lease_id, reason, "not_a_member")]
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
            request_id=event.request_id,
        )
        self._next_seq += 1
        self._leases[lease.id] = lease
        self._queue.add(lease)
        decisions = self._assign(event.now)
        if lease.id not in self._queue:
            return decisions
        most = self.policy.max_queued_per_user
        if self._queue.count(lease.user) > most:
            self._end(lease, event.now)  # it may not wait: as if it never came
            reason = (
                f"you already have {most} request{'s' if most != 1 else ''} waiting for a GPU "
                f"slot (at most {most} per user): wait for one of them to be granted, or stop "
                "a kernel that is waiting"
            )
            return [*decisions, Refused(lease.id, reason, "queue_full")]
        position = self.position(lease.id)
        assert position is not None
        return [*decisions, Queued(lease.id, position)]

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
        fence = event.reason == "kernel_may_run" and lease.slot_id is not None
        self._end(lease, event.now, fence=fence)
        out: list[Decision] = [Released(lease.id, lease.slot_id, event.reason)]
        if fence:
            assert lease.slot_id is not None
            out.append(self._fence_needed(lease.slot_id))
        return [*out, *self._assign(event.now)]

    def _heartbeat(self, event: Heartbeat) -> list[Decision]:
        lease = self._leases.get(event.lease_id)
        if lease is None:
            return []
        activity = event.last_activity if event.last_activity is not None else lease.last_activity
        if activity is not None and lease.granted_at is not None:
            activity = max(activity, lease.granted_at)  # idle time never counts from before it
        asked = lease.suspend_requested_at
        used = event.busy or (activity is not None and asked is not None and activity > asked)
        if asked is not None and used and lease.forced_at is None:
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
                reason = None
                if now - last > self.policy.heartbeat_timeout:
                    reason = "heartbeat_timeout"
                elif _ignored(lease, now, self.policy):
                    reason = "suspend_ignored"  # a forced order not obeyed: quotas must hold
                if reason is not None:
                    self._end(lease, now, fence=True)
                    decisions.append(Expired(lease.id, lease.slot_id, reason))
                    decisions.append(self._fence_needed(lease.slot_id))
            elif (
                self.policy.queue_timeout > 0 and now - lease.created_at > self.policy.queue_timeout
            ):
                self._end(lease, now)
                decisions.append(Dropped(lease.id, "queue_timeout"))
        retries = self.pool.fence_retries(now, self.policy.fence_retry)
        decisions.extend(_need(fence) for fence in retries)
        decisions.extend(self._suspensions(now))
        decisions.extend(self._assign(now))
        if day_of(now) != self._pruned_day:
            self._pruned_day = day_of(now)
            self.usage.prune(now)
        return decisions

    def _suspensions(self, now: float) -> list[Decision]:
        """SuspendIdle for each granted lease that should give its slot back (``core.idle``)."""
        policy = self.policy
        wanted: list[set[str]] = []  # worked out once, when a lease first needs it
        over: dict[str, bool] = {}  # user -> over today's quota (no groups: nobody)
        out: list[Decision] = []
        for lease in self.leases():
            if lease.state != "granted" or lease.slot_id is None:
                continue
            if asked_recently(lease, now, policy):
                continue
            if lease.user not in over:
                over[lease.user] = lease.user in self._quota_users and self.over_quota(
                    lease.user, now
                )
            reason = suspend_reason(
                lease,
                now,
                policy,
                over[lease.user],
                partial(self._is_wanted, lease.slot_id, wanted),
            )
            if reason is not None:
                forced_at = lease.forced_at
                if reason in FORCED and forced_at is None:
                    forced_at = now
                self._leases[lease.id] = replace(
                    lease, suspend_requested_at=now, suspend_reason=reason, forced_at=forced_at
                )
                out.append(SuspendIdle(lease.id, reason))
        return out

    def _is_wanted(self, slot_id: str, wanted: list[set[str]]) -> bool:
        if not wanted:
            wanted.append(wanted_kinds(self.waiting(), self.groups_of))
        return slot_wanted(self.pool.get(slot_id), wanted[0])

    def _reconfigure(self, event: Reconfigure) -> list[Decision]:
        self.policy = replace(event.policy, groups=tuple(event.groups))
        self._quota_users = quota_users(self.policy.groups)
        self._groups_of = {}
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

    def _assign(self, now: float) -> list[Decision]:
        """Offer the free slots to the queue in ``grant_order`` (after any change). Only the
        requests that could take a free slot's kind are sorted, at ``now``; a request of a user
        over today's quota is dropped once any slot is on offer."""
        if not self._queue or not self.pool.any_free():
            return []
        out = self._drop_over_quota(now)
        free_kinds = self.pool.free_kinds()
        candidates = self._queue.of_kinds([*free_kinds, ANY_KIND])
        if not candidates:
            return out
        sessions = tuple(g for g in self.policy.groups if g.in_session(now) is not None)
        reservations = reservation_needs(sessions, self.holders(), now) if sessions else []
        for lease_id in in_grant_order(candidates, self._leases, self._key_at(now)):
            lease = self._leases[lease_id]
            if not may_hold(self.held_by(lease.user), self.policy):
                continue
            groups = self.groups_of(lease.user)
            held = {group.name: self.held_in_group(lease.user, group.name) for group in groups}
            picked = pick_slot(self.pool, lease, groups, held, reservations)
            if picked is None:
                continue
            slot_id, group = picked
            self._queue.remove(lease)
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
                reservations = reservation_needs(sessions, self.holders(), now)
        return out

    def _drop_over_quota(self, now: float) -> list[Decision]:
        """Drop the queued requests of users whose GPU time today reached their quota. A request
        is refused when its user is over quota already, so only users whose usage grew since
        (a slot held now, or a lease ended) can have crossed it."""
        out: list[Decision] = []
        grew, self._ended_since_check = self._ended_since_check, set()
        users = [
            user
            for user in self._queue.users()
            if user in self._quota_users and (user in self._granted or user in grew)
        ]
        for user in users:
            quota = self.quota_seconds(user)
            if quota is None or self.usage_today(user, now) < quota:
                continue
            for lease in [q for q in self.waiting() if q.user == user]:
                self._end(lease, now)
                out.append(Dropped(lease.id, quota_message(quota / 3600.0, now)))
        return out

    def _fence_needed(self, slot_id: str) -> FenceNeeded:
        fence = self.pool.fence_of(slot_id)
        assert fence is not None
        return _need(fence)


def _ignored(lease: Lease, now: float, policy: Policy) -> bool:
    """True when ``lease`` still holds its slot ``policy.obey_within`` after a forced order."""
    return lease.forced_at is not None and now - lease.forced_at > policy.obey_within


def _need(fence: Fence) -> FenceNeeded:
    return FenceNeeded(fence.slot_id, fence.lease_id, fence.host, fence.kernel_id)
