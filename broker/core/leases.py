"""A lease as the scheduler, the store and the API see it, and what a lease may take. Pure.

``broker.core.scheduler.Scheduler`` holds the live ``Lease``s (queued or granted) and replaces them
as they change (they are frozen); ``broker.store.sqlite`` keeps every lease, ended ones too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from broker.core.slots import SlotState

LeaseState = Literal["queued", "granted", "released", "expired"]
ANY_KIND = "any"  # a request that takes a slot of any kind


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
    end_reason: str | None = None  # "released", "heartbeat_timeout", "queue_timeout", ...
    group: str | None = None  # the group whose max_slots_per_user this lease counts against
    suspend_requested_at: float | None = None  # when SuspendIdle was last issued for it
    suspend_reason: str | None = None
    forced_at: float | None = None  # first "quota"/"max_lease" order: obey by busy_grace
    prefer_host: str | None = None  # a free slot there goes first (not stored: lost on restart)
    request_id: str | None = None  # the client's id for its request (a retry finds the lease)


def fits(lease: Lease, slot: SlotState) -> bool:
    """True when ``slot`` is free, not drained and of the kind ``lease`` asks for."""
    return (
        slot.lease_id is None
        and not slot.drained
        and (lease.kind == ANY_KIND or lease.kind == slot.kind)
    )


def since(start: float | None, now: float) -> float:
    """``start``, or ``now`` when there is none (0.0 is a valid time in tests)."""
    return now if start is None else start
