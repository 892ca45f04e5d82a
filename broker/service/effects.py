"""What the scheduler's decisions do outside it: audit and lease-end rows, fences, checkpoints.

``BrokerService`` (``broker.service.service``) writes each event's decisions with
``record_decisions`` inside the event's store transaction. After the commit it hands each
``FenceNeeded`` to its ``HostJobs``, which ends the slot's last kernel in a worker thread
(``broker.hosts.fencing.fence_kernel``: the kernel may save itself first), records a checkpoint
the kernel saved as its owner's, and reports ``Fenced`` through the service's ``apply``; each
``Tick`` the service also asks it to delete checkpoints older than ``checkpoint_max_age``.
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
from broker.hosts.fencing import FenceResult, HostWork, delete_checkpoint, fence_kernel
from broker.service.metrics import Metrics
from broker.store.host_records import CheckpointRow, FenceRow
from broker.store.sqlite import Store

log = logging.getLogger("broker")

SWEEP_RETRY = 30.0  # seconds before deleting an old checkpoint is tried again
Apply = Callable[[Event, Callable[[list[Decision]], None] | None], list[Decision]]


def record_decisions(store: Store, decisions: Iterable[Decision], now: float) -> None:
    """Write what ``decisions`` change in the store: ended leases, fences, the audit log
    (call it inside the event's transaction)."""
    for d in decisions:
        if isinstance(d, Granted):
            store.log(now, "granted", d.lease_id, slot=d.slot_id)
        elif isinstance(d, Queued):
            store.log(now, "queued", d.lease_id, position=d.position)
        elif isinstance(d, Released):
            store.end_lease(d.lease_id, "released", now, d.reason)
            store.log(now, "released", d.lease_id, slot=d.slot_id, reason=d.reason)
        elif isinstance(d, Expired):
            store.end_lease(d.lease_id, "expired", now, d.reason)
            store.log(now, "expired", d.lease_id, slot=d.slot_id, reason=d.reason)
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


class HostJobs:
    """Fencing and checkpoint expiry for one ``BrokerService``: blocking parts in worker
    threads, results back on the loop. Its collaborators are given, not inherited: ``config()``
    (the current config), the store, the clock, the metrics, the worker threads, ``apply``
    (the service's: one scheduler event, with extra writes in its transaction) and
    ``slot_state``."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        clock: Callable[[], float],
        metrics: Metrics,
        work: HostWork,
        apply: Apply,
        slot_state: Callable[[str], str],
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.work = work
        self.apply = apply
        self.slot_state = slot_state
        self._fencing: set[str] = set()  # slot ids with a fence in flight
        self._sweeping: set[tuple[str, str]] = set()  # (user, kernel id) being deleted
        self._sweep_due: dict[tuple[str, str], float] = {}

    def start_fence(self, need: FenceNeeded) -> None:
        """End ``need.kernel_id`` on ``need.host`` in a worker thread (it may save itself
        first, for ``fence_save_grace``); report ``Fenced``."""
        if need.slot_id in self._fencing:
            return
        fence = next((f for f in self.store.fences() if f.slot_id == need.slot_id), None)
        if fence is None:
            lease = self.store.get_lease(need.lease_id) if need.lease_id else None
            user = lease.user if lease else ""
            fence = FenceRow(need.slot_id, need.lease_id, need.host, need.kernel_id, user, 0.0)
        config = self.config()
        try:
            host = config.host(fence.host)
        except KeyError:  # host gone from the config: nothing left to fence there
            self._fenced(fence, FenceResult(True, f"host {fence.host} is no longer in the config"))
            return
        kept = self.store.checkpoint(fence.user, fence.kernel_id)
        keep = kept is not None and kept.state == "kept"
        grace = config.policy.fence_save_grace
        lease = self.store.get_lease(fence.lease_id) if fence.lease_id else None
        if lease is not None and lease.end_reason == "kernel_may_run":
            grace = 0.0  # its user shut it down: nothing of it is wanted, save nothing
        self._fencing.add(fence.slot_id)
        self.work.submit(
            lambda: fence_kernel(host, fence.user, fence.kernel_id, grace, keep),
            lambda result: self._fenced(fence, _as_result(result)),
        )

    def _fenced(self, fence: FenceRow, result: FenceResult) -> None:
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
        if result.gone:
            log.info("fenced %s: %s", fence.slot_id, result.message)
        else:
            log.warning("fencing %s failed: %s", fence.slot_id, result.message)
            self.metrics.fence_failures += 1

        def extra(_: list[Decision]) -> None:
            if result.gone:
                self.store.drop_fence(fence.slot_id)
            self.store.log(
                now,
                "fenced" if result.gone else "fence_failed",
                fence.lease_id,
                slot=fence.slot_id,
                message=result.message,
            )
            if result.checkpoint is not None and fence.user:
                path, size = result.checkpoint
                row = CheckpointRow(
                    fence.kernel_id, fence.user, fence.host, path, size, now, fence.lease_id
                )
                self.store.put_checkpoint(row)
                self.store.log(
                    now,
                    "checkpoint_kept",
                    fence.lease_id,
                    fence.user,
                    kernel_id=fence.kernel_id,
                    host=fence.host,
                    bytes=size,
                    by="fence",
                )

        self.apply(Fenced(fence.slot_id, result.gone, now), extra)
        if result.checkpoint is not None:
            self.metrics.suspends += 1

    def sweep_checkpoints(self) -> None:
        """Delete checkpoints older than ``policy.checkpoint_max_age`` on their hosts."""
        config = self.config()
        max_age = float(config.policy.checkpoint_max_age or 0)
        if max_age <= 0:
            return
        now = self.clock()
        for row in self.store.checkpoints("kept"):
            if row.created_at > now - max_age:
                break  # ordered by created_at
            key = (row.user, row.kernel_id)
            if key in self._sweeping or self._sweep_due.get(key, 0) > now:
                continue
            try:
                host = config.host(row.host)
            except KeyError:
                self._checkpoint_deleted(row, (True, f"host {row.host} is gone"))
                continue
            self._sweeping.add(key)
            self._sweep_due[key] = now + SWEEP_RETRY
            self.work.submit(
                lambda h=host, r=row: delete_checkpoint(h, r.user, r.kernel_id),
                lambda outcome, r=row: self._checkpoint_deleted(r, outcome),
            )

    def _checkpoint_deleted(self, row: CheckpointRow, outcome: object) -> None:
        key = (row.user, row.kernel_id)
        self._sweeping.discard(key)
        ok, message = outcome if isinstance(outcome, tuple) else (False, str(outcome))
        current = self.store.checkpoint(row.user, row.kernel_id)
        if not ok or current is None or current.created_at != row.created_at:
            if not ok:
                log.warning("%s", message)
            return
        now = self.clock()
        with self.store.transaction():
            self.store.expire_checkpoint(row.user, row.kernel_id, now)
            self.store.log(
                now,
                "checkpoint_expired",
                row.lease_id,
                row.user,
                kernel_id=row.kernel_id,
                host=row.host,
            )
        self._sweep_due.pop(key, None)


def _as_result(result: object) -> FenceResult:
    """A fencing job's result; a job that raised counts as a failed fence."""
    if isinstance(result, FenceResult):
        return result
    return FenceResult(False, f"fencing failed: {result}")
