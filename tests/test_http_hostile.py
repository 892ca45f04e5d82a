"""Hostile clients against a real broker on a raw socket (``broker.http.front``, limits in
``broker.http.limits``): one that pipelines without reading its replies, connections up to the
caps, slowloris headers, slow and stalled bodies. Meanwhile a well-behaved kernel's heartbeats
must be answered (the bound here is generous for a shared 2-core machine;
bench/http_front_load.py measures the real p99) and the broker's memory (RSS from /proc, the
broker runs in this process) must stay bounded."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import BrokerClient
from broker.http import limits as http_limits
from tests.test_http_front import Wire, error_of, read_all, read_reply

HEARTBEAT_BOUND = 1.0  # seconds: generous; the bench reports the real p99


def rss() -> int:
    """This process's resident memory in bytes (the broker runs on a thread of it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Heartbeats:
    """A well-behaved kernel: a granted lease, heartbeating on its own kept-alive connection
    every ``every`` seconds until ``stop()``; ``slowest`` is its slowest heartbeat."""

    def __init__(self, wire: Wire, every: float = 0.05) -> None:
        self.client = BrokerClient(f"http://127.0.0.1:{wire.address[1]}", wire.token, timeout=10)
        self.lease = self.client.request_lease("a100", "kernel-1")
        assert self.lease.state == "granted"
        self.every = every
        self.times: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.client.heartbeat(self.lease.id, busy=False, last_activity=time.time())
            except BaseException as exc:  # reported by stop()
                self.errors.append(exc)
                return
            self.times.append(time.monotonic() - t0)
            self._stop.wait(self.every)

    def stop(self) -> float:
        """Stop; the slowest heartbeat in seconds (errors fail the test)."""
        self._stop.set()
        self._thread.join(timeout=15)
        self.client.close()
        assert not self.errors, self.errors
        assert len(self.times) >= 3, "the heartbeats did not run"
        return max(self.times)


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[Wire]:
    w = Wire(tmp_path)
    yield w
    w.server.stop_thread()


def open_from(wire: Wire, source: str) -> socket.socket:
    """A connection to the broker from the loopback address ``source`` (127.0.0.x)."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(wire.address)
    return sock


def send_until_stalled(sock: socket.socket, data: bytes, limit: int, seconds: float) -> int:
    """Send ``data`` over and over without reading until ``limit`` bytes are sent or the
    broker has taken nothing for ``seconds``; return the bytes sent."""
    sock.setblocking(False)
    sent, view, stalled = 0, memoryview(data), time.monotonic()
    while sent < limit and time.monotonic() - stalled < seconds:
        try:
            start = sent % len(data)
            n = sock.send(view[start : start + limit - sent])
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        stalled = time.monotonic()
    sock.setblocking(True)
    return sent


def held_by_broker(wire: Wire) -> tuple[int, int]:
    """(unsent reply bytes, connections) across the broker's connections, read on its loop."""

    def count() -> tuple[int, int]:
        connections = list(wire.server._connections)
        buffered = sum(c.transport.get_write_buffer_size() for c in connections if c.transport)
        return buffered, len(connections)

    return wire.server.call(count)  # type: ignore[return-value]


