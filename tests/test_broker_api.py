"""The broker's HTTP API, for real: a server on a loopback port, SQLite in tmp_path, HTTP on the
wire (``BrokerClient`` and raw ``http.client``)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import BrokerAuthError, BrokerClient, BrokerRequestError, BrokerUnreachable
from broker.config.loader import load_config
from broker.daemon import BrokerServer
from broker.http.auth import create_token
from broker.store.sqlite import Store
from tests.sshd import free_port

CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
database = "broker.sqlite"

[policy]
heartbeat_interval = "{interval}"
heartbeat_timeout = "{timeout}"
queue_timeout = "10m"

[[hosts]]
name = "gpu1"
address = "gpu1.example.org"
fence_user = "gpufence"
fence_key_file = "/etc/gpu-broker/fence_ed25519"
user = "{{username}}"
key_file = "~/.ssh/{{username}}_ed25519"

[[hosts.slots]]
kind = "a100"
simulated = true
count = 2

[[hosts]]
name = "gpu2"
address = "local"

[[hosts.slots]]
id = "gpu2/mig0"
kind = "mig"
device = "0"
simulated = true
"""


def write_config(tmp: Path, port: int = 0, interval: str = "10s", timeout: str = "60s") -> Path:
    path = tmp / "broker.toml"
    path.write_text(CONFIG.format(port=port, interval=interval, timeout=timeout))
    return path


def tokens(config_path: Path) -> dict[str, str]:
    store = Store(load_config(config_path).server.database)
    try:
        return {
            "alice": create_token(store, "alice")[0],
            "bob": create_token(store, "bob")[0],
            "root": create_token(store, "root", "admin")[0],
        }
    finally:
        store.close()


class Broker:
    def __init__(self, server: BrokerServer, url: str, toks: dict[str, str]) -> None:
        self.server, self.url, self.tokens = server, url, toks
        self.clients: list[BrokerClient] = []

    def client(self, who: str = "alice", **kw: float) -> BrokerClient:
        client = BrokerClient(self.url, self.tokens.get(who, who), **kw)
        self.clients.append(client)
        return client

    def raw(self, method: str, path: str, body: bytes | None = None, who: str = "alice") -> tuple:
        parts = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = json.loads(response.read())
        conn.close()
        return response.status, data


def start(tmp_path: Path, **policy: str) -> Broker:
    path = write_config(tmp_path, **policy)
    toks = tokens(path)
    server = BrokerServer(load_config(path), port=0, tick_interval=0.05)
    return Broker(server, server.start_in_thread(), toks)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = start(tmp_path)
    yield b
    for client in b.clients:
        client.close()
    b.server.stop_thread()


def test_grant_heartbeat_release(broker: Broker) -> None:
    alice = broker.client()
    lease = alice.request_lease("a100", "k1")
    assert lease.state == "granted" and lease.position is None
    assert lease.slot is not None and lease.slot.id == "gpu1/0" and lease.slot.kind == "a100"
    assert lease.host is not None
    assert (lease.host.name, lease.host.address, lease.host.user) == (
        "gpu1",
        "gpu1.example.org",
        "alice",
    )
    assert lease.host.key_file == "~/.ssh/alice_ed25519"
    assert lease.heartbeat_interval == 10 and lease.heartbeat_timeout == 60
    reply = alice.heartbeat(lease.id, True, time.time())
    assert reply.lease.state == "granted" and reply.orders == []
    released = alice.release(lease.id)
    assert released.state == "released" and released.host is None
    assert alice.get_lease(lease.id).state == "released"
    assert alice.release(lease.id).state == "released"  # idempotent


def test_queue_positions_and_long_poll_wakes(broker: Broker) -> None:
    alice, bob = broker.client(), broker.client("bob")
    first = alice.request_lease("mig", "k1")
    assert first.state == "granted"
    q1 = bob.request_lease("mig", "k2")
    q2 = alice.request_lease("mig", "k3")
    assert (q1.state, q1.position, q2.position, q2.queue_length) == ("queued", 1, 2, 2)
    status, body = broker.raw("POST", "/api/v1/leases", b'{"kind": "any", "kernel_id": "x"}')
    assert status == 201 and body["state"] == "granted"  # a100 free: "any" goes ahead
    start_time = time.monotonic()
    assert bob.get_lease(q1.id, wait=0.3).state == "queued"
    assert 0.25 < time.monotonic() - start_time < 2
    # Long-poll from another thread-free angle: release, then the waiting poll returns granted.
    import threading

    result: list = []
    waiter = threading.Thread(target=lambda: result.append(bob.get_lease(q1.id, wait=20)))
    waiter.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    alice.release(first.id)
    waiter.join(5)
    assert result and result[0].state == "granted" and result[0].slot.id == "gpu2/mig0"
    assert time.monotonic() - t0 < 1.0
    assert alice.get_lease(q2.id).position == 1


