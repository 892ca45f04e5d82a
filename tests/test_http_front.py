"""The broker's HTTP server (``broker.http.front``, limits in ``broker.http.limits``) on a real
socket: limits, malformed input, keep-alive and timeouts, as a client on the wire sees them."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config.loader import load_config
from broker.daemon import BrokerServer
from broker.http import limits as http_limits
from tests.test_broker_api import tokens, write_config


class Wire:
    """A broker and raw sockets to it."""

    def __init__(self, tmp: Path) -> None:
        path = write_config(tmp)
        self.token = tokens(path)["alice"]
        self.server = BrokerServer(load_config(path), port=0)
        self.server.start_in_thread()
        self.address = ("127.0.0.1", self.server.port)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def request(self, method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        )
        return head.encode() + body


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One reply with a Content-Length body, off a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest[:length]


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[Wire]:
    w = Wire(tmp_path)
    yield w
    w.server.stop_thread()


def error_of(reply: bytes) -> tuple[int, str]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]["code"]


def test_headers_over_the_limit_get_431_and_a_close(wire: Wire) -> None:
    big = "X-Filler: " + "a" * http_limits.MAX_HEADER_BYTES + "\r\n"
    with wire.connect() as sock:
        sock.sendall(wire.request("GET", "/api/v1/whoami", extra=big))
        assert error_of(read_all(sock)) == (431, "headers_too_large")


def test_a_body_over_the_limit_gets_413_before_it_is_sent(wire: Wire) -> None:
    with wire.connect() as sock:
        length = http_limits.MAX_BODY_BYTES + 1
        sock.sendall(
            f"POST /api/v1/leases HTTP/1.1\r\nHost: b\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        assert error_of(read_all(sock)) == (413, "too_large")
    with wire.connect() as sock:  # chunked: no length up front, counted as it comes
        sock.sendall(
            b"POST /api/v1/leases HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 65536
        try:
            for _ in range(http_limits.MAX_BODY_BYTES // len(chunk) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server closed while we were still sending
        assert error_of(read_all(sock)) == (413, "too_large")


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT A REQUEST\r\n\r\n",
        b"GET /api/v1/whoami HTTP/1.1\r\nHost b\r\n\r\n",
        b"GET /api/v1/whoami HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET /api/v1/whoami HTTP/1.1\r\nX-Bad: a\x01b\r\n\r\n",
        b"GET /api/v1/whoami HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
)
def test_malformed_requests_get_400_and_the_broker_goes_on(wire: Wire, raw: bytes) -> None:
    with wire.connect() as sock:
        sock.sendall(raw)
        status, code = error_of(read_all(sock))
        assert status == 400 and code == "bad_request"
    with wire.connect() as sock:
        sock.sendall(wire.request("GET", "/api/v1/whoami"))
        status, _, body = read_reply(sock)
        assert status == 200 and json.loads(body)["user"] == "alice"


def test_keep_alive_expect_continue_and_chunked_bodies(wire: Wire) -> None:
    with wire.connect() as sock:
        sock.sendall(wire.request("GET", "/api/v1/whoami"))
        assert read_reply(sock)[0] == 200
        body = b'{"kind": "a100", "kernel_id": "k"}'
        sock.sendall(
            (
                "POST /api/v1/leases HTTP/1.1\r\nHost: b\r\n"
                f"Authorization: Bearer {wire.token}\r\nExpect: 100-continue\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        status, headers, reply = read_reply(sock)
        assert status == 201 and headers["location"].endswith(json.loads(reply)["id"])
        lease_id = json.loads(reply)["id"]
        sock.sendall(
            (
                f"DELETE /api/v1/leases/{lease_id} HTTP/1.1\r\nHost: b\r\n"
                f"Authorization: Bearer {wire.token}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b'{"rea', b'son": "released"}'))
            + b"0\r\n\r\n"
        )
        status, _, reply = read_reply(sock)
        assert status == 200 and json.loads(reply)["state"] == "released"
        sock.sendall(wire.request("GET", "/api/v1/whoami", extra="Connection: close\r\n"))
        reply_and_close = read_all(sock)
        assert (
            reply_and_close.startswith(b"HTTP/1.1 200") and b"Connection: close" in reply_and_close
        )


def test_slow_and_idle_connections_are_closed(wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_limits, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(http_limits, "IDLE_TIMEOUT", 1.0)
    with wire.connect() as slow:
        slow.sendall(b"GET /api/v1/whoami HTTP/1.1\r\nHost: b\r\n")  # never finishes
        t0 = time.monotonic()
        assert error_of(read_all(slow)) == (408, "request_timeout")
        assert time.monotonic() - t0 < 5
    with wire.connect() as idle:
        idle.sendall(wire.request("GET", "/api/v1/whoami"))
        assert read_reply(idle)[0] == 200
        t0 = time.monotonic()
        assert read_all(idle) == b""
        assert 0.5 < time.monotonic() - t0 < 5


def test_garbage_after_a_good_request_on_one_connection(wire: Wire) -> None:
    """The good request is answered first, then the garbage gets its 400 and the close."""
    with wire.connect() as sock:
        sock.sendall(wire.request("GET", "/api/v1/whoami") + b"BLAH\r\n\r\n")
        data = read_all(sock)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b'"user": "alice"' in rest and b"HTTP/1.1 400 Bad Request" in rest
