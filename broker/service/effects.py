"""What the scheduler's decisions do outside it: audit and lease-end rows, fences, checkpoints.

``BrokerService`` (``broker.service.service``) writes each event's decisions with
``record_decisions`` inside the event's store transaction. After the commit it hands ``FenceNeeded``
to ``HostEffects._start_fence``, which kills the slot's last kernel in a worker thread
(``broker.hosts.fencing.fence_kernel``) and reports ``Fenced``; each ``Tick`` it also deletes old
checkpoints on their hosts (``checkpoint_max_age``). ``HostEffects`` is a mixin of
``BrokerService``: it uses the service's config, store, clock, metrics, worker and ``_apply``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from broker.config.loader import Config
from broker.core.events import (
    Decision,
    Dropped,
    Event,
    Expired,
    Fenced,
    FenceNeeded,
    Granted,
    Queued,
    Released,
    SuspendIdle,
)
from broker.hosts.fencing import HostWork, delete_checkpoint, fence_kernel
from broker.service.metrics import Metrics
from broker.store.host_records import CheckpointRow, FenceRow
from broker.store.sqlite import Store

log = logging.getLogger("broker")

FENCE_RETRY = 30.0  # seconds between fencing attempts on an unreachable host (policy overrides)


def record_decisions(store: Store, decisions: Iterable[Decision], now: float) -> None:
    """Write what ``decisions`` change in the store: ended leases, fences, the audit log
    (call it inside the event's transaction)."""
    for d in decisions:
        if isinstance(d, Granted):
            store.log(now, "granted", d.lease_id, slot=d.slot_id)
        elif isinstance(d, Queued):
            store.log(now, "queued", d.lease_id, position=d.position)
        elif isinstance(d, Released):
            reason = getattr(d, "reason", None) or "released"
            store.end_lease(d.lease_id, "released", now, reason)
            store.log(now, "released", d.lease_id, slot=d.slot_id, reason=reason)
        elif isinstance(d, Expired):
            store.end_lease(d.lease_id, "expired", now, "heartbeat_timeout")
            store.log(now, "expired", d.lease_id, slot=d.slot_id)
        elif isinstance(d, Dropped):
            store.end_lease(d.lease_id, "expired", now, d.reason)
            store.log(now, "dropped", d.lease_id, reason=d.reason)
        elif isinstance(d, FenceNeeded):
            lease = store.get_lease(d.lease_id) if d.lease_id else None
            user = lease.user if lease else ""
            store.put_fence(FenceRow(d.slot_id, d.lease_id, d.host, d.kernel_id, user, now))
            store.log(now, "fence_needed", d.lease_id, user, slot=d.slot_id, host=d.host)
        elif isinstance(d, SuspendIdle):
            store.log(now, "suspend_ordered", d.lease_id, reason=d.reason)


class HostEffects:
    """Fencing and checkpoint expiry, blocking parts in worker threads (see the module doc)."""

    config: Config
    store: Store
    clock: Callable[[], float]
    metrics: Metrics
    work: HostWork
    _fencing: set[str]  # slot ids with a fence in flight
    _sweeping: set[str]  # kernel ids whose checkpoint is being deleted
    _sweep_due: dict[str, float]

    def _apply(
        self, event: Event, extra: Callable[[list[Decision]], None] | None = None
    ) -> list[Decision]:
        raise NotImplementedError  # BrokerService's

    def slot_state(self, slot_id: str) -> str:
        raise NotImplementedError  # BrokerService's

    def _start_fence(self, need: FenceNeeded) -> None:
        """Kill ``need.kernel_id`` on ``need.host`` in a worker thread; report ``Fenced``."""
        if need.slot_id in self._fencing:
            return
        fence = next((f for f in self.store.fences() if f.slot_id == need.slot_id), None)
        if fence is None:
            lease = self.store.get_lease(need.lease_id) if need.lease_id else None
            user = lease.user if lease else ""
            fence = FenceRow(need.slot_id, need.lease_id, need.host, need.kernel_id, user, 0.0)
        try:
            host = self.config.host(fence.host)
        except KeyError:  # host gone from the config: nothing left to fence there
            self._fenced(fence, True, f"host {fence.host} is no longer in the config")
            return
        keep = self._keeps_checkpoint(fence.kernel_id)
        self._fencing.add(fence.slot_id)
        self.work.submit(
            lambda: fence_kernel(host, fence.user, fence.kernel_id, keep),
            lambda ok, msg: self._fenced(fence, ok, msg),
        )

    def _keeps_checkpoint(self, kernel_id: str) -> bool:
        row = self.store.checkpoint(kernel_id)
        return row is not None and row.state == "kept"

    def _fenced(self, fence: FenceRow, ok: bool, message: str) -> None:
        self._fencing.discard(fence.slot_id)
        current = {f.slot_id: f for f in self.store.fences()}.get(fence.slot_id)
        if current is None or current.kernel_id != fence.kernel_id:
            return  # reset by an admin meanwhile
        try:
            if self.slot_state(fence.slot_id) not in ("fencing", "unreachable"):
                return
        except KeyError:
            return
        now = self.clock()
        if ok:
            log.info("fenced %s: %s", fence.slot_id, message)
        else:
            log.warning("fencing %s failed: %s", fence.slot_id, message)
            self.metrics.fence_failures += 1

        def extra(_: list[Decision]) -> None:
            if ok:
                self.store.drop_fence(fence.slot_id)
            self.store.log(
                now,
                "fenced" if ok else "fence_failed",
                fence.lease_id,
                slot=fence.slot_id,
                message=message,
            )

        self._apply(Fenced(fence.slot_id, ok, now), extra)

    def _sweep_checkpoints(self) -> None:
        max_age = float(getattr(self.config.policy, "checkpoint_max_age", 0) or 0)
        if max_age <= 0:
            return
        now = self.clock()
        for row in self.store.checkpoints("kept"):
            if row.created_at > now - max_age:
                break  # ordered by created_at
            if row.kernel_id in self._sweeping or self._sweep_due.get(row.kernel_id, 0) > now:
                continue
            try:
                host = self.config.host(row.host)
            except KeyError:
                self._checkpoint_deleted(row, True, f"host {row.host} is gone")
                continue
            self._sweeping.add(row.kernel_id)
            self._sweep_due[row.kernel_id] = now + FENCE_RETRY
            self.work.submit(
                lambda h=host, r=row: delete_checkpoint(h, r.user, r.kernel_id),
                lambda ok, msg, r=row: self._checkpoint_deleted(r, ok, msg),
            )

    def _checkpoint_deleted(self, row: CheckpointRow, ok: bool, message: str) -> None:
        self._sweeping.discard(row.kernel_id)
        current = self.store.checkpoint(row.kernel_id)
        if not ok or current is None or current.created_at != row.created_at:
            if not ok:
                log.warning("%s", message)
            return
        now = self.clock()
        with self.store.transaction():
            self.store.expire_checkpoint(row.kernel_id, now)
            self.store.log(
                now,
                "checkpoint_expired",
                row.lease_id,
                row.user,
                kernel_id=row.kernel_id,
                host=row.host,
            )
        self._sweep_due.pop(row.kernel_id, None)