def test_expiry_without_heartbeat(tmp_path: Path) -> None:
    b = start(tmp_path, interval="0.1s", timeout="0.4s")
    try:
        alice = b.client()
        kept = alice.request_lease("a100", "k1")
        lost = alice.request_lease("a100", "k2")
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            alice.heartbeat(kept.id, False, None)
            time.sleep(0.1)
        gone = alice.get_lease(lost.id)
        assert (gone.state, gone.end_reason) == ("expired", "heartbeat_timeout")
        assert alice.get_lease(kept.id).state == "granted"
        assert alice.heartbeat(lost.id, False, None).lease.state == "expired"
    finally:
        b.server.stop_thread()


def test_401_changes_nothing(broker: Broker) -> None:
    lease = broker.client().request_lease("a100", "k")
    for bad in ("", "nope", "sgpu_" + "x" * 43):
        with pytest.raises(BrokerAuthError, match="rejected the token"):
            broker.client(bad).request_lease("a100", "k")
        with pytest.raises(BrokerAuthError):
            broker.client(bad).release(lease.id)
    status, body = broker.raw("DELETE", f"/api/v1/leases/{lease.id}", who="")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert broker.client().get_lease(lease.id).state == "granted"
    admin = broker.client("root").status()
    assert len(admin["leases"]) == 1


def test_revoked_token_is_401(broker: Broker, tmp_path: Path) -> None:
    from broker.http.auth import revoke_token

    alice = broker.client()
    assert alice.whoami() == {"user": "alice", "role": "user"}
    store = Store(tmp_path / "broker.sqlite")
    revoke_token(store, broker.tokens["alice"][:9])
    store.close()
    with pytest.raises(BrokerAuthError):
        alice.whoami()


def test_403_on_another_users_lease(broker: Broker) -> None:
    lease = broker.client().request_lease("a100", "k")
    bob = broker.client("bob")
    for call in (
        lambda: bob.get_lease(lease.id),
        lambda: bob.release(lease.id),
        lambda: bob.heartbeat(lease.id, False, None),
    ):
        with pytest.raises(BrokerRequestError) as err:
            call()
        assert err.value.status == 403 and err.value.code == "forbidden"
    assert broker.client("root").get_lease(lease.id).state == "granted"  # admins may
    assert broker.client().get_lease(lease.id).state == "granted"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("POST", "/api/v1/leases", b"{not json", 400, "not valid JSON"),
        ("POST", "/api/v1/leases", b"[1]", 400, "JSON object"),
        ("POST", "/api/v1/leases", b'{"kernel_id": "k"}', 400, "missing field 'kind'"),
        ("POST", "/api/v1/leases", b'{"kind": 3, "kernel_id": "k"}', 400, "field 'kind'"),
        ("POST", "/api/v1/leases", b'{"kind": "any"}', 400, "'kernel_id'"),
        ("POST", "/api/v1/leases", b'{"kind": "h100", "kernel_id": "k"}', 400, "'a100', 'mig'"),
        ("POST", "/api/v1/leases", "\udcff".encode("utf-8", "surrogatepass"), 400, "JSON"),
        ("GET", "/api/v1/leases/nope", None, 404, "no lease"),
        ("GET", "/api/v1/nothing", None, 404, "no such endpoint"),
        ("PUT", "/api/v1/leases", b"{}", 405, "not allowed"),
        ("DELETE", "/api/v1/status", None, 405, "not allowed"),
    ],
)
def test_bad_requests(
    broker: Broker, method: str, path: str, body, status: int, words: str
) -> None:
    got, data = broker.raw(method, path, body)
    assert got == status, data
    assert set(data) == {"error"} and set(data["error"]) == {"code", "message"}
    assert words in data["error"]["message"]


def test_bad_heartbeat_and_wait(broker: Broker) -> None:
    lease = broker.client().request_lease("a100", "k")
    got, data = broker.raw("POST", f"/api/v1/leases/{lease.id}/heartbeat", b'{"busy": "yes"}')
    assert got == 400 and "'busy'" in data["error"]["message"]
    got, data = broker.raw(
        "POST", f"/api/v1/leases/{lease.id}/heartbeat", b'{"last_activity": "now"}'
    )
    assert got == 400 and "'last_activity'" in data["error"]["message"]
    got, data = broker.raw("GET", f"/api/v1/leases/{lease.id}?wait=soon")
    assert got == 400 and "wait" in data["error"]["message"]


def test_status_visibility(broker: Broker) -> None:
    broker.client().request_lease("a100", "k1")
    broker.client("bob").request_lease("mig", "k2")
    broker.client("bob").request_lease("a100", "k3")
    broker.client("bob").request_lease("mig", "k4")  # queued
    mine = broker.client().status()
    assert [slot["state"] for slot in mine["slots"]] == ["busy", "busy", "busy"]
    text = json.dumps(mine)
    assert "bob" not in text
    assert {lease["user"] for lease in mine["leases"]} == {"alice"}
    assert mine["queue"][0]["user"] is None and mine["queue"][0]["mine"] is False
    assert "address" not in mine["hosts"][0]
    admin = broker.client("root").status()
    assert {lease["user"] for lease in admin["leases"]} == {"alice", "bob"}
    assert admin["queue"][0]["user"] == "bob"
    assert admin["hosts"][0]["address"] == "gpu1.example.org"


