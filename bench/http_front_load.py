"""The broker's HTTP front under the loads that matter and under hostile clients. Not a test.

    .venv/bin/python bench/http_front_load.py [--fronts new,tornado,old=/tmp/http-before]
        [--only kernels,pipeline,idle,slowloris,slowbody,stalled] [--kernels 10000]
        [--cadence 15] [--burst 500] [--attack-seconds 8] [--sync FULL]

Each front runs as its own broker process (so its RSS and CPU are its own, read from /proc):

- ``new``: this checkout's front (``broker.http.front``);
- ``old=PATH``: the front of another checkout (``PYTHONPATH=PATH``), e.g. ``git worktree add
  /tmp/http-before main``: before and after in one sitting;
- ``tornado``: this checkout's handlers on ``tornado.httpserver.HTTPServer`` with its own
  limits (``idle_connection_timeout=60``, ``body_timeout=10``, 64 KiB of headers, 1 MiB of body).

Scenarios, each on a fresh broker:

- ``wire``: the front alone (every request answered with the same small JSON, no broker behind
  it), 16,000 heartbeat-shaped requests over 16 connections, each front five times in turn:
  the median of the server's CPU per request;
- ``kernels``: ``--kernels`` leases granted over 16 connections (grant throughput), heartbeated
  over 16 connections for ``--seconds`` (heartbeat throughput), then one connection per kernel
  heartbeating every ``--cadence`` seconds for two rounds, with ``--burst`` students asking for
  a lease at once (each on a new connection) halfway through; then the leases released over 16
  connections (release throughput). Half the burst is queued: the pool has ``kernels + burst/2``
  slots;
- attacks, each for ``--attack-seconds`` while 10 kernels heartbeat every 0.1 s (their p99 is the
  figure): ``pipeline`` (one unauthenticated client pipelines GET /whoami and reads nothing),
  ``pipeline32k`` (the same from a user whose requests name a 32 kB lease id: 32 kB 404s),
  ``idle`` (``--idle`` connections from six loopback addresses, sending nothing), ``slowloris``
  (2,000 connections sending a header byte a second, reconnecting when closed; 16 s),
  ``slowbody`` (2,000 POSTs of 1 MiB bodies at 16 bytes a second; 20 s), ``stalled`` (256 POSTs
  sending all but the last byte of a 1 MiB body, then nothing). RSS before, at its peak, and
  2 s after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


# -- the broker process ------------------------------------------------------------------------


def serve(front: str, workdir: str, slots: int, users: int, sync: str) -> None:
    """Run in the broker's process: tokens, then a broker; print its port and the tokens."""
    from broker_load import config_text  # this directory: heartbeats due every 10 min

    try:
        from broker.config.loader import parse_config
        from broker.daemon import BrokerServer
        from broker.http.app import make_router
        from broker.http.auth import create_token
        from broker.store.sqlite import Store
    except ImportError:  # a checkout from before broker/ was grouped by concern (PYTHONPATH)
        from broker.api import make_router  # type: ignore[no-redef]
        from broker.auth import create_token  # type: ignore[no-redef]
        from broker.server import BrokerServer  # type: ignore[no-redef]

        from broker.config import parse_config  # type: ignore[no-redef]
        from broker.store import Store  # type: ignore[no-redef]

    config = parse_config(config_text(slots), Path(workdir) / "broker.toml")
    store = Store(config.server.database, synchronous="OFF")
    tokens = [create_token(store, f"u{i}")[0] for i in range(users)]
    store.close()
    server = BrokerServer(config, port=0, synchronous=sync)
    server.start_in_thread()
    port = server.port
    if front == "tornado":
        from tornado.httpserver import HTTPServer
        from tornado.netutil import bind_sockets

        def listen() -> int:
            assert server.service is not None
            http = HTTPServer(
                make_router(server.service),
                idle_connection_timeout=60,
                body_timeout=10,
                max_header_size=64 * 1024,
                max_body_size=MIB,
            )
            sockets = bind_sockets(0, "127.0.0.1")
            http.add_sockets(sockets)
            return sockets[0].getsockname()[1]

        port = server.call(listen)  # type: ignore[assignment]
    print(json.dumps({"port": port, "tokens": tokens}), flush=True)
    sys.stdin.read()  # until the bench closes it
    server.stop_thread()