def test_a_client_that_does_not_read_its_replies_stops_being_read(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's client: pipelined requests whose replies it never reads. Each one here asks
    for a lease with a 32 kB id, so each 404 names it back: 32 kB of reply per request. Once
    its replies have waited SEND_TIMEOUT, the broker drops the connection."""
    monkeypatch.setattr(http_limits, "SEND_TIMEOUT", 2.0)
    beats = Heartbeats(wire)
    request = wire.request("GET", "/api/v1/leases/" + "x" * 32_000)
    before = rss()
    attacker = socket.socket()
    attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a window that fills at once
    attacker.connect(wire.address)
    sent = send_until_stalled(attacker, request, limit=64 << 20, seconds=1.0)
    buffered, connections = held_by_broker(wire)
    grown = rss() - before
    assert connections == 2  # the attacker's and the heartbeats'
    deadline = time.monotonic() + 10
    while held_by_broker(wire)[1] > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    dropped = held_by_broker(wire)[1] == 1
    slowest = beats.stop()
    attacker.close()
    # Reading stops once WRITE_HIGH_WATER is passed: at most that plus one reply stay unsent.
    assert buffered <= http_limits.WRITE_HIGH_WATER + len(request) + 1024, (buffered, sent)
    assert sent < 32 << 20, "the broker kept reading a client that reads nothing"
    assert grown < 24 << 20, f"RSS grew by {grown / 2**20:.1f} MiB"
    assert dropped, "the connection of a client that reads nothing was kept"
    assert slowest < HEARTBEAT_BOUND


def test_connections_past_the_caps_get_503_and_a_close(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_limits, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(http_limits, "MAX_CONNECTIONS_PER_ADDRESS", 5)
    beats = Heartbeats(wire)  # one connection from 127.0.0.1
    idle = [wire.connect() for _ in range(4)]  # 127.0.0.1 is at its 5
    for sock in idle:
        sock.sendall(wire.request("GET", "/api/v1/whoami"))
        assert read_reply(sock)[0] == 200  # admitted; now idle and kept alive
    with wire.connect() as sixth:
        reply = read_all(sixth)  # refused at once, before it sends anything
    assert error_of(reply) == (503, "too_many_connections")
    message = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert "127.0.0.1 has 5 connections open, the limit for one address" in message
    others = [open_from(wire, "127.0.0.2") for _ in range(3)]  # 8 in all: the cap
    for sock in others:
        sock.sendall(wire.request("GET", "/api/v1/whoami"))
        assert read_reply(sock)[0] == 200
    with open_from(wire, "127.0.0.3") as ninth:
        reply = read_all(ninth)
    assert error_of(reply) == (503, "too_many_connections")
    assert "its limit" in json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"]
    time.sleep(0.3)  # heartbeats go on over their kept-alive connection
    for sock in idle[:2]:
        sock.close()
    deadline = time.monotonic() + 5
    while held_by_broker(wire)[1] > 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    with wire.connect() as again:  # room again
        again.sendall(wire.request("GET", "/api/v1/whoami"))
        assert read_reply(again)[0] == 200
    assert beats.stop() < HEARTBEAT_BOUND
    for sock in idle[2:] + others:
        sock.close()


def test_slowloris_headers_get_408_and_a_close(wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that send a header byte now and then never finish their request: each is
    answered 408 within HEADER_TIMEOUT of its first byte, however steadily it trickles."""
    monkeypatch.setattr(http_limits, "HEADER_TIMEOUT", 0.5)
    beats = Heartbeats(wire)
    slow = [wire.connect() for _ in range(20)]
    head = wire.request("GET", "/api/v1/whoami", extra="X-Slow: " + "a" * 100 + "\r\n")
    t0 = time.monotonic()
    closed: set[int] = set()
    for i in range(len(head)):
        for n, sock in enumerate(slow):
            if n not in closed:
                try:
                    sock.sendall(head[i : i + 1])
                except OSError:
                    closed.add(n)
        if time.monotonic() - t0 > 1.5:
            break
        time.sleep(0.05)
    for sock in slow:
        sock.settimeout(3)
        assert error_of(read_all(sock)) == (408, "request_timeout")
        sock.close()
    assert time.monotonic() - t0 < 4
    assert beats.stop() < HEARTBEAT_BOUND


def test_a_body_slower_than_the_minimum_rate_gets_408_and_a_faster_one_is_served(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_limits, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(http_limits, "BODY_MIN_RATE", 2000)  # bytes/s, after the first 0.5 s
    monkeypatch.setattr(http_limits, "LINGER", 0.3)  # the 408's connection closes sooner
    body = json.dumps({"kind": "a100", "kernel_id": "k"}).encode().ljust(3000)

    def post(sock: socket.socket, step: int, pause: float) -> threading.Thread:
        """Send the request, its body ``step`` bytes every ``pause`` seconds, on a thread."""
        sock.sendall(
            f"POST /api/v1/leases HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {wire.token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )

        def trickle() -> None:
            try:
                for i in range(0, len(body), step):
                    sock.sendall(body[i : i + step])
                    time.sleep(pause)
            except OSError:
                pass  # closed on us: the reply says why

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        return thread

    beats = Heartbeats(wire)
    with wire.connect() as slow:
        t0 = time.monotonic()
        sender = post(slow, 20, 0.1)  # 200 bytes/s: 15 s for the body
        status, headers, _ = read_reply(slow)
        assert status == 408 and headers["connection"] == "close"
        assert time.monotonic() - t0 < 2  # due after about 0.56 s
        assert read_all(slow) == b""
        sender.join(timeout=10)
    with wire.connect() as steady:
        sender = post(steady, 1000, 0.25)  # 4,000 bytes/s: within the rate, longer than 0.5 s
        status, _, reply = read_reply(steady)
        assert status == 201 and json.loads(reply)["state"] == "granted"
        sender.join(timeout=10)
    assert beats.stop() < HEARTBEAT_BOUND


def test_stalled_bodies_hold_no_more_than_the_read_budget(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many connections each send most of a 1 MiB body, then stall. The broker holds at most
    REQUEST_ALLOWANCE per connection plus READ_BUDGET of them; the rest waits in the kernel,
    and a heartbeat (small) is still read and answered meanwhile."""
    monkeypatch.setattr(http_limits, "READ_BUDGET", 1 << 20)
    monkeypatch.setattr(http_limits, "BODY_TIMEOUT", 30.0)
    connections = 24
    beats = Heartbeats(wire)
    before = rss()
    length = http_limits.MAX_BODY_BYTES
    head = (f"POST /api/v1/leases HTTP/1.1\r\nHost: b\r\nContent-Length: {length}\r\n\r\n").encode()
    stalled = [wire.connect() for _ in range(connections)]
    for sock in stalled:
        sock.sendall(head)
        send_until_stalled(sock, b"x" * 65536, limit=length - 1, seconds=0.1)
    time.sleep(0.3)
    grown = rss() - before
    slowest = beats.stop()
    for sock in stalled:
        sock.close()
    # Without the budget the broker would hold about 24 MiB of body here.
    bound = http_limits.READ_BUDGET + connections * (
        http_limits.REQUEST_ALLOWANCE + http_limits.READ_SIZE
    )
    assert grown < bound + (8 << 20), f"RSS grew by {grown / 2**20:.1f} MiB"
    assert slowest < HEARTBEAT_BOUND


class Waiting:
    """Stands in for a connection in ``Connections``' budget: what ``settle`` reads and calls."""

    def __init__(self, fed: list[Waiting]) -> None:
        self.drawn = 0
        self._fed = fed

    def fed(self) -> None:
        self._fed.append(self)


def test_the_read_budget_is_lent_beyond_each_allowance_and_given_back_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_limits, "REQUEST_ALLOWANCE", 1000)
    monkeypatch.setattr(http_limits, "READ_BUDGET", 10_000)
    monkeypatch.setattr(http_limits, "READ_SIZE", 4000)
    connections = http_limits.Connections()
    fed: list[Waiting] = []
    big, late, later, small = (Waiting(fed) for _ in range(4))
    assert connections.settle(small, 900)  # under the allowance: no budget at all
    assert connections.settle(big, 10_500) and connections.spent == 9_500
    assert not connections.settle(late, 3_000)  # 2,000 more: over the budget
    assert not connections.settle(later, 2_000)
    assert connections.settle(small, 1_000)  # a heartbeat still goes through
    assert connections.settle(big, 4_000)  # big's requests answered: room for two reads
    assert fed == [late, later] and connections.spent == 3_000 + 2_000 + 1_000
    connections.forget(big)  # gone: all it drew comes back
    connections.forget(late)
    connections.forget(later)
    assert connections.spent == 0


def test_a_class_connecting_at_once_is_accepted_without_tcp_retries(wire: Wire) -> None:
    """300 students connect while the broker's loop is busy for a moment: the listen backlog
    holds them all, so all are accepted as soon as the loop is free (with asyncio's default
    backlog, 100, the rest had to retry their SYN a second later)."""
    busy = threading.Thread(target=wire.server.call, args=(lambda: time.sleep(0.2),))
    busy.start()
    time.sleep(0.02)
    t0 = time.monotonic()
    students = []
    for _ in range(300):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(wire.address)
        students.append(sock)
    busy.join()
    accepted = 0
    while accepted < 300 and time.monotonic() - t0 < 0.9:  # a SYN is sent again after 1 s
        accepted = held_by_broker(wire)[1]
    assert accepted == 300, f"{accepted} of 300 accepted before the first SYN retry"
    for sock in students:
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(wire.request("GET", "/api/v1/whoami"))
    for sock in students:
        assert read_reply(sock)[0] == 200
        sock.close()


def test_a_refused_client_that_keeps_sending_is_cut_off(wire: Wire) -> None:
    """After a refusal the broker drains what the client still sends so that the reply is not
    lost to a reset, but only MAX_DRAIN bytes of it, not LINGER seconds at wire speed."""
    with wire.connect() as sock:
        sock.sendall(b"NOT A REQUEST\r\n\r\n")
        sock.settimeout(2)
        sent, chunk, t0 = 0, b"x" * 65536, time.monotonic()
        try:
            while sent < 256 << 20 and time.monotonic() - t0 < http_limits.LINGER:
                sent += sock.send(chunk)
        except OSError:
            pass  # reset: cut off
    assert sent < 32 << 20, f"the broker read {sent / 2**20:.0f} MiB after refusing the request"