def test_client_unreachable() -> None:
    client = BrokerClient(f"http://127.0.0.1:{free_port()}", "sgpu_x")
    with pytest.raises(BrokerUnreachable, match="connection refused") as err:
        client.whoami()
    assert "gpu-broker serve" in str(err.value)


def test_client_reconnects_after_server_restart(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, port=port)
    toks = tokens(path)
    client = BrokerClient(f"http://127.0.0.1:{port}", toks["alice"])
    for _ in range(2):
        server = BrokerServer(load_config(path), tick_interval=0.05)
        server.start_in_thread()
        assert client.whoami()["user"] == "alice"  # 2nd time: the kept-alive socket is dead
        server.stop_thread()
    client.close()


def _serve(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(path), "--tick", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc


def _wait_up(client: BrokerClient) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            client.whoami()
            return
        except BrokerUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_restart_after_sigkill_keeps_leases(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, port=port)
    toks = tokens(path)
    alice = BrokerClient(f"http://127.0.0.1:{port}", toks["alice"])
    bob = BrokerClient(f"http://127.0.0.1:{port}", toks["bob"])
    proc = _serve(path)
    try:
        _wait_up(alice)
        granted = alice.request_lease("mig", "k1")
        queued = [bob.request_lease("mig", f"q{i}") for i in range(2)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        proc = _serve(path)
        _wait_up(alice)
        again = alice.get_lease(granted.id)
        assert (again.state, again.slot.id) == ("granted", "gpu2/mig0")
        assert [bob.get_lease(q.id).position for q in queued] == [1, 2]
        newer = alice.request_lease("mig", "k9")
        assert newer.position == 3  # seq continues after the restart
        alice.release(granted.id)
        assert bob.get_lease(queued[0].id).state == "granted"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0].decode()
        assert proc.returncode == 0, out
        assert "serving http://127.0.0.1" in out and "Traceback" not in out
        assert "sgpu_" not in out  # nothing secret in the log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        alice.close()
        bob.close()


# -- the token cache behind verify (Store.token_by_hash): two connections on one file, like the
# -- broker and ``gpu-broker token create|revoke`` ---------------------------------------------


@pytest.fixture
def two_stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    broker_store, cli_store = Store(tmp_path / "t.sqlite"), Store(tmp_path / "t.sqlite")
    yield broker_store, cli_store
    cli_store.close()
    broker_store.close()


def test_token_revoked_by_another_connection_is_refused_at_once(
    two_stores: tuple[Store, Store],
) -> None:
    from broker.http.auth import revoke_token, verify

    store, cli = two_stores
    token, row = create_token(store, "alice")
    other, _ = create_token(store, "bob")
    for _ in range(3):  # cached now
        assert verify(store, token) == verify(store, token)
        assert verify(store, token) is not None and verify(store, other) is not None
    assert store.cached_tokens() == 2
    revoke_token(cli, row.id)
    assert verify(store, token) is None
    assert verify(store, other) is not None


def test_token_created_by_another_connection_is_accepted_at_once(
    two_stores: tuple[Store, Store],
) -> None:
    from broker.http.auth import verify

    store, cli = two_stores
    first, _ = create_token(store, "alice")
    assert verify(store, first) is not None
    token, _ = create_token(cli, "carol", "teacher")
    who = verify(store, token)
    assert who is not None and (who.user, who.role) == ("carol", "teacher")


def test_token_revoked_through_the_same_store_is_refused_at_once(tmp_path: Path) -> None:
    from broker.http.auth import revoke_token, verify

    store = Store(tmp_path / "t.sqlite")
    token, row = create_token(store, "alice")
    assert verify(store, token) is not None and verify(store, token) is not None
    revoke_token(store, row.prefix)
    assert verify(store, token) is None
    token2, _ = create_token(store, "alice")
    assert verify(store, token2) is not None
    store.close()


def test_unknown_tokens_do_not_grow_the_token_cache(tmp_path: Path) -> None:
    import secrets

    from broker.http.auth import TOKEN_PREFIX, verify

    store = Store(tmp_path / "t.sqlite")
    store.token_cache_size = 4
    known = [create_token(store, f"u{i}")[0] for i in range(6)]
    for _ in range(2000):
        assert verify(store, TOKEN_PREFIX + secrets.token_urlsafe(32)) is None
    assert store.cached_tokens() == 0  # misses are never kept
    for token in known + known:  # more known tokens than the bound: the oldest make room
        assert verify(store, token) is not None
        assert store.cached_tokens() <= 4
    for _ in range(2000):
        assert verify(store, TOKEN_PREFIX + secrets.token_urlsafe(32)) is None
    assert store.cached_tokens() == 4
    store.close()
