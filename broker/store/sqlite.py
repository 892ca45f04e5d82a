"""The broker's durable state in one SQLite file: leases, tokens, and an audit log of events.

``BrokerService`` (``broker.service.service``) opens one ``Store``, loads the live leases at start
(``live_leases``), and writes each handled scheduler event in ONE transaction (``transaction()``:
the lease rows and the audit rows commit together or not at all). The CLI's ``token`` commands
open the same file from another process (WAL lets them read and write beside the server).

Durability: WAL journal with ``synchronous=FULL`` by default. WAL with ``NORMAL`` survives a crash
of the broker process, but a power loss or OS crash may roll back the last commits; a grant that
was already answered to a client and then rolled back could be granted again to someone else
(a double grant). FULL fsyncs the WAL at every commit, so an answered grant is on disk. Pass
``synchronous="NORMAL"`` where the disk is slow and that risk is acceptable (the bench measures
both).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from broker.core.leases import Lease
from broker.errors import BrokerError
from broker.store.group_commit import GatedConnection, GroupCommit
from broker.store.host_records import CheckpointRow as CheckpointRow  # re-exported
from broker.store.host_records import FenceRow as FenceRow  # re-exported
from broker.store.host_records import HostRecords

log = logging.getLogger("broker.store")

SCHEMA_VERSION = 2  # 2: kernel_owners, leases.request_id, checkpoints keyed by (user, kernel_id)

# checkpoints: one row per (owner, kernel id)
_CHECKPOINTS = """(
    kernel_id TEXT NOT NULL,
    user TEXT NOT NULL,
    host TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    lease_id TEXT,
    state TEXT NOT NULL DEFAULT 'kept',
    expired_at REAL,
    PRIMARY KEY (user, kernel_id)
)"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    kernel_id TEXT NOT NULL,
    state TEXT NOT NULL,
    slot_id TEXT,
    created_at REAL NOT NULL,
    granted_at REAL,
    last_heartbeat REAL,
    busy INTEGER NOT NULL DEFAULT 0,
    last_activity REAL,
    ended_at REAL,
    end_reason TEXT,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS leases_live ON leases (state) WHERE state IN ('queued', 'granted');
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS host_state (
    host TEXT PRIMARY KEY,
    drained INTEGER NOT NULL,
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints {_CHECKPOINTS};
CREATE TABLE IF NOT EXISTS kernel_owners (
    kernel_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fences (
    slot_id TEXT PRIMARY KEY,
    lease_id TEXT,
    host TEXT NOT NULL,
    kernel_id TEXT NOT NULL,
    user TEXT NOT NULL,
    since REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_ended ON leases (ended_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    lease_id TEXT,
    user TEXT,
    detail TEXT NOT NULL DEFAULT '{{}}'
);
"""

_LEASE_COLUMNS = (
    "id, seq, user, kind, kernel_id, state, slot_id, created_at, granted_at, last_heartbeat, "
    "busy, last_activity, ended_at, end_reason, request_id"
)
# After the tables exist: the index on a column that version 1 databases get by migration.
_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS leases_request ON leases (user, request_id) "
    "WHERE request_id IS NOT NULL"
)
# Version 1 -> 2: the new column, checkpoints keyed by their owner, owners of the kernel ids
# leased so far (the first user to lease one keeps it).
_MIGRATE_1_TO_2 = f"""
ALTER TABLE leases ADD COLUMN request_id TEXT;
ALTER TABLE checkpoints RENAME TO checkpoints_v1;
CREATE TABLE checkpoints {_CHECKPOINTS};
INSERT INTO checkpoints SELECT kernel_id, user, host, path, bytes, created_at, lease_id, state,
    expired_at FROM checkpoints_v1;
DROP TABLE checkpoints_v1;
INSERT OR IGNORE INTO kernel_owners (kernel_id, user, since)
    SELECT kernel_id, user, created_at FROM leases ORDER BY seq;
"""


class StoreError(BrokerError):
    """The database cannot be used by this broker (e.g. written by a newer version)."""


@dataclass(frozen=True)
class TokenRow:
    """A token as stored: its sha256 hash, never the token itself."""

    id: str
    hash: str
    prefix: str
    user: str
    role: str
    created_at: float
    revoked: bool


class Store(HostRecords):
    """One SQLite connection, used from one thread at a time (the broker's IOLoop, or the CLI).
    Drained hosts, fences and checkpoints: ``HostRecords`` (``broker.store.host_records``)."""

    token_cache_size = 10_000  # token rows ``token_by_hash`` keeps in memory at most

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "OFF", "EXTRA"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = GatedConnection(
            sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        )
        self._lock = threading.RLock()
        self.group_commit = False  # the server turns it on (see ``transaction``)
        self._group = GroupCommit(self._db)
        self._token_cache: dict[str, TokenRow] = {}  # hash -> row, see ``token_by_hash``
        self._token_cache_version = -1  # PRAGMA data_version the cache was filled at
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            row = self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            version = None
            if row is not None:
                found = self._db.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'"
                ).fetchone()
                version = int(found[0]) if found else None
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            if version == 1:
                log.info("upgrading %s from schema version 1 to %d", self.path, SCHEMA_VERSION)
                for statement in _MIGRATE_1_TO_2.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            elif version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this broker's "
                    f"({SCHEMA_VERSION})",
                    hint="run the jupyter-shared-gpu version that wrote it, or a newer one",
                )
            self._db.execute(_INDEXES)
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        with self._lock:
            self._group.close()
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """``with store.transaction():`` everything inside commits together, or rolls back.

        With ``group_commit`` on and an event loop running (the server), the block is a
        SAVEPOINT inside one transaction per loop iteration: it still rolls back alone, but
        the COMMIT (the fsync) happens once for every event of the iteration, at its end, on
        the commit thread (``broker.store.group_commit``). Replies wait for it (``durable_future``):
        nothing is answered before it is on disk."""
        with self._lock:
            loop = _running_loop() if self.group_commit else None
            if loop is None:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self
                except BaseException:
                    self._db.execute("ROLLBACK")
                    self._token_cache.clear()  # it may have undone a token write
                    raise
                self._db.execute("COMMIT")
                return
            if not self._group.open:
                self._group.begin(loop)
            self._db.execute("SAVEPOINT event")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK TO event")
                self._db.execute("RELEASE event")
                self._token_cache.clear()  # it may have undone a token write
                raise
            self._db.execute("RELEASE event")

    def durable_future(self) -> asyncio.Future | None:
        """A future done once what was written so far is committed; None when it already is."""
        return self._group.durable()

    def when_idle(self, call: Callable[[], None]) -> bool:
        """True: ``call`` runs once the COMMIT in flight is done (the caller must not touch the
        store before); False: nothing runs and the store may be used now."""
        return self._group.when_idle(call)

    # -- leases ----------------------------------------------------------------------------

    def put_lease(self, lease: Lease) -> None:
        """Insert or replace one lease row (live or ended)."""
        self._db.execute(
            f"INSERT OR REPLACE INTO leases ({_LEASE_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                lease.id,
                lease.seq,
                lease.user,
                lease.kind,
                lease.kernel_id,
                lease.state,
                lease.slot_id,
                lease.created_at,
                lease.granted_at,
                lease.last_heartbeat,
                int(lease.busy),
                lease.last_activity,
                lease.ended_at,
                lease.end_reason,
                lease.request_id,
            ),
        )

    def end_lease(self, lease_id: str, state: str, now: float, reason: str) -> None:
        """Mark a lease released or expired; it keeps its slot id for the record."""
        self._db.execute(
            "UPDATE leases SET state = ?, ended_at = ?, end_reason = ?, busy = 0 WHERE id = ?",
            (state, now, reason, lease_id),
        )

    def get_lease(self, lease_id: str) -> Lease | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE id = ?", (lease_id,)
            ).fetchone()
        return _lease(row) if row else None

    def lease_by_request(self, user: str, request_id: str) -> Lease | None:
        """``user``'s lease made by their request ``request_id`` (a retried POST), or None."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE user = ? AND request_id = ?",
                (user, request_id),
            ).fetchone()
        return _lease(row) if row else None

    def live_leases(self) -> list[Lease]:
        """Queued and granted leases, in seq order: what a restarted broker picks up again."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE state IN ('queued', 'granted') "
                "ORDER BY seq"
            ).fetchall()
        return [_lease(row) for row in rows]

    def max_seq(self) -> int:
        with self._lock:
            (value,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM leases").fetchone()
        return int(value)

    def ended_leases(self, since: float) -> list[Lease]:
        """Leases that were granted and ended at or after ``since`` (usage reports)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE ended_at >= ? "
                "AND granted_at IS NOT NULL ORDER BY seq",
                (since,),
            ).fetchall()
        return [_lease(row) for row in rows]

    def data_version(self) -> int:
        """Changes when ANOTHER connection commits (e.g. ``gpu-broker token revoke``)."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # -- audit log -------------------------------------------------------------------------

    def log(
        self, at: float, what: str, lease_id: str | None = None, user: str | None = None, **detail
    ) -> None:
        """Append one audit row. Never put a token or a key in ``detail``."""
        self._db.execute(
            "INSERT INTO events (at, kind, lease_id, user, detail) VALUES (?, ?, ?, ?, ?)",
            (at, what, lease_id, user, json.dumps(detail, sort_keys=True)),
        )

    def events(self, limit: int = 100) -> list[dict]:
        """The latest audit rows, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, at, kind, lease_id, user, detail FROM events "
                "ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {"seq": s, "at": at, "kind": k, "lease_id": lid, "user": u, "detail": json.loads(d)}
            for s, at, k, lid, u, d in reversed(rows)
        ]

    # -- tokens (broker.http.auth is the only caller) -------------------------------------------

    def add_token(self, row: TokenRow) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT INTO tokens (id, hash, prefix, user, role, created_at, revoked) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.id, row.hash, row.prefix, row.user, row.role, row.created_at, row.revoked),
            )
            self.log(row.created_at, "token_created", user=row.user, token_id=row.id, role=row.role)
            self._token_cache.clear()

    def token_by_hash(self, digest: str) -> TokenRow | None:
        """The row of the token whose sha256 is ``digest``; ``broker.http.auth.verify`` calls it on
        every request. Rows found (revoked too) are kept in memory, at most ``token_cache_size``,
        until this store writes tokens or another connection commits (``gpu-broker token
        create|revoke``: ``PRAGMA data_version`` changes, read on every call). Misses are never
        kept, so unknown tokens cannot grow the cache."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._token_cache_version:
                self._token_cache.clear()
                self._token_cache_version = version
            cached = self._token_cache.get(digest)
            if cached is not None:
                return cached
            row = self._db.execute(
                "SELECT id, hash, prefix, user, role, created_at, revoked FROM tokens "
                "WHERE hash = ?",
                (digest,),
            ).fetchone()
            if row is None:
                return None
            found = _token(row)
            while len(self._token_cache) >= max(self.token_cache_size, 1):
                del self._token_cache[next(iter(self._token_cache))]  # the oldest
            self._token_cache[digest] = found
            return found

    def cached_tokens(self) -> int:
        """How many token rows ``token_by_hash`` holds in memory (tests)."""
        return len(self._token_cache)

    def tokens(self) -> list[TokenRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, hash, prefix, user, role, created_at, revoked FROM tokens "
                "ORDER BY created_at"
            ).fetchall()
        return [_token(row) for row in rows]

    def revoke_tokens(self, ids: Iterable[str], now: float) -> None:
        with self.transaction():
            for token_id in ids:
                self._db.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (token_id,))
                self.log(now, "token_revoked", token_id=token_id)
            self._token_cache.clear()


def _lease(row: tuple) -> Lease:
    lid, seq, user, kind, kernel_id, state, slot_id, created, granted, hb, busy, act, *end = row
    return Lease(
        id=lid,
        user=user,
        kind=kind,
        kernel_id=kernel_id,
        seq=seq,
        created_at=created,
        state=state,
        slot_id=slot_id,
        granted_at=granted,
        last_heartbeat=hb,
        busy=bool(busy),
        last_activity=act,
        ended_at=end[0],
        end_reason=end[1],
        request_id=end[2],
    )


def _token(row: tuple) -> TokenRow:
    token_id, digest, prefix, user, role, created_at, revoked = row
    return TokenRow(token_id, digest, prefix, user, role, created_at, bool(revoked))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
