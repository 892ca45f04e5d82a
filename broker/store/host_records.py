"""The hosts' side of the store: drained hosts, slots waiting for fencing, kept checkpoints, and
who owns each kernel id.

``HostRecords`` is a mixin of ``broker.store.sqlite.Store`` (it uses the store's connection and
lock; the tables are in the store's schema). ``BrokerService`` writes these rows inside an event's
transaction; ``broker.service.effects`` reads them to fence slots and expire checkpoints.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass

_CKPT_COLUMNS = "kernel_id, user, host, path, bytes, created_at, lease_id, state, expired_at"


@dataclass(frozen=True)
class CheckpointRow:
    """Where a suspended kernel's checkpoint lives (on ``host``, at ``path``)."""

    kernel_id: str
    user: str
    host: str
    path: str
    bytes: int
    created_at: float
    lease_id: str | None = None
    state: str = "kept"  # "kept" | "expired" (deleted on its host after checkpoint_max_age)
    expired_at: float | None = None


@dataclass(frozen=True)
class FenceRow:
    """A slot whose last kernel must be killed before the slot is granted again."""

    slot_id: str
    lease_id: str | None
    host: str
    kernel_id: str
    user: str
    since: float


class HostRecords:
    """Rows of the ``host_state``, ``fences``, ``checkpoints`` and ``kernel_owners`` tables."""

    _db: sqlite3.Connection
    _lock: threading.RLock

    def set_drained(self, host: str, drained: bool, now: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO host_state (host, drained, changed_at) VALUES (?, ?, ?)",
            (host, int(drained), now),
        )

    def drained_hosts(self) -> dict[str, bool]:
        """Host -> drained, as an admin last set it (overrides the config's ``drained``)."""
        with self._lock:
            rows = self._db.execute("SELECT host, drained FROM host_state").fetchall()
        return {host: bool(drained) for host, drained in rows}

    def put_fence(self, row: FenceRow) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO fences (slot_id, lease_id, host, kernel_id, user, since) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (row.slot_id, row.lease_id, row.host, row.kernel_id, row.user, row.since),
        )

    def drop_fence(self, slot_id: str) -> None:
        self._db.execute("DELETE FROM fences WHERE slot_id = ?", (slot_id,))

    def fences(self) -> list[FenceRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT slot_id, lease_id, host, kernel_id, user, since FROM fences"
            ).fetchall()
        return [FenceRow(*row) for row in rows]

    # -- checkpoints: one row per (owner, kernel id) ----------------------------------------

    def put_checkpoint(self, row: CheckpointRow) -> None:
        """Record (or replace) ``row.user``'s checkpoint of ``row.kernel_id``; never another
        user's: the key is the owner and the kernel id together."""
        self._db.execute(
            f"INSERT INTO checkpoints ({_CKPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (user, kernel_id) DO UPDATE SET host = excluded.host, "
            "path = excluded.path, bytes = excluded.bytes, created_at = excluded.created_at, "
            "lease_id = excluded.lease_id, state = excluded.state, "
            "expired_at = excluded.expired_at",
            (
                row.kernel_id,
                row.user,
                row.host,
                row.path,
                row.bytes,
                row.created_at,
                row.lease_id,
                row.state,
                row.expired_at,
            ),
        )

    def checkpoint(self, user: str, kernel_id: str) -> CheckpointRow | None:
        """``user``'s checkpoint of kernel ``kernel_id``, or None."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_CKPT_COLUMNS} FROM checkpoints WHERE user = ? AND kernel_id = ?",
                (user, kernel_id),
            ).fetchone()
        return CheckpointRow(*row) if row else None

    def checkpoints(
        self, state: str | None = None, kernel_id: str | None = None
    ) -> list[CheckpointRow]:
        """Checkpoints (of one state, of one kernel id), oldest first."""
        where, args = [], []
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if kernel_id is not None:
            where.append("kernel_id = ?")
            args.append(kernel_id)
        query = f"SELECT {_CKPT_COLUMNS} FROM checkpoints"
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at", tuple(args)).fetchall()
        return [CheckpointRow(*row) for row in rows]

    def expire_checkpoint(self, user: str, kernel_id: str, now: float) -> None:
        self._db.execute(
            "UPDATE checkpoints SET state = 'expired', expired_at = ? "
            "WHERE user = ? AND kernel_id = ?",
            (now, user, kernel_id),
        )

    def forget_checkpoint(self, user: str, kernel_id: str) -> None:
        self._db.execute(
            "DELETE FROM checkpoints WHERE user = ? AND kernel_id = ?", (user, kernel_id)
        )

    # -- kernel ids and their owners -----------------------------------------------------------

    def kernel_owner(self, kernel_id: str) -> str | None:
        """The user who first leased a slot for ``kernel_id`` (it is theirs for good), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT user FROM kernel_owners WHERE kernel_id = ?", (kernel_id,)
            ).fetchone()
        return row[0] if row else None

    def claim_kernel(self, kernel_id: str, user: str, now: float) -> None:
        """Make ``kernel_id`` ``user``'s, unless it is someone's already (inside the request's
        transaction, after ``kernel_owner`` said it is free or theirs)."""
        self._db.execute(
            "INSERT OR IGNORE INTO kernel_owners (kernel_id, user, since) VALUES (?, ?, ?)",
            (kernel_id, user, now),
        )
