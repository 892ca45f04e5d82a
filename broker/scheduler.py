"""The scheduler core: who gets which GPU slot, and when. Pure: no clock, no I/O, no tornado.

Read it like h11's ``_state.py``. The broker's service (``broker.server.BrokerService``) turns
each HTTP request and each periodic tick into one *event* (``RequestLease``, ``Release``,
``Heartbeat``, ``Tick``), calls ``Scheduler.handle(event)``, and gets back a list of *decisions*
(``Granted``, ``Queued``, ``Released``, ``Expired``, ``Dropped``, ``Refused``) that it persists in
one transaction and reports to the waiting clients. Every event carries ``now`` (unix seconds):
the scheduler never reads a clock, so tests drive it with plain numbers.

Rules:

- a request for kind K (or ``"any"``) gets the first free, non-drained slot of that kind, else it
  waits in the queue;
- one user holds at most ``max_leases_per_user`` granted leases; further requests wait;
- the queue is served in the order ``grant_order`` gives (FIFO by ``seq`` today): a slot that
  frees goes to the first queued request that fits it, in the same ``handle`` call, so a later
  request that fits may go ahead of an earlier one that does not;
- a granted lease without a heartbeat for ``heartbeat_timeout`` expires and frees its slot;
- a queued request older than ``queue_timeout`` is dropped (``queue_timeout <= 0``: never);
- a request for a kind no slot in the pool has is refused, with the kinds that exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

ANY_KIND = "any"

LeaseState = Literal["queued", "granted", "released", "expired"]


# ----------------------------------------------------------------------------- state


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


@dataclass(frozen=True)
class SlotState:
    """One slot as the scheduler sees it: what kind it is, whether it may be granted, who has it."""

    id: str
    host: str
    kind: str
    drained: bool = False
    lease_id: str | None = None


@dataclass(frozen=True)
class Policy:
    """The scheduler's knobs (``[policy]`` of the config, in seconds)."""

    heartbeat_timeout: float = 60.0
    queue_timeout: float = 0.0
    max_leases_per_user: int = 4


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class RequestLease:
    lease_id: str
    user: str
    kind: str
    kernel_id: str
    now: float


@dataclass(frozen=True)
class Release:
    lease_id: str
    now: float


@dataclass(frozen=True)
class Heartbeat:
    lease_id: str
    now: float
    busy: bool = False
    last_activity: float | None = None


@dataclass(frozen=True)
class Tick:
    now: float


Event = RequestLease | Release | Heartbeat | Tick


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


@dataclass(frozen=True)
class Expired:
    """A granted lease missed its heartbeats; its slot is free again (after fencing, later)."""

    lease_id: str
    slot_id: str


@dataclass(frozen=True)
class Dropped:
    """A queued request waited longer than ``queue_timeout``."""

    lease_id: str
    reason: str


@dataclass(frozen=True)
class Refused:
    """A request that can never be granted (unknown kind); nothing was stored."""

    lease_id: str
    reason: str


Decision = Granted | Queued | Released | Expired | Dropped | Refused

ENDING = (Released, Expired, Dropped)


# ----------------------------------------------------------------------------- policy hooks


def grant_order(queued: Iterable[Lease]) -> list[Lease]:
    """The order in which queued requests are offered free slots. FIFO today.

    Quotas, fairness between users and class reservations change this one function (and
    ``may_hold``), nothing else.
    """
    return sorted(queued, key=lambda lease: lease.seq)


def fits(lease: Lease, slot: SlotState) -> bool:
    """True when ``slot`` is free, not drained and of the kind ``lease`` asks for."""
    return (
        slot.lease_id is None
        and not slot.drained
        and (lease.kind == ANY_KIND or lease.kind == slot.kind)
    )


def may_hold(held: int, policy: Policy) -> bool:
    """True when a user holding ``held`` granted leases may be granted one more."""
    return held < policy.max_leases_per_user


# ----------------------------------------------------------------------------- the machine