def serve_wire(front: str) -> None:
    """Run in the server's process: the front alone, every request answered with the same
    small JSON (no broker behind it), to measure what the front itself costs per request."""
    from tornado import httputil

    class Answer(httputil.HTTPMessageDelegate):
        def __init__(self, connection: httputil.HTTPConnection) -> None:
            self.connection = connection

        def finish(self) -> None:
            body = b'{"lease": {}, "orders": []}'
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
            start = httputil.ResponseStartLine("HTTP/1.1", 200, "OK")
            self.connection.write_headers(start, httputil.HTTPHeaders(headers), body)
            self.connection.finish()

    class Router(httputil.HTTPServerConnectionDelegate):
        def find_handler(self, request: httputil.HTTPServerRequest) -> Answer:  # http_front
            assert request.connection is not None
            return Answer(request.connection)

        def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection):
            return Answer(request_conn)  # tornado's HTTPServer

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if front == "tornado":
            from tornado.httpserver import HTTPServer
            from tornado.netutil import bind_sockets

            sockets = bind_sockets(0, "127.0.0.1")
            HTTPServer(Router(), idle_connection_timeout=60, body_timeout=10).add_sockets(sockets)
            port = sockets[0].getsockname()[1]
        else:
            try:
                from broker.http import front as http_front
            except ImportError:  # a checkout from before broker/ was grouped by concern
                from broker import http_front  # type: ignore[no-redef]

            # The front before the limits took a plain set for its connections.
            shared = http_front.Connections() if hasattr(http_front, "Connections") else set()
            factory = lambda: http_front.HttpProtocol(Router(), shared)  # noqa: E731
            server = await loop.create_server(factory, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
        print(json.dumps({"port": port, "tokens": []}), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


class Broker:
    """A broker process serving ``front`` (see the module's docstring); with ``wire``, the
    front alone (``serve_wire``)."""

    def __init__(
        self, front: str, slots: int, users: int, sync: str = "FULL", wire: bool = False
    ) -> None:
        name, _, path = front.partition("=")
        env = dict(os.environ)
        if path:
            env["PYTHONPATH"] = path
        self.workdir = tempfile.mkdtemp(prefix="http-front-")
        command = [sys.executable, __file__, "--serve", name, self.workdir, str(slots), str(users)]
        command.append(sync)
        if wire:
            command = [sys.executable, __file__, "--serve-wire", name]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(Path(self.workdir) / "broker.log", "wb"),  # noqa: SIM115
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline())
        self.port: int = first["port"]
        self.tokens: list[str] = first["tokens"]

    def rss(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(text.split("VmRSS:")[1].split()[0]) * 1024

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- a client ----------------------------------------------------------------------------------


class Conn:
    """One kept-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str | None = None) -> Conn:
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def call(
        self, method: str, path: str, token: str, body: dict | None = None
    ) -> tuple[int, bytes, float]:
        payload = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        t0 = time.perf_counter()
        self.writer.write(head.encode() + payload)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = int(raw.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        reply = await self.reader.readexactly(length)
        return status, reply, time.perf_counter() - t0

    def close(self) -> None:
        self.writer.close()


def jupyter_host(i: int) -> str:
    """The loopback address kernel ``i``'s Jupyter server calls from: 16 of them, as if the
    kernels were spread over 16 Jupyter hosts (one address may hold 4,096 connections)."""
    return f"127.0.1.{1 + i % 16}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def beat(conn: Conn, lease: str, token: str) -> tuple[int, bytes, float]:
    """One kernel's heartbeat, as the provisioner sends it."""
    body = {"busy": False, "last_activity": time.time()}
    return await conn.call("POST", f"/api/v1/leases/{lease}/heartbeat", token, body)


# -- scenario: kernels -------------------------------------------------------------------------


async def kernels(broker: Broker, n: int, cadence: float, burst: int, seconds: float) -> dict:
    """Grant, heartbeat and release throughput over 16 connections; heartbeats at ``cadence``
    from one connection per kernel, with a burst of ``burst`` lease requests halfway."""
    port, tokens, width = broker.port, broker.tokens, 16
    leases: list[str] = [""] * n
    out: dict = {}

    async def timed(kind: str, work) -> None:  # work(conn, j, latencies) over `width` conns
        conns = [await Conn.open(port) for _ in range(width)]
        latencies: list[float] = []
        t0, cpu0 = time.perf_counter(), broker.cpu()
        await asyncio.gather(*(work(c, j, latencies) for j, c in enumerate(conns)))
        elapsed = time.perf_counter() - t0
        out[kind] = (len(latencies) / elapsed, pct(latencies, 0.5), pct(latencies, 0.99))
        out[kind + " cpu"] = (broker.cpu() - cpu0) / max(len(latencies), 1)
        for c in conns:
            c.close()

    async def grant(c: Conn, j: int, lat: list[float]) -> None:
        for i in range(j, n, width):
            body = {"kind": "sim", "kernel_id": f"k{i}"}
            status, reply, dt = await c.call("POST", "/api/v1/leases", tokens[i // 4], body)
            assert status == 201, reply
            leases[i] = json.loads(reply)["id"]
            lat.append(dt)

    async def hammer(c: Conn, j: int, lat: list[float]) -> None:
        end = time.perf_counter() + seconds
        i = j
        while time.perf_counter() < end:
            status, reply, dt = await beat(c, leases[i], tokens[i // 4])
            assert status == 200, reply
            lat.append(dt)
            i = (i + width) % n

    async def release(c: Conn, j: int, lat: list[float]) -> None:
        for i in range(j, n, width):
            status, reply, dt = await c.call(
                "DELETE", f"/api/v1/leases/{leases[i]}", tokens[i // 4]
            )
            assert status == 200, reply
            lat.append(dt)

    await timed("grant", grant)
    await timed("heartbeat", hammer)

    # One connection per kernel, a heartbeat every `cadence` s each; a burst halfway.
    conns = []
    for start in range(0, n, 500):
        batch = range(start, min(n, start + 500))
        conns += await asyncio.gather(*(Conn.open(port, jupyter_host(i)) for i in batch))
    beats: list[float] = []
    rounds_end = time.perf_counter() + 2 * cadence

    async def kernel(i: int) -> None:
        await asyncio.sleep(random.uniform(0, cadence))
        while time.perf_counter() < rounds_end:
            status, reply, dt = await beat(conns[i], leases[i], tokens[i // 4])
            assert status == 200, (status, reply)
            beats.append(dt)
            await asyncio.sleep(cadence)

    async def students() -> tuple[list[float], dict[int, int]]:
        await asyncio.sleep(cadence)
        fresh = await asyncio.gather(*(Conn.open(port, jupyter_host(k)) for k in range(burst)))
        t0 = time.perf_counter()

        async def ask(k: int) -> tuple[int, float]:
            body = {"kind": "sim", "kernel_id": f"s{k}"}
            token = tokens[n // 4 + k]
            try:
                status, _, _ = await fresh[k].call("POST", "/api/v1/leases", token, body)
            except (OSError, asyncio.IncompleteReadError):
                status = 0  # the connection failed: counted under status 0
            return status, time.perf_counter() - t0

        answers = await asyncio.gather(*(ask(k) for k in range(burst)))
        for c in fresh:
            c.close()
        counts: dict[int, int] = {}
        for status, _ in answers:
            counts[status] = counts.get(status, 0) + 1
        return [t for _, t in answers], counts

    cpu0, t0, mine = broker.cpu(), time.perf_counter(), time.process_time()
    tasks = [asyncio.create_task(kernel(i)) for i in range(n)]
    burst_times, counts = await students()
    await asyncio.gather(*tasks)
    out["cadence"] = (len(beats) / (time.perf_counter() - t0), pct(beats, 0.5), pct(beats, 0.99))
    out["cadence cpu%"] = 100 * (broker.cpu() - cpu0) / (time.perf_counter() - t0)
    out["client cpu%"] = 100 * (time.process_time() - mine) / (time.perf_counter() - t0)
    out["cadence slow"] = sum(dt > 0.1 for dt in beats) / max(len(beats), 1)
    out["burst"] = (pct(burst_times, 0.5), pct(burst_times, 0.99), max(burst_times), counts)
    out["rss with all connections"] = broker.rss()
    for c in conns:
        c.close()
    await timed("release", release)
    return out


# -- scenario: the front alone ----------------------------------------------------------------


async def wire(server: Broker, connections: int, requests: int) -> float:
    """Heartbeat-shaped requests over ``connections`` kept-alive connections; the server's CPU
    per request in seconds."""
    conns = [await Conn.open(server.port) for _ in range(connections)]
    body = {"busy": False, "last_activity": 1700000000.0}

    async def one(c: Conn, count: int) -> None:
        for _ in range(count):
            status, reply, _ = await c.call("POST", "/api/v1/leases/x/heartbeat", "sgpu_x", body)
            assert status == 200, reply

    await asyncio.gather(*(one(c, 50) for c in conns))  # warm up
    cpu0 = server.cpu()
    await asyncio.gather(*(one(c, requests // connections) for c in conns))
    for c in conns:
        c.close()
    return (server.cpu() - cpu0) / requests


def wire_rows(fronts: list[str], rounds: int) -> None:
    """The front's own CPU per request, each front ``rounds`` times in turn; the median."""
    costs: dict[str, list[float]] = {front: [] for front in fronts}
    for _ in range(rounds):
        for front in fronts:
            server = Broker(front, 0, 0, wire=True)
            try:
                costs[front].append(asyncio.run(wire(server, 16, 16_000)))
            finally:
                server.close()
    for front, runs in costs.items():
        each = ", ".join(f"{c * 1e6:.0f}" for c in sorted(runs))
        print(
            f"== wire       {front:<22} front alone: {pct(runs, 0.5) * 1e6:4.0f} us of CPU per "
            f"request (median of {rounds}: {each})",
            flush=True,
        )


# -- scenario: attacks -------------------------------------------------------------------------


def attacker(
    kind: str, port: int, seconds: float, count: int, token: str, result: multiprocessing.Queue
) -> None:
    """Run in its own process: attack for ``seconds``; put what it saw on ``result``."""
    result.put(asyncio.run(_attack(kind, port, seconds, count, token)))


async def _attack(kind: str, port: int, seconds: float, count: int, token: str) -> dict:
    loop = asyncio.get_running_loop()
    end = time.monotonic() + seconds
    seen = {"sent": 0, "refused": 0, "closed": 0, "opened": 0}

    async def connect(source: str = "127.0.0.1") -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        seen["opened"] += 1
        return sock

    async def send(sock: socket.socket, data: bytes) -> bool:
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, data), max(end - time.monotonic(), 0.01))
            seen["sent"] += len(data)
            return True
        except (OSError, asyncio.TimeoutError):
            return False

    if kind.startswith("pipeline"):
        sock = await connect()
        if kind == "pipeline":  # unauthenticated: each reply is a small 401
            data = b"GET /api/v1/whoami HTTP/1.1\r\nHost: broker\r\n\r\n" * 1000
        else:  # a user asks for a lease with a 32 kB id: each 404 names it back
            path = "/api/v1/leases/" + "x" * 32_000
            data = f"GET {path} HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {token}\r\n\r\n"
            data = data.encode()
        while time.monotonic() < end and await send(sock, data):
            pass
        sock.close()
    elif kind == "idle":
        sockets: list[socket.socket] = []
        sources = [f"127.0.0.{k}" for k in range(2, 8)]
        for start in range(0, count, 250):
            batch = range(start, min(count, start + 250))
            made = await asyncio.gather(
                *(connect(sources[i % len(sources)]) for i in batch), return_exceptions=True
            )
            sockets += [s for s in made if isinstance(s, socket.socket)]
        await asyncio.sleep(1.0)
        for sock in sockets:  # a refused one has its 503 waiting (or is closed)
            try:
                seen["refused"] += bool(sock.recv(1, socket.MSG_PEEK))
            except BlockingIOError:
                pass
            except OSError:
                seen["refused"] += 1
        await asyncio.sleep(max(end - time.monotonic(), 0))
        for sock in sockets:
            sock.close()
    else:  # slowloris, slowbody, stalled: `count` connections, each reconnecting when closed
        head = b"GET /api/v1/whoami HTTP/1.1\r\nHost: broker\r\n"
        if kind != "slowloris":
            head = b"POST /api/v1/leases HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % MIB

        async def one(k: int) -> None:
            await asyncio.sleep(k * seconds / count / 4)  # ramp up over the first quarter
            while time.monotonic() < end:
                try:
                    sock = await connect()
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                ok = await send(sock, head)
                if kind == "stalled":
                    ok = ok and await send(sock, b"x" * (MIB - 1))
                    await asyncio.sleep(max(end - time.monotonic(), 0))
                while ok and time.monotonic() < end:
                    await asyncio.sleep(1.0)
                    ok = await send(sock, b"X" if kind == "slowloris" else b"x" * 16)
                seen["closed"] += time.monotonic() < end
                sock.close()

        await asyncio.gather(*(one(k) for k in range(count)))
    return seen


async def under_attack(broker: Broker, kind: str, seconds: float, count: int) -> dict:
    """10 kernels heartbeating every 0.1 s while the attacker runs: their latencies, and the
    broker's RSS before, at the peak and 2 s after."""
    conns = [await Conn.open(broker.port) for _ in range(10)]
    leases = []
    for i, c in enumerate(conns):
        status, reply, _ = await c.call(
            "POST", "/api/v1/leases", broker.tokens[i // 4], {"kind": "sim", "kernel_id": f"k{i}"}
        )
        assert status == 201, reply
        leases.append(json.loads(reply)["id"])
    await asyncio.sleep(0.5)
    before = peak = broker.rss()
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(
        target=attacker, args=(kind, broker.port, seconds, count, broker.tokens[-1], queue)
    )
    proc.start()
    beats: list[float] = []
    failures = 0

    async def kernel(i: int) -> None:
        nonlocal failures
        while proc.is_alive():
            try:
                status, _, dt = await asyncio.wait_for(
                    beat(conns[i], leases[i], broker.tokens[i // 4]), 10
                )
                beats.append(dt) if status == 200 else None
                failures += status != 200
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                failures += 1
                conns[i] = await Conn.open(broker.port)
            await asyncio.sleep(0.1)

    async def sample() -> None:
        nonlocal peak
        while proc.is_alive():
            peak = max(peak, broker.rss())
            await asyncio.sleep(0.25)

    await asyncio.gather(sample(), *(kernel(i) for i in range(10)))
    seen = queue.get(timeout=30)
    proc.join()
    await asyncio.sleep(2.0)
    for c in conns:
        c.close()
    return {
        "rss": (before, peak, broker.rss()),
        "heartbeat": (pct(beats, 0.5), pct(beats, 0.99), max(beats, default=float("nan"))),
        "failures": failures,
        "seen": seen,
    }


# -- the table ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fronts", default="new,tornado", help="new, tornado, old=PATH")
    parser.add_argument(
        "--only", default="wire,kernels,pipeline,pipeline32k,idle,slowloris,slowbody,stalled"
    )
    parser.add_argument("--kernels", type=int, default=10_000)
    parser.add_argument("--cadence", type=float, default=15.0, help="seconds between heartbeats")
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput row")
    parser.add_argument("--attack-seconds", type=float, default=8.0)
    parser.add_argument("--idle", type=int, default=18_000, help="idle connections to try")
    parser.add_argument(
        "--sync", default="FULL", help="SQLite synchronous: NORMAL takes fsync out of the figures"
    )
    args = parser.parse_args()
    fronts = args.fronts.split(",")
    scenarios = args.only.split(",")
    for scenario in scenarios:
        if scenario == "wire":
            wire_rows(fronts, 5)
            continue
        for front in fronts:
            if scenario == "kernels":
                kernels_row(front, args)
            else:
                attack_row(front, scenario, args)


def kernels_row(front: str, args: argparse.Namespace) -> None:
    users = args.kernels // 4 + args.burst
    broker = Broker(front, args.kernels + args.burst // 2, users, args.sync)
    try:
        out = asyncio.run(kernels(broker, args.kernels, args.cadence, args.burst, args.seconds))
    finally:
        broker.close()
    print(f"== kernels, {front}")
    for kind in ("grant", "heartbeat", "release"):
        rate, p50, p99 = out[kind]
        print(
            f"  {kind:<10} {rate:7.0f} req/s  p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms  "
            f"broker CPU {out[kind + ' cpu'] * 1e6:5.0f} us/req"
        )
    rate, p50, p99 = out["cadence"]
    print(
        f"  {args.kernels} kernels every {args.cadence:g} s: {rate:.0f} req/s, "
        f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, broker CPU "
        f"{out['cadence cpu%']:.0f}%, RSS {out['rss with all connections'] / MIB:.0f} MiB, "
        f"{100 * out['cadence slow']:.1f}% over 100 ms (bench client CPU {out['client cpu%']:.0f}%)"
    )
    p50, p99, worst, statuses = out["burst"]
    print(
        f"  burst of {args.burst}: p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
        f"last {worst * 1e3:.0f} ms, statuses {statuses}",
        flush=True,
    )


def attack_row(front: str, kind: str, args: argparse.Namespace) -> None:
    counts = {"idle": args.idle, "slowloris": 2000, "slowbody": 2000, "stalled": 256}
    # Long enough for the new front's time limits to end some slow connections (5 s to send
    # the headers, 10 s for a body, then 2 s of draining before the close).
    seconds = {"slowloris": 16.0, "slowbody": 20.0}.get(kind, 0.0)
    broker = Broker(front, 64, 16, args.sync)
    try:
        out = asyncio.run(
            under_attack(broker, kind, max(args.attack_seconds, seconds), counts.get(kind, 1))
        )
    finally:
        broker.close()
    before, peak, after = (v / MIB for v in out["rss"])
    p50, p99, worst = (v * 1e3 for v in out["heartbeat"])
    seen = out["seen"]
    if kind == "idle":
        admitted = seen["opened"] - seen["refused"]
        seen["KiB per admitted connection"] = round((peak - before) * 1024 / max(admitted, 1), 1)
    print(
        f"== {kind:<10} {front:<22} RSS {before:4.0f} -> peak {peak:5.0f} -> {after:5.0f} MiB  "
        f"heartbeat p50 {p50:6.2f} p99 {p99:7.2f} max {worst:7.1f} ms  "
        f"failed {out['failures']}  attacker {seen}",
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-wire":
        serve_wire(sys.argv[2])
    else:
        main()
