"""The broker's API between users who do not trust each other (issue 9), for real: a server on a
loopback port, SQLite in tmp_path, HTTP on the wire. Kernel ids are checked and owned, user A
can do nothing to user B's leases, kernels and checkpoints, a user's waiting requests are
capped, and a retried lease request never makes a second lease."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli import format_status
from broker.client import BrokerClient, BrokerRequestError
from broker.store.sqlite import Store, TokenRow
from tests.test_broker_api import Broker, start


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = start(tmp_path)
    yield b
    for client in b.clients:
        client.close()
    b.server.stop_thread()


def post(broker: Broker, body: dict, who: str = "alice") -> tuple[int, dict]:
    return broker.raw("POST", "/api/v1/leases", json.dumps(body).encode(), who)


@pytest.mark.parametrize(
    "kernel_id",
    ["../../etc", "k;rm -rf ~", "k k", "", "x" * 129, "kérnel", "k/1", "k\x00"],
)
def test_kernel_ids_the_hosts_would_refuse_are_refused_at_the_api(
    broker: Broker, kernel_id: str
) -> None:
    status, data = post(broker, {"kind": "any", "kernel_id": kernel_id})
    assert status == 400 and "is not a kernel id" in data["error"]["message"], data
    status, _ = post(broker, {"kind": "any", "kernel_id": "ok", "resume_from": kernel_id})
    assert status == 400
    assert broker.client("root").status()["leases"] == []  # nothing stored, no slot taken


def store_rows(broker: Broker) -> dict[str, list]:
    """Every row that says who holds what (the audit log aside)."""
    path = broker.server.config.server.database
    store = Store(path)
    try:
        db = store._db.raw
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("leases", "checkpoints", "kernel_owners", "fences")
        }
    finally:
        store.close()


def test_user_b_can_do_nothing_to_user_a(broker: Broker) -> None:
    """The cross-user matrix: every endpoint, bob against alice's lease, queued request, kernel
    id and checkpoint: 403 or 404, and nothing changes."""
    alice, bob = broker.client("alice"), broker.client("bob")
    held = alice.request_lease("a100", "ka1")
    alice.request_lease("a100", "ka2")
    waiting = alice.request_lease("a100", "ka3")
    assert waiting.state == "queued"
    mig = alice.request_lease("mig", "ka-saved")
    checkpoint = {"host": "gpu2", "path": "/ckpt/ka-saved", "bytes": 10}
    alice.release(mig.id, "suspended", checkpoint)
    before_rows, before_status = store_rows(broker), alice.status()
    before_status.pop("now")

    def refused(call: object) -> int:
        try:
            call()  # type: ignore[operator]
        except BrokerRequestError as exc:
            return exc.status
        raise AssertionError("bob was not refused")

    for lease in (held, waiting):
        assert refused(lambda lease=lease: bob.get_lease(lease.id)) == 403
        assert refused(lambda lease=lease: bob.get_lease(lease.id, wait=0.2)) == 403
        assert refused(lambda lease=lease: bob.heartbeat(lease.id, True, time.time())) == 403
        assert refused(lambda lease=lease: bob.release(lease.id)) == 403
        assert refused(lambda lease=lease: bob.release(lease.id, "kernel_may_run")) == 403
        assert refused(lambda lease=lease: bob.release(lease.id, "suspended", checkpoint)) == 403
    for kernel_id in ("ka1", "ka3", "ka-saved"):  # alice's kernel ids, live or suspended
        assert refused(lambda k=kernel_id: bob.request_lease("any", k)) == 403
        assert refused(lambda k=kernel_id: bob.request_lease("any", "kb", resume_from=k)) == 403
        assert refused(lambda k=kernel_id: bob.forget_checkpoint(k)) in (403, 404)
        assert bob.checkpoints(kernel_id) == []
    assert bob.checkpoints() == []
    # bob's own lease cannot carry a checkpoint record for alice's kernel either
    own = bob.request_lease("mig", "kb1")
    stolen = {**checkpoint, "kernel_id": "ka-saved", "path": "/evil"}
    assert refused(lambda: bob.release(own.id, "suspended", stolen)) == 403
    status = bob.status()
    mine = [slot["lease"] for slot in status["slots"] if slot["lease"]]
    others = [lease for lease in mine if not lease["mine"]]
    assert others and all(lease["user"] is None and lease["id"] is None for lease in others)
    assert all(lease["kernel_id"] is None for lease in others)
    assert all(entry["user"] is None and entry["id"] is None for entry in status["queue"])
    assert [lease["user"] for lease in status["leases"]] == ["bob"]
    assert status["checkpoints"] == []
    bob.release(own.id)
    after_rows = store_rows(broker)
    after_rows["leases"] = [row for row in after_rows["leases"] if row[2] == "alice"]
    after_rows["kernel_owners"] = [r for r in after_rows["kernel_owners"] if r[1] == "alice"]
    assert after_rows == before_rows
    after_status = alice.status()
    after_status.pop("now")
    for slot in after_status["slots"] + before_status["slots"]:  # bob's lease came and went
        if slot["lease"] and not slot["lease"]["mine"]:
            slot["lease"] = None
            slot["state"] = "free"
    assert after_status["leases"] == before_status["leases"]
    assert after_status["checkpoints"] == before_status["checkpoints"]


def test_a_kernel_id_stays_its_first_users(broker: Broker) -> None:
    alice, bob = broker.client("alice"), broker.client("bob")
    lease = alice.request_lease("a100", "kernel-1")
    alice.release(lease.id)
    with pytest.raises(BrokerRequestError) as err:
        bob.request_lease("a100", "kernel-1")  # ended, but still alice's
    assert err.value.status == 403 and "belongs to another user" in err.value.message
    assert alice.request_lease("a100", "kernel-1").state == "granted"  # hers again


def test_a_users_waiting_requests_are_capped(broker: Broker) -> None:
    alice, bob = broker.client("alice"), broker.client("bob")
    for n in range(2):
        assert alice.request_lease("a100", f"held{n}").state == "granted"
    for n in range(3):  # the default cap: 3 waiting per user
        assert bob.request_lease("a100", f"w{n}").state == "queued"
    with pytest.raises(BrokerRequestError) as err:
        bob.request_lease("a100", "w3")
    assert err.value.status == 429 and err.value.code == "too_many_queued"
    assert "3 requests waiting" in err.value.message and "at most 3 per user" in err.value.message
    assert alice.request_lease("a100", "held2").state == "queued"  # others still queue
    leases = broker.client("root").status()["leases"]
    assert sorted(lease["kernel_id"] for lease in leases if lease["user"] == "bob") == [
        "w0",
        "w1",
        "w2",
    ]


def test_a_retried_request_returns_the_same_lease(broker: Broker) -> None:
    body = {"kind": "a100", "kernel_id": "kr", "request_id": "req-1"}
    status, first = post(broker, body)
    assert status == 201
    status, again = post(broker, body)
    assert status == 201 and again["id"] == first["id"]
    status, data = post(broker, {**body, "kernel_id": "other"})
    assert status == 409 and "req-1" in data["error"]["message"]
    status, _ = post(broker, body, who="bob")  # request ids are per user
    assert status == 403  # (and kr is alice's)
    broker.client().release(first["id"])
    status, ended = post(broker, body)
    assert status == 200 and ended["id"] == first["id"] and ended["state"] == "released"
    rows = store_rows(broker)["leases"]
    assert len([row for row in rows if row[4] == "kr"]) == 1


class DropFirstReply:
    """A TCP relay to the broker that forwards the first POST but closes the client's connection
    instead of relaying its reply (a reply lost on the way, after the broker acted)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            client, _ = self.server.accept()
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.target) as upstream:
            while request := read_message(client):
                upstream.sendall(request)
                reply = read_message(upstream)
                if request.startswith(b"POST /api/v1/leases ") and not self.dropped:
                    self.dropped += 1
                    return  # the broker granted it; the client never hears so
                client.sendall(reply)


