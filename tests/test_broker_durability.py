"""Crash durability: SIGKILL ``gpu-broker serve`` in the middle of a burst of lease requests and
start it again. Every lease answered 201 before the kill is still granted on the same slot,
no slot is granted twice, and queued requests keep their order (one user's requests: the fair
order among them is FIFO)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from broker.client import BrokerClient, BrokerError
from broker.config.loader import load_config
from broker.http.auth import create_token
from broker.store.sqlite import Store
from tests.test_broker_api import _serve, _wait_up, free_port

CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
database = "broker.sqlite"
[policy]
heartbeat_timeout = "10m"
queue_timeout = "1h"
max_queued_per_user = 100
[[hosts]]
name = "gpu1"
address = "local"
[[hosts.slots]]
kind = "sim"
simulated = true
count = 24
"""


def test_sigkill_mid_burst_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "broker.toml"
    path.write_text(CONFIG.format(port=port))
    store = Store(load_config(path).server.database)
    tokens = [create_token(store, f"u{i}")[0] for i in range(24)]
    waiter = create_token(store, "waiter")[0]  # one user: the fair order among them is FIFO
    admin_token = create_token(store, "root", "admin")[0]
    store.close()
    url = f"http://127.0.0.1:{port}"
    answered: list[tuple[int, str, str | None]] = []  # (order, lease id, slot or None=queued)
    stop = threading.Event()

    def fire() -> None:
        clients = [BrokerClient(url, token, timeout=5) for token in [*tokens, waiter]]
        n = 0
        try:
            while not stop.is_set():
                client = clients[min(n, len(tokens))]
                try:
                    lease = client.request_lease("sim", f"k{n}")
                except BrokerError:
                    return  # the broker died under us: what was answered is what counts
                slot = lease.slot.id if lease.state == "granted" and lease.slot else None
                answered.append((n, lease.id, slot))
                n += 1
        finally:
            for client in clients:
                client.close()

    proc = _serve(path)
    admin = BrokerClient(url, admin_token)
    try:
        _wait_up(admin)
        firing = threading.Thread(target=fire)
        firing.start()
        deadline = time.monotonic() + 20
        while len(answered) < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst: requests are in flight
        proc.wait(5)
        stop.set()
        firing.join(10)
        granted = [(lid, slot) for _, lid, slot in answered if slot is not None]
        queued = [lid for _, lid, slot in answered if slot is None]
        assert len(granted) == 24 and len(queued) >= 10, (len(granted), len(queued))
        proc = _serve(path)
        _wait_up(admin)
        status = admin.status()
        by_id = {lease["id"]: lease for lease in status["leases"]}
        for lid, slot in granted:  # every answered grant survived, on its slot
            assert by_id[lid]["state"] == "granted" and by_id[lid]["slot"]["id"] == slot
        holders = [s["lease"]["id"] for s in status["slots"] if s["lease"]]
        assert len(holders) == len(set(holders)) == 24  # one lease per slot
        live_granted = [lease for lease in status["leases"] if lease["state"] == "granted"]
        assert len(live_granted) == 24  # nothing granted twice, no extra grant appeared
        positions = [by_id[lid]["position"] for lid in queued]
        assert positions == sorted(positions) and None not in positions  # order kept
        assert [q["id"] for q in status["queue"]][: len(queued)] == queued
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        admin.close()


def test_a_write_the_store_refuses_leaves_memory_as_the_disk(tmp_path: Path) -> None:
    """SQLite refuses writes (query_only, as a full or read-only disk would): the call fails,
    and the broker's state in memory is the disk's, not half an event; then it goes on."""
    import sqlite3

    import pytest

    from broker.service.service import BrokerService
    from tests.test_broker_api import write_config

    config = load_config(write_config(tmp_path))
    store = Store(config.server.database)
    service = BrokerService(config, store)
    held = service.request_lease("l1", "alice", "a100", "k1")
    assert held.slot_id == "gpu1/0"

    store._db.execute("PRAGMA query_only=ON")
    with pytest.raises(sqlite3.OperationalError):
        service.release("l1")
    with pytest.raises(sqlite3.OperationalError):
        service.request_lease("l2", "bob", "a100", "k2")
    lease = service.lease("l1")
    assert lease is not None and lease.state == "granted" and lease.slot_id == "gpu1/0"
    assert service.lease("l2") is None
    assert service.slot_state("gpu1/0") == "busy" and service.slot_state("gpu1/1") == "free"
    assert [row.id for row in store.live_leases()] == ["l1"]

    store._db.execute("PRAGMA query_only=OFF")
    assert service.release("l1").state == "released"
    granted = service.request_lease("l2", "bob", "a100", "k2")
    assert granted.state == "granted" and granted.slot_id == "gpu1/0"
    assert {row.id: row.state for row in Store(config.server.database).live_leases()} == {
        "l2": "granted"
    }


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE leases (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, user TEXT NOT NULL, kind TEXT NOT NULL,
    kernel_id TEXT NOT NULL, state TEXT NOT NULL, slot_id TEXT, created_at REAL NOT NULL,
    granted_at REAL, last_heartbeat REAL, busy INTEGER NOT NULL DEFAULT 0, last_activity REAL,
    ended_at REAL, end_reason TEXT
);
CREATE TABLE checkpoints (
    kernel_id TEXT PRIMARY KEY, user TEXT NOT NULL, host TEXT NOT NULL, path TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at REAL NOT NULL, lease_id TEXT,
    state TEXT NOT NULL DEFAULT 'kept', expired_at REAL
);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO leases (id, seq, user, kind, kernel_id, state, created_at)
    VALUES ('l1', 1, 'ana', 'sim', 'k1', 'released', 1.0),
           ('l2', 2, 'ben', 'sim', 'k1', 'queued', 2.0),
           ('l3', 3, 'ben', 'sim', 'k2', 'granted', 3.0);
INSERT INTO checkpoints (kernel_id, user, host, path, bytes, created_at)
    VALUES ('k1', 'ana', 'gpu1', '/c/k1', 5, 1.5);
"""


def test_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
    """Databases of the first release (schema 1) open: leases keep their rows, checkpoints are
    keyed by their owner, and each kernel id belongs to the user who leased it first."""
    import sqlite3

    path = tmp_path / "broker.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
    store = Store(path)
    try:
        assert [lease.id for lease in store.live_leases()] == ["l2", "l3"]
        assert store.kernel_owner("k1") == "ana" and store.kernel_owner("k2") == "ben"
        row = store.checkpoint("ana", "k1")
        assert row is not None and row.path == "/c/k1"
        assert store.checkpoint("ben", "k1") is None
        assert store.lease_by_request("ana", "anything") is None  # the new column is there
    finally:
        store.close()
    store = Store(path)  # and opens again as version 2
    store.close()
