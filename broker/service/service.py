"""``BrokerService``: the scheduler, the store and the clock tied together, on one IOLoop.

The HTTP handlers (``broker.http.handlers``, ``broker.http.admin``) call it; ``BrokerServer``
(``broker.daemon``) ticks it. Each request becomes one scheduler event with ``now`` from the clock;
its decisions and the rows they touch commit in ONE store transaction before the reply; long-polls
waiting on the leases that changed are woken. Decisions that need the outside world are executed
after the commit: ``SuspendIdle`` becomes a ``{"order": "suspend"}`` in the lease's next heartbeat
reply; ``FenceNeeded`` and old checkpoints go to ``self.hosts``
(``broker.service.effects.HostJobs``; ``record_decisions`` there also writes each event's decisions
to the store). A kernel id belongs to the user who first leased it; a request id makes a retried
request return its first lease.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping

import tornado.locks
import tornado.util

from broker.config.hosts import SlotConfig
from broker.config.loader import Config
from broker.config.policy import scheduler_policy as policy_of
from broker.core.idle import FORCED
from broker.core.scheduler import (
    Decision,
    Dropped,
    Event,
    Expired,
    Fence,
    FenceNeeded,
    Granted,
    Heartbeat,
    Lease,
    Policy,
    Reconfigure,
    Refused,
    Release,
    Released,
    RequestLease,
    ResetSlot,
    Scheduler,
    SetDrain,
    SlotState,
    SuspendIdle,
    Tick,
    UsageRecord,
)
from broker.errors import BrokerError
from broker.hosts.fencing import HostWork
from broker.service.effects import HostJobs, record_decisions
from broker.service.metrics import Metrics
from broker.store.host_records import CheckpointRow
from broker.store.sqlite import Store

log = logging.getLogger("broker")

MAX_LEASES_PER_USER = 4
USAGE_WINDOW_HALF_LIVES = 4  # ended leases restored into the scheduler's decayed usage


class LeaseRefused(BrokerError):
    """A lease request that cannot be granted (e.g. a kind the pool does not have), or may not
    wait (``code`` "queue_full")."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class NotYours(BrokerError):
    """The request names a kernel id that another user leased first (it is theirs for good)."""


class RequestConflict(BrokerError):
    """A request id already made a lease, with another kind or kernel id."""


def scheduler_policy(config: Config, max_leases_per_user: int | None = None) -> Policy:
    """The scheduler's Policy from the config's ``[policy]`` and groups."""
    policy = policy_of(config.policy, config.groups)
    if max_leases_per_user is not None:
        policy = dataclasses.replace(policy, max_leases_per_user=max_leases_per_user)
    return policy


