"""The hot lease calls (``broker.http.routes``) answer exactly as the ``tornado.web`` handlers
do: two real brokers, one with each front, get the same requests over real HTTP."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config.loader import load_config
from broker.daemon import BrokerServer
from tests.test_broker_api import tokens, write_config

VOLATILE = {"id", "now", "created_at", "granted_at", "last_heartbeat", "ended_at", "last_activity"}


class Front:
    """One broker, spoken to over raw HTTP/1.1 on one kept-alive connection."""

    def __init__(self, root: Path, lease_routes: bool) -> None:
        root.mkdir()
        path = write_config(root)
        self.tokens = tokens(path)
        self.server = BrokerServer(load_config(path), port=0, lease_routes=lease_routes)
        parts = urllib.parse.urlsplit(self.server.start_in_thread())
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)

    def call(
        self, method: str, path: str, body: bytes | None, who: str | None = "alice"
    ) -> tuple[int, dict, dict[str, str]]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = json.loads(response.read())
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}

    def close(self) -> None:
        self.conn.close()
        self.server.stop_thread()


@pytest.fixture
def fronts(tmp_path: Path) -> Iterator[tuple[Front, Front]]:
    web, routes = Front(tmp_path / "web", False), Front(tmp_path / "routes", True)
    yield web, routes
    web.close()
    routes.close()


def comparable(data: object) -> object:
    """A reply with what differs between two brokers by nature (ids, times) blanked out."""
    if isinstance(data, dict):
        return {k: ("*" if k in VOLATILE else comparable(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [comparable(v) for v in data]
    return data


def both(fronts: tuple[Front, Front], method: str, path: str, body: bytes | None, **kw) -> tuple:
    """Send the same call to both; assert the same status, body and JSON headers; return the
    routes broker's reply."""
    web, routes = (front.call(method, path, body, **kw) for front in fronts)
    assert web[0] == routes[0], (method, path, body, web, routes)
    assert comparable(web[1]) == comparable(routes[1]), (method, path, body)
    for name in ("content-type", "cache-control"):
        assert web[2].get(name) == routes[2].get(name), name
    return routes


def test_grant_heartbeat_release_answer_the_same(fronts: tuple[Front, Front]) -> None:
    body = b'{"kind": "a100", "kernel_id": "k1"}'
    status, lease, headers = both(fronts, "POST", "/api/v1/leases", body)
    assert status == 201 and lease["state"] == "granted" and lease["slot"]["id"] == "gpu1/0"
    assert headers["location"] == f"/api/v1/leases/{lease['id']}"
    ids = [front.call("GET", "/api/v1/status", None)[1] for front in fronts]
    assert comparable(ids[0]) == comparable(ids[1])

    web_id = fronts[0].call("GET", "/api/v1/status", None)[1]["slots"][0]["lease"]["id"]
    for front, lease_id in ((fronts[0], web_id), (fronts[1], lease["id"])):
        reply = front.call("POST", f"/api/v1/leases/{lease_id}/heartbeat", b'{"busy": true}')
        assert reply[0] == 200 and reply[1]["lease"]["busy"] is True and reply[1]["orders"] == []
        released = front.call("DELETE", f"/api/v1/leases/{lease_id}", None)
        assert released[0] == 200 and released[1]["state"] == "released"
        again = front.call("DELETE", f"/api/v1/leases/{lease_id}", None)
        assert again[0] == 200 and again[1]["end_reason"] == "released"


@pytest.mark.parametrize(
    "method,path,body,who,status",
    [
        ("POST", "/api/v1/leases", b'{"kind": "a100", "kernel_id": "k"}', None, 401),
        ("POST", "/api/v1/leases", b"{not json", "alice", 400),
        ("POST", "/api/v1/leases", b"[1, 2]", "alice", 400),
        ("POST", "/api/v1/leases", b'{"kind": "h100", "kernel_id": "k"}', "alice", 400),
        ("POST", "/api/v1/leases", b'{"kind": "a100"}', "alice", 400),
        ("POST", "/api/v1/leases", b'{"kind": true, "kernel_id": "k"}', "alice", 400),
        ("POST", "/api/v1/leases", b'{"kind": "", "kernel_id": "k"}', "alice", 400),
        ("POST", "/api/v1/leases", b"\xff\xfe", "alice", 400),
        ("DELETE", "/api/v1/leases/nope", None, "alice", 404),
        ("DELETE", "/api/v1/leases/%FF%FE", None, "alice", 400),
        ("DELETE", "/api/v1/leases/caf%C3%A9", None, "alice", 404),
        ("POST", "/api/v1/leases/nope/heartbeat", b"{}", "alice", 404),
        ("POST", "/api/v1/leases/nope/heartbeat", b'{"busy": 1}', "alice", 400),
        ("PUT", "/api/v1/leases", b"{}", "alice", 405),
        ("GET", "/api/v1/leases/nope/heartbeat", None, "alice", 405),
        ("POST", "/api/v1/leases/", b"{}", "alice", 404),
    ],
)
def test_errors_answer_the_same(
    fronts: tuple[Front, Front], method: str, path: str, body: bytes | None, who, status: int
) -> None:
    got, data, _ = both(fronts, method, path, body, who=who)
    assert got == status, data
    assert set(data) == {"error"} and data["error"]["message"]


def test_another_users_lease_is_403_on_both(fronts: tuple[Front, Front]) -> None:
    for front in fronts:
        _, lease, _ = front.call("POST", "/api/v1/leases", b'{"kind": "a100", "kernel_id": "k"}')
        for method, path in (
            ("DELETE", f"/api/v1/leases/{lease['id']}"),
            ("POST", f"/api/v1/leases/{lease['id']}/heartbeat"),
        ):
            status, data, _ = front.call(method, path, b"{}", who="bob")
            assert status == 403 and "another user" in data["error"]["message"]
        assert front.call("GET", f"/api/v1/leases/{lease['id']}", None)[1]["state"] == "granted"


def test_http10_and_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    """A raw socket: two calls written at once on one connection, then an HTTP/1.0 one."""
    import socket

    front = Front(tmp_path / "raw", True)
    try:
        token = front.tokens["alice"]
        body = b'{"kind": "a100", "kernel_id": "k"}'
        one = (
            b"POST /api/v1/leases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        host, port = front.conn.host, front.conn.port
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(one + one)
            data = b""
            while data.count(b"HTTP/1.1 201") < 2:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        slots = [
            json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["slot"]["id"]
            for part in data.split(b"HTTP/1.1 201")[1:]
        ]
        assert slots == ["gpu1/0", "gpu1/1"]
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(one.replace(b"HTTP/1.1", b"HTTP/1.0", 1))
            data = b""
            while chunk := sock.recv(65536):  # HTTP/1.0 without keep-alive: server closes
                data += chunk
        assert data.startswith(b"HTTP/1.1 202") and b'"position": 1' in data
    finally:
        front.close()