def read_message(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message with a Content-Length body (b"" at the end of the stream)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_the_client_never_makes_two_leases_for_one_call(broker: Broker) -> None:
    relay = DropFirstReply(broker.url)
    client = BrokerClient(relay.url, broker.tokens["alice"])
    try:
        client.whoami()  # a kept-alive connection: the client retries a request on it once
        lease = client.request_lease("a100", "k-once")
    finally:
        client.close()
    assert relay.dropped == 1 and lease.state == "granted"
    leases = broker.client("root").status()["leases"]
    assert [x["id"] for x in leases if x["kernel_id"] == "k-once"] == [lease.id]


def test_a_token_for_a_name_that_is_no_login_name(broker: Broker) -> None:
    from broker.http.auth import TokenError, create_token, hash_token

    store = Store(broker.server.config.server.database)
    try:
        for bad in ("x y", "../x", "-rf", "", "a" * 33, "root;"):
            with pytest.raises(TokenError, match="POSIX login names"):
                create_token(store, bad)
        token = "sgpu_legacy-token-made-before-names-were-checked"
        digest = hash_token(token)
        store.add_token(TokenRow(digest[:12], digest, token[:9], "Ann Smith", "user", 0.0, False))
    finally:
        store.close()
    broker.tokens["legacy"] = token
    status, data = post(broker, {"kind": "any", "kernel_id": "k"}, who="legacy")
    assert status == 403 and data["error"]["code"] == "bad_user"
    assert "not a POSIX login name" in data["error"]["message"]


def test_kernel_may_run_release_fences_the_slot(broker: Broker) -> None:
    alice = broker.client()
    lease = alice.request_lease("mig", "k-outage")  # gpu2: a "local" host, fenced here
    released = alice.release(lease.id, "kernel_may_run")
    assert released.state == "released" and released.end_reason == "kernel_may_run"
    root = broker.client("root")
    deadline = time.monotonic() + 10
    while root.status()["slots"][-1]["state"] != "free":
        assert time.monotonic() < deadline, root.status()["slots"][-1]
        time.sleep(0.05)
    store = Store(broker.server.config.server.database)
    try:
        kinds = [e["kind"] for e in store.events(200) if e["lease_id"] == lease.id]
    finally:
        store.close()
    assert kinds[-3:] == ["released", "fence_needed", "fenced"]


def test_idle_time_is_counted_from_the_grant(broker: Broker) -> None:
    """Issue 10: "idle for 1m22s" beside "lease age 23s" in `gpu-broker status`."""
    alice = broker.client()
    lease = alice.request_lease("a100", "k-fresh")
    reply = alice.heartbeat(lease.id, False, time.time() - 82)  # the session's activity, queued
    assert reply.lease.granted_at is not None
    status = broker.client("root").status()
    row = next(slot["lease"] for slot in status["slots"] if slot["lease"])
    assert row["last_activity"] >= row["granted_at"]
    table = format_status(status)
    line = next(line for line in table.splitlines() if "alice" in line)
    idle, age = line.split()[5:7]
    assert idle == age, line