class BrokerService:
    """State and rules of one running broker. Single-threaded: call it from its IOLoop only."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: Callable[[], float] = time.time,
        max_leases_per_user: int | None = None,
        work: HostWork | None = None,
    ) -> None:
        self.config = config  # in effect: the file's, with the hub groups' members added
        self.base_config = config  # as loaded from the file
        self._hub_members: dict[str, frozenset[str]] = {}
        self.store = store
        self.clock = clock
        self.metrics = Metrics()
        self.work = work or HostWork()
        self._max_per_user = max_leases_per_user
        self._changed: dict[str, tornado.locks.Event] = {}
        self._orders: dict[str, str] = {}  # lease id -> the reason of its undelivered order
        self.hosts = HostJobs(
            lambda: self.config, store, clock, self.metrics, self.work, self._apply, self.slot_state
        )
        self._drains = store.drained_hosts()
        self._slot_index = {slot.id: slot for slot in config.slots}
        self.scheduler = self._load_scheduler()
        now = clock()
        decisions = self.scheduler.restore(store.live_leases(), now)
        with store.transaction():
            for lease in self.scheduler.leases():
                store.put_lease(lease)
            record_decisions(self.store, decisions, now)
            store.log(now, "broker_started", restored=len(self.scheduler.leases()))

    # -- what the API calls ----------------------------------------------------------------

    def lease(self, lease_id: str) -> Lease | None:
        """The lease, live (from memory) or ended (from the store)."""
        return self.scheduler.lease(lease_id) or self.store.get_lease(lease_id)

    def request_lease(
        self,
        lease_id: str,
        user: str,
        kind: str,
        kernel_id: str,
        prefer_host: str | None = None,
        request_id: str | None = None,
    ) -> Lease:
        """A new lease (granted or queued); with ``request_id`` a retry of the same request
        returns the lease the first try made. Raises LeaseRefused, NotYours (the kernel id is
        another user's) and RequestConflict (the request id made another lease)."""
        if request_id is not None:
            earlier = self.store.lease_by_request(user, request_id)
            if earlier is not None:
                if (earlier.kind, earlier.kernel_id) != (kind, kernel_id):
                    raise RequestConflict(
                        f"request_id {request_id!r} already asked for kernel "
                        f"{earlier.kernel_id!r} (kind {earlier.kind!r})",
                        hint="use a new request_id for each new request",
                    )
                return self.lease(earlier.id) or earlier
        owner = self.store.kernel_owner(kernel_id)
        if owner is not None and owner != user:
            raise NotYours(f"kernel id {kernel_id!r} belongs to another user")
        now = self.clock()
        event = RequestLease(lease_id, user, kind, kernel_id, now, prefer_host, request_id)

        def extra(decisions: list[Decision]) -> None:
            if self.scheduler.lease(lease_id) is not None:
                self.store.claim_kernel(kernel_id, user, now)

        decisions = self._apply(event, extra)
        for decision in decisions:
            if isinstance(decision, Refused):
                raise LeaseRefused(decision.reason, decision.code)
        lease = self.scheduler.lease(lease_id)
        assert lease is not None
        return lease

    def release(
        self, lease_id: str, reason: str = "released", checkpoint: CheckpointRow | None = None
    ) -> Lease | None:
        """End a lease; ``reason="suspended"`` with ``checkpoint``: remember where it lives
        (as the lease's user's); ``"kernel_may_run"``: its slot is fenced before it is granted
        again."""
        event = Release(lease_id, self.clock(), reason)

        def extra(decisions: list[Decision]) -> None:
            ended = any(isinstance(d, Released) for d in decisions)
            if checkpoint is not None and (ended or self.scheduler.lease(lease_id) is None):
                self.store.put_checkpoint(checkpoint)
                self.store.log(
                    event.now,
                    "checkpoint_kept",
                    lease_id,
                    checkpoint.user,
                    kernel_id=checkpoint.kernel_id,
                    host=checkpoint.host,
                    bytes=checkpoint.bytes,
                )

        decisions = self._apply(event, extra)
        if reason == "suspended" and any(isinstance(d, Released) for d in decisions):
            self.metrics.suspends += 1
        return self.lease(lease_id)

    def heartbeat(
        self, lease_id: str, busy: bool, last_activity: float | None
    ) -> tuple[Lease | None, list[dict[str, object]]]:
        """Record the heartbeat; return the lease and the orders for it (each given once):
        ``{"order": "suspend", "reason", "forced", "grace"}``, where a forced order ("quota",
        "max_lease") must be obeyed busy or not, within ``grace`` seconds for a running cell."""
        now = self.clock()
        self._apply(Heartbeat(lease_id, now, busy, last_activity))
        lease = self.lease(lease_id)
        reason = self._orders.pop(lease_id, None)
        if reason is None or lease is None:
            return lease, []
        forced = reason in FORCED
        grace = 0.0
        if forced:
            since = lease.forced_at if lease.forced_at is not None else now
            grace = round(max(0.0, since + self.scheduler.policy.busy_grace - now), 3)
        order = {"order": "suspend", "reason": reason, "forced": forced, "grace": grace}
        return lease, [order]

    def tick(self) -> list[Decision]:
        """Expiry, queue timeouts, fence retries (the scheduler repeats ``FenceNeeded`` every
        ``fence_retry``), suspend orders; then old checkpoints."""
        decisions = self._apply(Tick(self.clock()))
        self.hosts.sweep_checkpoints()
        return decisions

    def slot_state(self, slot_id: str) -> str:
        """free | busy | drained | fencing | unreachable (KeyError: no such slot)."""
        return self.scheduler.slot_state(slot_id)

    def slot_config(self, slot_id: str) -> SlotConfig | None:
        """The slot's config (O(1)), or None when it is not (any longer) in the config."""
        return self._slot_index.get(slot_id)

    def drained(self, host: str) -> bool:
        return self._drains.get(host, self.config.host(host).drained)

    def set_drain(self, host: str, drained: bool) -> None:
        """Drain (no new grants; leases keep running) or undrain a host; persisted."""
        self.config.host(host)  # KeyError: unknown host
        now = self.clock()

        def extra(_: list[Decision]) -> None:
            self.store.set_drained(host, drained, now)
            self.store.log(now, "drained" if drained else "undrained", host=host)

        self._apply(SetDrain(host, drained, now), extra)
        self._drains[host] = drained

    def reset_slot(self, slot_id: str) -> str:
        """An admin vouches that ``slot_id``'s last kernel is gone: the slot is free again."""
        self.config.slot(slot_id)  # KeyError: unknown slot
        now = self.clock()

        def extra(_: list[Decision]) -> None:
            self.store.drop_fence(slot_id)
            self.store.log(now, "slot_reset", slot=slot_id)

        self._apply(ResetSlot(slot_id, now), extra)
        return self.slot_state(slot_id)

    @property
    def hub_members(self) -> Mapping[str, frozenset[str]]:
        """Hub group -> its users, as last set (``set_hub_members``)."""
        return self._hub_members

    def set_hub_members(self, members: Mapping[str, frozenset[str]]) -> bool:
        """The users of the hub groups the config names (``broker.http.hub_identity``): the
        groups bound to them (``hub_group``, ``teacher_hub_group``) get them as members and
        teachers at once, no reload. False when nothing changed."""
        if dict(members) == self._hub_members:
            return False
        self._hub_members = dict(members)
        self.reconfigure(self.base_config, why="hub_groups_changed")
        return True

    def reconfigure(self, config: Config, why: str = "reconfigured") -> None:
        """Swap in a new (checked) config without dropping a lease (``gpu-broker reload``)."""
        base, config = config, config.with_hub_members(self._hub_members)
        now = self.clock()
        policy = scheduler_policy(config, self._max_per_user)
        event = Reconfigure(tuple(self._slot_states(config)), policy, config.groups, now)

        def extra(_: list[Decision]) -> None:
            self.store.log(now, why, hosts=len(config.hosts), slots=len(config.slots))

        old, old_index, old_base = self.config, self._slot_index, self.base_config
        self.config, self.base_config = config, base  # views of the decisions need the new slots
        self._slot_index = {slot.id: slot for slot in config.slots}
        try:
            self._apply(event, extra)
        except BaseException:
            self.config, self._slot_index, self.base_config = old, old_index, old_base
            self._reload_scheduler()  # with the old config's slots again
            raise

    async def wait_for_change(self, lease_id: str, timeout: float) -> None:
        """Return when ``lease_id`` changes (state, slot, queue position) or after ``timeout``."""
        event = self._changed.get(lease_id)
        if event is None:
            event = self._changed[lease_id] = tornado.locks.Event()
        with contextlib.suppress(tornado.util.TimeoutError):
            await event.wait(timeout=datetime.timedelta(seconds=timeout))

    def close(self) -> None:
        self.work.close()

    # -- internals -------------------------------------------------------------------------

    def _slot_states(self, config: Config) -> list[SlotState]:
        return [
            SlotState(s.id, s.host, s.kind, drained=self._drains.get(s.host, h.drained))
            for h in config.hosts
            for s in h.slots
        ]

    def _load_scheduler(self) -> Scheduler:
        """A scheduler with the config's slots, and the fences and the recent usage the store
        holds (leases come next, through ``Scheduler.restore``)."""
        config, now = self.config, self.clock()
        scheduler = Scheduler(
            self._slot_states(config),
            scheduler_policy(config, self._max_per_user),
            next_seq=self.store.max_seq() + 1,
            groups=config.groups,
        )
        half_life = float(config.policy.usage_half_life or 0)
        since = now - max(2 * 86400.0, USAGE_WINDOW_HALF_LIVES * half_life)
        scheduler.restore_usage(
            UsageRecord(lease.user, lease.granted_at, lease.ended_at)
            for lease in self.store.ended_leases(since)
            if lease.granted_at is not None and lease.ended_at is not None
        )
        # slots whose fencing a stop interrupted come back unreachable; a Tick fences again
        fences = [
            Fence(row.slot_id, row.lease_id, row.host, row.kernel_id) for row in self.store.fences()
        ]
        scheduler.restore_fences(fences, now)
        return scheduler

    def _reload_scheduler(self) -> None:
        """After an event failed half-way: take the state from the store again, which holds
        everything up to the event before (its own writes were rolled back)."""
        log.error("an event failed; reloading the scheduler's state from the store")
        self.scheduler = self._load_scheduler()
        now = self.clock()
        decisions = self.scheduler.restore(self.store.live_leases(), now)
        if decisions:  # grants the state before the failure had not made yet
            with self.store.transaction():
                for lease in self.scheduler.leases():
                    self.store.put_lease(lease)
                record_decisions(self.store, decisions, now)
            self._after(decisions, now)

    def _apply(
        self, event: Event, extra: Callable[[list[Decision]], None] | None = None
    ) -> list[Decision]:
        """One event: scheduler decides, store commits decisions, lease rows and ``extra``'s
        writes together; on any failure memory rolls back too."""
        queue_before = self.scheduler.queue_length
        try:
            decisions = self._decide_and_commit(event, extra)
        except BaseException:
            self._reload_scheduler()  # memory follows the disk back
            raise
        touched = dict.fromkeys(getattr(d, "lease_id", None) for d in decisions)
        touched[getattr(event, "lease_id", None)] = None
        left_queue = any(isinstance(d, Granted | Released | Dropped) for d in decisions)
        if left_queue or self.scheduler.queue_length != queue_before:
            touched.update(dict.fromkeys(lease.id for lease in self.scheduler.waiting()))
        for lease_id in touched:
            waiter = self._changed.pop(lease_id, None) if lease_id else None
            if waiter is not None:
                waiter.set()
        self._after(decisions, event.now)
        return decisions

    def _decide_and_commit(
        self, event: Event, extra: Callable[[list[Decision]], None] | None
    ) -> list[Decision]:
        decisions = self.scheduler.handle(event)
        now = event.now
        if not decisions and extra is None:
            if isinstance(event, Tick):
                return decisions
            if isinstance(event, Heartbeat) and self.scheduler.lease(event.lease_id) is None:
                return decisions  # an ended lease: nothing to write
        touched: dict[str, None] = {}
        lease_id = getattr(event, "lease_id", None)
        if lease_id is not None:
            touched[lease_id] = None
        for decision in decisions:
            if getattr(decision, "lease_id", None) is not None:
                touched[decision.lease_id] = None
        with self.store.transaction():
            if isinstance(event, RequestLease) and self.scheduler.lease(event.lease_id):
                self.store.log(now, "requested", event.lease_id, event.user, kind=event.kind)
            for lid in touched:
                lease = self.scheduler.lease(lid)
                if lease is not None:
                    self.store.put_lease(lease)
            record_decisions(self.store, decisions, now)
            if extra is not None:
                extra(decisions)
        return decisions

    def _after(self, decisions: list[Decision], now: float) -> None:
        """Act on committed decisions: metrics, suspend orders, fences."""
        for d in decisions:
            if isinstance(d, Granted):
                lease = self.scheduler.lease(d.lease_id)
                self.metrics.granted += 1
                if lease is not None:
                    self.metrics.observe_wait(max(0.0, now - lease.created_at))
            if isinstance(d, Released | Expired | Dropped):
                self._orders.pop(d.lease_id, None)
            if isinstance(d, SuspendIdle) and self.scheduler.lease(d.lease_id):
                # the scheduler asks once per idle spell; a newer order replaces an undelivered one
                self._orders[d.lease_id] = d.reason
            if isinstance(d, FenceNeeded):
                self.hosts.start_fence(d)