class Scheduler:
    """Holds the pool's slots and the live leases; ``handle`` is the only way to change them."""

    def __init__(
        self, slots: Iterable[SlotState], policy: Policy | None = None, next_seq: int = 1
    ) -> None:
        self.policy = policy or Policy()
        self._slots: dict[str, SlotState] = {}
        for slot in slots:
            if slot.id in self._slots:
                raise ValueError(f"duplicate slot id {slot.id!r}")
            self._slots[slot.id] = replace(slot, lease_id=None)
        # Indexes kept in step with _slots and _leases, so a grant costs O(free slots), not
        # O(pool): slot order, free non-drained slot indexes per kind, granted leases per user.
        self._order = {slot_id: index for index, slot_id in enumerate(self._slots)}
        self._ids = list(self._slots)
        self._free: dict[str, set[int]] = {}
        for slot in self._slots.values():
            if not slot.drained:
                self._free.setdefault(slot.kind, set()).add(self._order[slot.id])
        self._held: dict[str, int] = {}
        self._leases: dict[str, Lease] = {}
        self._queue: list[str] = []  # lease ids, kept in grant_order
        self._next_seq = next_seq

    # -- queries ---------------------------------------------------------------------------

    @property
    def kinds(self) -> list[str]:
        """The slot kinds in the pool, sorted."""
        return sorted({slot.kind for slot in self._slots.values()})

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
        return list(self._slots.values())

    def slot(self, slot_id: str) -> SlotState | None:
        return self._slots.get(slot_id)

    def free_slots(self) -> list[SlotState]:
        """Slots that may be granted now (free and not drained), in pool order."""
        indexes = sorted(index for free in self._free.values() for index in free)
        return [self._slots[self._ids[index]] for index in indexes]

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
        return self._held.get(user, 0)

    def snapshot(self) -> tuple:
        """An opaque copy of the state; ``rollback(snapshot)`` returns to it (the service does
        so when the store fails to commit an event's decisions)."""
        free = {kind: set(indexes) for kind, indexes in self._free.items()}
        return (
            dict(self._slots),
            dict(self._leases),
            list(self._queue),
            self._next_seq,
            free,
            dict(self._held),
        )

    def rollback(self, snapshot: tuple) -> None:
        slots, leases, queue, next_seq, free, held = snapshot
        self._slots, self._leases, self._queue = dict(slots), dict(leases), list(queue)
        self._next_seq, self._held = next_seq, dict(held)
        self._free = {kind: set(indexes) for kind, indexes in free.items()}

    # -- restoring after a restart ---------------------------------------------------------

    def restore(self, leases: Iterable[Lease], now: float) -> list[Decision]:
        """Load live leases from the store (broker start). Granted ones keep their slots and get
        a fresh heartbeat deadline (clients could not reach a stopped broker). A granted lease
        whose slot is gone from the config goes back to the queue. Returns the grants this made.
        """
        for lease in sorted(leases, key=lambda lease: lease.seq):
            self._next_seq = max(self._next_seq, lease.seq + 1)
            slot = self._slots.get(lease.slot_id or "")
            if lease.state == "granted" and slot is not None and slot.lease_id is None:
                self._leases[lease.id] = replace(lease, last_heartbeat=now)
                self._take(slot.id, lease)
            else:
                self._leases[lease.id] = replace(
                    lease, state="queued", slot_id=None, granted_at=None
                )
                self._queue.append(lease.id)
        self._queue = [lease.id for lease in grant_order(self.queue())]
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
            return self._tick(event)
        raise TypeError(f"not a scheduler event: {event!r}")

    def _request(self, event: RequestLease) -> list[Decision]:
        if event.lease_id in self._leases:
            raise ValueError(f"lease id {event.lease_id!r} is already in use")
        if event.kind != ANY_KIND and event.kind not in self.kinds:
            kinds = ", ".join(repr(kind) for kind in self.kinds) or "none"
            return [
                Refused(
                    event.lease_id,
                    f"no slot of kind {event.kind!r} in the pool; kinds: {kinds} (or 'any')",
                )
            ]
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
        self._queue = [queued.id for queued in grant_order(self.queue())]
        decisions = self._assign(event.now)
        if lease.id in self._queue:
            decisions.append(Queued(lease.id, self._queue.index(lease.id) + 1))
        return decisions

    def _release(self, event: Release) -> list[Decision]:
        lease = self._leases.get(event.lease_id)
        if lease is None:
            return []
        self._end(lease)
        return [Released(lease.id, lease.slot_id), *self._assign(event.now)]

    def _heartbeat(self, event: Heartbeat) -> list[Decision]:
        lease = self._leases.get(event.lease_id)
        if lease is None:
            return []
        self._leases[lease.id] = replace(
            lease,
            last_heartbeat=event.now,
            busy=event.busy,
            last_activity=event.last_activity
            if event.last_activity is not None
            else lease.last_activity,
        )
        return []

    def _tick(self, event: Tick) -> list[Decision]:
        decisions: list[Decision] = []
        now = event.now
        for lease in self.leases():
            if lease.state == "granted" and lease.slot_id is not None:
                last = lease.last_heartbeat if lease.last_heartbeat is not None else now
                if now - last > self.policy.heartbeat_timeout:
                    self._end(lease)
                    decisions.append(Expired(lease.id, lease.slot_id))
            elif (
                self.policy.queue_timeout > 0 and now - lease.created_at > self.policy.queue_timeout
            ):
                self._end(lease)
                decisions.append(Dropped(lease.id, "queue_timeout"))
        if decisions:
            decisions.extend(self._assign(now))
        return decisions

    # -- internals -------------------------------------------------------------------------

    def _end(self, lease: Lease) -> None:
        """Forget a lease that ended; free its slot or take it out of the queue."""
        del self._leases[lease.id]
        if lease.slot_id is not None:
            slot = self._slots[lease.slot_id]
            self._slots[slot.id] = replace(slot, lease_id=None)
            if not slot.drained:
                self._free.setdefault(slot.kind, set()).add(self._order[slot.id])
            self._held[lease.user] -= 1
            if not self._held[lease.user]:
                del self._held[lease.user]
        else:
            self._queue.remove(lease.id)

    def _take(self, slot_id: str, lease: Lease) -> None:
        slot = self._slots[slot_id]
        self._slots[slot_id] = replace(slot, lease_id=lease.id)
        self._free.get(slot.kind, set()).discard(self._order[slot_id])
        self._held[lease.user] = self._held.get(lease.user, 0) + 1

    def _pick(self, lease: Lease) -> str | None:
        """The first slot in pool order that ``fits`` the lease, from the free index."""
        if lease.kind == ANY_KIND:
            candidates = [min(free) for free in self._free.values() if free]
        else:
            free = self._free.get(lease.kind)
            candidates = [min(free)] if free else []
        return self._ids[min(candidates)] if candidates else None

    def _assign(self, now: float) -> list[Granted]:
        """Offer the free slots to the queue, in grant order. Called after any change."""
        granted: list[Granted] = []
        if not self._queue or not any(self._free.values()):
            return granted
        for lease in self.queue():
            if not may_hold(self._held.get(lease.user, 0), self.policy):
                continue
            slot_id = self._pick(lease)
            if slot_id is None:
                continue
            self._take(slot_id, lease)
            self._leases[lease.id] = replace(
                lease, state="granted", slot_id=slot_id, granted_at=now, last_heartbeat=now
            )
            self._queue.remove(lease.id)
            granted.append(Granted(lease.id, slot_id))
            if not any(self._free.values()):
                break
        return granted
