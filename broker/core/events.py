"""The scheduler's vocabulary: events in, decisions out. Frozen dataclasses, no behaviour.

The broker's service (``broker.service.service.BrokerService``) builds events from HTTP requests,
admin commands and its periodic tick, passes each to ``broker.core.scheduler.Scheduler.handle`` and
acts on the decisions it gets back (persist them, answer waiting clients, put orders in heartbeat
replies, fence hosts over SSH). ``broker.core.scheduler`` re-exports every name here. Every decision
has a ``lease_id``; every event a ``now`` (unix seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.core.groups import GroupConfig

if TYPE_CHECKING:
    from broker.core.policy import Policy
    from broker.core.slots import SlotState

# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class RequestLease:
    """A user asks for a slot of ``kind`` (or "any")."""

    lease_id: str
    user: str
    kind: str
    kernel_id: str
    now: float
    prefer_host: str | None = None  # a resumed kernel's checkpoint is there: no copy needed
    request_id: str | None = None  # the client's id for this request (idempotent retries)


@dataclass(frozen=True)
class Release:
    """The lease's holder gives it back: "released", or "suspended" (the kernel saved its state
    and ended): the kernel is gone, so the slot is free at once. "kernel_may_run": the holder
    could not make sure its kernel ended (host unreachable at shutdown), so the slot is fenced
    first, as for an expired lease."""

    lease_id: str
    now: float
    reason: str = "released"


@dataclass(frozen=True)
class Heartbeat:
    """The provisioner reports the kernel alive, busy or idle, and its last activity."""

    lease_id: str
    now: float
    busy: bool = False
    last_activity: float | None = None


@dataclass(frozen=True)
class Tick:
    """Time passes: expiry, queue timeouts, fence retries, suspend decisions, class hours."""

    now: float


@dataclass(frozen=True)
class SetDrain:
    """Admin drains (``drained=True``) or undrains a host: a drained host gets no new lease;
    its leases stay until released. Undraining also clears ``drained = true`` from the config."""

    host: str
    drained: bool
    now: float


@dataclass(frozen=True)
class Reconfigure:
    """A reloaded config: the new pool, policy and groups. No lease is dropped: a granted lease
    on a slot that vanished keeps it (``SlotState.retired``) until it ends."""

    slots: Sequence[SlotState]
    policy: Policy
    groups: tuple[GroupConfig, ...]
    now: float


@dataclass(frozen=True)
class Fenced:
    """The service's answer to ``FenceNeeded``: ``ok`` when the kernel is surely gone from the
    host (the slot is granted again at once), not ok when the host could not be reached."""

    slot_id: str
    ok: bool
    now: float


@dataclass(frozen=True)
class ResetSlot:
    """Admin says a fencing or unreachable slot is clean: it becomes free."""

    slot_id: str
    now: float


Event = RequestLease | Release | Heartbeat | Tick | SetDrain | Reconfigure | Fenced | ResetSlot


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Granted:
    lease_id: str
    slot_id: str


@dataclass(frozen=True)
class Queued:
    lease_id: str
    position: int


@dataclass(frozen=True)
class Released:
    lease_id: str
    slot_id: str | None  # None: it was still queued
    reason: str = "released"


@dataclass(frozen=True)
class Expired:
    """A granted lease ended without its holder: it missed its heartbeats
    ("heartbeat_timeout"), or did not obey a "quota"/"max_lease" order within
    ``Policy.obey_within`` ("suspend_ignored"). A ``FenceNeeded`` for its slot follows."""

    lease_id: str
    slot_id: str
    reason: str = "heartbeat_timeout"


@dataclass(frozen=True)
class Dropped:
    """A queued request ended unserved: ``reason`` "queue_timeout", or the quota message."""

    lease_id: str
    reason: str


@dataclass(frozen=True)
class Refused:
    """A request that cannot be granted (unknown or forbidden kind, daily quota used) or may not
    wait (``code`` "queue_full": the user has ``max_queued_per_user`` waiting); nothing was
    stored. ``reason`` is for the user."""

    lease_id: str
    reason: str
    code: str = "refused"


@dataclass(frozen=True)
class FenceNeeded:
    """Make sure kernel ``kernel_id`` of lease ``lease_id`` is gone from ``host`` (kill it over
    SSH), then answer with ``Fenced(slot_id, ok, now)``. Until then the slot is not granted.
    Repeated every ``fence_retry`` while the slot is unreachable."""

    slot_id: str
    lease_id: str
    host: str
    kernel_id: str


@dataclass(frozen=True)
class SuspendIdle:
    """Ask the kernel of ``lease_id`` to checkpoint and end (an order in its next heartbeat
    reply). ``reason``: "idle", "idle_while_queued", "after_cell" (per-cell binding), "max_lease"
    or "quota"; the last two are forced (``broker.core.idle.FORCED``: busy or not, within
    ``Policy.busy_grace``). Issued once per lease, again after ``Policy.suspend_retry`` if the
    lease is still granted."""

    lease_id: str
    reason: str


Decision = Granted | Queued | Released | Expired | Dropped | Refused | FenceNeeded | SuspendIdle

ENDING = (Released, Expired, Dropped)
