"""The scheduler's waiting requests, indexed so that no event has to sort them all. Pure.

``broker.core.state.SchedulerState`` owns one ``WaitingQueue`` of lease ids. It keeps them in
arrival order, by kind (a grant only looks at the requests that could take one of the free
slots' kinds) and counts them per user (the per-user cap). The grant order
(``broker.core.fairness``) depends on the clock (aging, usage that grows while a user holds a
slot), so it cannot be kept exactly between events; the queue keeps the order of its last sort
instead, for positions: a new request goes in by bisection under that sort's key, a leaving one
comes out, and the scheduler drops the whole order (``invalidate``) only when time passed or a
user's usage changed, so it is sorted again when next read, not on every event. Grants never
read it: ``broker.core.scheduler`` orders the candidates for a free slot afresh, at the event's
time (``in_grant_order``, which merges each user's runs and works out only what it is asked
for), so fairness and aging are exactly ``grant_order``'s.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Iterator

from broker.core.leases import Lease

Key = Callable[[str], tuple]  # lease id -> its place in the grant order


class WaitingQueue:
    """Queued lease ids: in arrival order, by kind and by user, with a cached grant order."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}  # id -> seq, in arrival order (leases enter by seq)
        self._by_kind: dict[str, dict[str, None]] = {}
        self._per_user: dict[str, int] = {}
        self._order: list[str] | None = None  # ids in the grant order of the last sort
        self._keys: list[tuple] = []  # the sort key of each id in ``_order``
        self._key: Key | None = None  # the key function of that sort
        self._index: dict[str, int] | None = None  # id -> position (1..n) in ``_order``

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._ids

    def __iter__(self) -> Iterator[str]:
        """Arrival order."""
        return iter(self._ids)

    def add(self, lease: Lease) -> None:
        """A request joins (after every one already queued, by seq)."""
        self._ids[lease.id] = lease.seq
        self._by_kind.setdefault(lease.kind, {})[lease.id] = None
        self._per_user[lease.user] = self._per_user.get(lease.user, 0) + 1
        if self._order is not None and self._key is not None:
            key = self._key(lease.id)
            at = bisect.bisect_right(self._keys, key)
            self._order.insert(at, lease.id)
            self._keys.insert(at, key)
        self._index = None

    def remove(self, lease: Lease) -> None:
        """A request leaves (granted, withdrawn, dropped)."""
        del self._ids[lease.id]
        kind = self._by_kind[lease.kind]
        del kind[lease.id]
        if not kind:
            del self._by_kind[lease.kind]
        left = self._per_user[lease.user] - 1
        if left:
            self._per_user[lease.user] = left
        else:
            del self._per_user[lease.user]
        if self._order is not None:
            at = self._order.index(lease.id)
            del self._order[at]
            del self._keys[at]
        self._index = None

    def count(self, user: str) -> int:
        """How many requests ``user`` has waiting."""
        return self._per_user.get(user, 0)

    def users(self) -> Iterable[str]:
        """Users with a request waiting."""
        return self._per_user.keys()

    def of_kinds(self, kinds: Iterable[str]) -> list[str]:
        """Ids of the requests for one of ``kinds``, in arrival order."""
        found = [lease_id for kind in kinds for lease_id in self._by_kind.get(kind, ())]
        return sorted(found, key=self._ids.__getitem__) if len(found) > 1 else found

    def kinds(self) -> Iterable[str]:
        """The kinds some request waits for ("any" included)."""
        return self._by_kind.keys()

    def invalidate(self) -> None:
        """Time passed or usage changed: sort again when the order is next read."""
        self._order = None
        self._keys = []
        self._key = None
        self._index = None

    def ordered(self, make_key: Callable[[], Key]) -> list[str]:
        """The ids in grant order (sorted with ``make_key()`` if the last sort is gone)."""
        if self._order is None:
            key = make_key()
            pairs = sorted((key(lease_id), lease_id) for lease_id in self._ids)
            self._order = [lease_id for _, lease_id in pairs]
            self._keys = [k for k, _ in pairs]
            self._key = key
            self._index = None
        return self._order

    def position(self, lease_id: str, make_key: Callable[[], Key]) -> int | None:
        """1-based place of ``lease_id`` in the grant order, None when it does not wait."""
        if lease_id not in self._ids:
            return None
        if self._index is None:
            order = self.ordered(make_key)
            self._index = {lid: at for at, lid in enumerate(order, start=1)}
        return self._index[lease_id]


def in_grant_order(
    candidates: list[str], leases: dict[str, Lease], key: Key
) -> Iterator[str]:
    """``candidates`` (in arrival order) in ``grant_order``, worked out only as far as the caller
    reads. Requests of one user for one kind differ only in arrival (and aging, which follows
    arrival), so each such run is already in order: a heap merges the runs, and a request's key
    is computed only when it heads its run."""
    runs: dict[tuple[str, str], list[str]] = {}
    for lease_id in candidates:
        lease = leases[lease_id]
        runs.setdefault((lease.user, lease.kind), []).append(lease_id)
    heap = [(key(run[0]), 0, run) for run in runs.values()]
    heapq.heapify(heap)
    while heap:
        _, at, run = heap[0]
        yield run[at]
        if at + 1 < len(run):
            heapq.heapreplace(heap, (key(run[at + 1]), at + 1, run))
        else:
            heapq.heappop(heap)
