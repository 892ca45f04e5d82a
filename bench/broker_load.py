"""Broker load: lease grant+release over the real HTTP API with 1,000 live leases in the store,
durable writes, against the same writes straight on SQLite. Not a test.

    .venv/bin/python bench/broker_load.py [--live 1000] [--ops 4000] [--clients 4,8]
                                          [--wrk-connections 16] [--seconds 10] [--sync FULL]
    .venv/bin/python bench/broker_load.py --per-kind 500 [--beats 3] [--clients 4]

``--per-kind N``: each client process makes N grants (kept), then heartbeats each lease
``--beats`` times, then releases them, the phases in step across clients, so each request kind
gets its own throughput, latency and broker CPU per request.

One op is one grant (POST /api/v1/leases, 201) and its release (DELETE /api/v1/leases/{id}):
two HTTP requests, two scheduler events, each on disk before its reply. Rows, in one run:

- "BrokerClient xN": N client processes of the provisioner's own client (``http.client``),
  ``--ops`` ops in all. They share this machine's 2 cores with the broker, so they measure the
  pair as a user sees it, not the broker's capacity;
- "wrk xN" (when ``wrk`` is installed: ``apt-get install wrk``): N connections from wrk (C,
  ``bench/broker_pairs.lua``) for ``--seconds``; wrk costs little CPU, so this is the broker's
  capacity. wrk's latencies are per request, not per op;
- "SQLite direct": the same lease and audit rows written by one writer, one transaction per
  event, no HTTP and no scheduler: the floor.

"broker CPU/op" is this process's CPU time (the broker's loop and commit threads; the clients
are other processes) per op. To compare two versions of the broker in one sitting, run this
file with ``PYTHONPATH`` pointing at the other checkout first.

Goal (DESIGN.md): >= 2,000 ops/s, p99 < 20 ms with 1,000 live sessions.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.client import BrokerClient

try:
    from broker.config.loader import parse_config
    from broker.core.scheduler import Lease
    from broker.daemon import BrokerServer
    from broker.http.auth import create_token
    from broker.store.sqlite import Store
except ImportError:  # a checkout from before broker/ was grouped by concern (PYTHONPATH)
    from broker.auth import create_token  # type: ignore[no-redef]
    from broker.scheduler import Lease  # type: ignore[no-redef]
    from broker.server import BrokerServer  # type: ignore[no-redef]

    from broker.config import parse_config  # type: ignore[no-redef]
    from broker.store import Store  # type: ignore[no-redef]

LUA = Path(__file__).with_name("broker_pairs.lua")


@dataclass
class Row:
    name: str
    ops: float  # grant+release ops per second
    p50_ms: float
    p99_ms: float
    latency_of: str  # "op" or "request"
    cpu_per_op_us: float  # CPU of this process per op


def config_text(slots: int) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0
database = "broker.sqlite"
[policy]
heartbeat_interval = "5m"
heartbeat_timeout = "1h"
max_leases_per_user = 100000
[[hosts]]
name = "gpu1"
address = "local"
[[hosts.slots]]
kind = "sim"
simulated = true
count = {slots}
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cycles(args: tuple[str, str, int]) -> list[float]:
    """One client process: ``count`` grant+release cycles on one kept-alive connection."""
    url, token, count = args
    mine: list[float] = []
    kernel_id = f"k{token[-8:].replace('-', '_')}"  # one per user: kernel ids are owned
    with BrokerClient(url, token) as client:
        for _ in range(count):
            t0 = time.perf_counter()
            lease = client.request_lease("sim", kernel_id)
            assert lease.state == "granted", lease
            client.release(lease.id)
            mine.append(time.perf_counter() - t0)
    return mine


def start_broker(
    tmp: Path, live: int, spare: int, users: int, sync: str
) -> tuple[BrokerServer, str, list[str]]:
    """A broker in a thread with ``live`` granted leases (of other users), ``spare`` free slots
    and a token for each of ``users`` bench users."""
    root = Path(tempfile.mkdtemp(dir=tmp))
    path = root / "broker.toml"
    path.write_text(config_text(live + spare))
    config = parse_config(path.read_text(), path)
    store = Store(config.server.database)
    tokens = [create_token(store, f"bench{i}")[0] for i in range(users)]
    store.close()
    server = BrokerServer(config, port=0, tick_interval=1.0, synchronous=sync)
    url = server.start_in_thread()
    service = server.service
    assert service is not None
    server.call(
        lambda: [service.request_lease(f"live{i}", f"user{i}", "sim", f"k{i}") for i in range(live)]
    )
    return server, url, tokens


def with_broker(tmp: Path, live: int, users: int, sync: str, run: Callable) -> Row:
    """Start a broker with ``live`` granted leases and ``users`` spare slots and tokens, then
    ``run(url, tokens)`` -> (row, op count); fill in the broker's CPU per op."""
    server, url, tokens = start_broker(tmp, live, users, users, sync)
    cpu0 = time.process_time()
    try:
        row, ops = run(url, tokens)
    finally:
        cpu = time.process_time() - cpu0
        server.stop_thread()
    row.cpu_per_op_us = cpu / ops * 1e6
    return row


def python_clients(clients: int, ops: int) -> Callable:
    def run(url: str, tokens: list[str]) -> tuple[Row, int]:
        per = ops // clients
        latencies: list[float] = []
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(clients) as pool:
            pool.map(time.sleep, [0.01] * clients)  # warm the workers (imports) first
            t0 = time.perf_counter()
            for mine in pool.map(_cycles, [(url, token, per) for token in tokens]):
                latencies.extend(mine)
            elapsed = time.perf_counter() - t0
        p50, p99 = statistics.median(latencies), pct(latencies, 0.99)
        row = Row(
            f"BrokerClient x{clients}", len(latencies) / elapsed, p50 * 1e3, p99 * 1e3, "op", 0
        )
        return row, len(latencies)

    return run


def wrk(connections: int, seconds: int) -> Callable:
    def run(url: str, tokens: list[str]) -> tuple[Row, int]:
        command = ["wrk", "-t", str(connections), "-c", str(connections), "-d", f"{seconds}s"]
        out = subprocess.run(
            [*command, "-s", str(LUA), url],
            env={**os.environ, "BROKER_TOKENS": ",".join(tokens)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(line for line in out.splitlines() if line.startswith("RESULT"))
        requests, errors, micros, p50, p99 = line.split()[1:]
        assert int(errors) == 0, f"wrk saw {errors} replies that were not 2xx:\n{out}"
        ops = int(requests) // 2
        rate = ops / (int(micros) / 1e6)
        return Row(f"wrk x{connections}", rate, float(p50), float(p99), "request", 0), ops

    return run


def _phases(args: tuple) -> None:
    """One client process for ``per_kind``: ``count`` grants (kept), then ``beats`` heartbeats
    on each of them, then their releases; each phase starts when every client is ready."""
    url, token, count, beats, barrier, results = args
    kernel_id = f"k{token[-8:].replace('-', '_')}"
    times: dict[str, list[float]] = {"grant": [], "heartbeat": [], "release": []}
    spans: dict[str, tuple[float, float]] = {}
    with BrokerClient(url, token) as client:
        client.whoami()  # connected and warm
        leases = []
        for phase in ("grant", "heartbeat", "release"):
            barrier.wait()
            start = time.time()
            if phase == "grant":
                for _ in range(count):
                    t0 = time.perf_counter()
                    leases.append(client.request_lease("sim", kernel_id).id)
                    times[phase].append(time.perf_counter() - t0)
            elif phase == "heartbeat":
                for _ in range(beats):
                    for lease_id in leases:
                        t0 = time.perf_counter()
                        client.heartbeat(lease_id, False, time.time())
                        times[phase].append(time.perf_counter() - t0)
            else:
                for lease_id in leases:
                    t0 = time.perf_counter()
                    client.release(lease_id)
                    times[phase].append(time.perf_counter() - t0)
            spans[phase] = (start, time.time())
    results.put((times, spans))


def per_kind(tmp: Path, live: int, clients: int, count: int, beats: int, sync: str) -> list[Row]:
    """Grant, heartbeat and release throughput, one request kind at a time, ``clients``
    processes against a broker with ``live`` granted leases; CPU per request of the broker."""
    server, url, tokens = start_broker(tmp, live, clients * count, clients, sync)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_phases, args=((url, t, count, beats, barrier, results),))
        for t in tokens
    ]
    for proc in procs:
        proc.start()
    cpu: dict[str, float] = {}
    try:
        for phase in ("grant", "heartbeat", "release"):
            barrier.wait()
            cpu[phase] = time.process_time()
        gathered = [results.get(timeout=600) for _ in procs]
        cpu["end"] = time.process_time()
    finally:
        for proc in procs:
            proc.join(60)
        server.stop_thread()
    rows = []
    order = ["grant", "heartbeat", "release", "end"]
    for i, phase in enumerate(order[:-1]):
        latencies = [x for times, _ in gathered for x in times[phase]]
        start = min(spans[phase][0] for _, spans in gathered)
        end = max(spans[phase][1] for _, spans in gathered)
        # the broker's CPU from this phase's start to the next one's (clients are other processes)
        used = cpu[order[i + 1]] - cpu[phase]
        rows.append(
            Row(
                f"{phase} x{clients} clients",
                len(latencies) / (end - start),
                statistics.median(latencies) * 1e3,
                pct(latencies, 0.99) * 1e3,
                "request",
                used / len(latencies) * 1e6,
            )
        )
    return rows


def sqlite_direct(tmp: Path, live: int, ops: int, sync: str) -> Row:
    store = Store(tmp / f"direct-{sync}.sqlite", synchronous=sync)
    with store.transaction():
        for i in range(live):
            store.put_lease(Lease(f"live{i}", f"user{i}", "sim", "k", i + 1, 0.0, "granted", "s"))
    latencies = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for n in range(ops):
        start = time.perf_counter()
        now = time.time()
        lease = Lease(f"op{n}", "bench", "sim", "k", live + n + 1, now, "granted", "s", now, now)
        with store.transaction():
            store.log(now, "requested", lease.id, lease.user, kind="sim")
            store.put_lease(lease)
            store.log(now, "granted", lease.id, slot="s")
        with store.transaction():
            store.end_lease(lease.id, "released", now, "released")
            store.log(now, "released", lease.id, slot="s")
        latencies.append(time.perf_counter() - start)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    store.close()
    p50, p99 = statistics.median(latencies) * 1e3, pct(latencies, 0.99) * 1e3
    return Row("SQLite direct, 1 writer", ops / elapsed, p50, p99, "op", cpu / ops * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=1000, help="live leases in the store")
    parser.add_argument("--ops", type=int, default=4000, help="ops per BrokerClient row")
    parser.add_argument("--clients", default="4,8", help="BrokerClient process counts")
    parser.add_argument("--wrk-connections", default="16", help="wrk connection counts")
    parser.add_argument("--seconds", type=int, default=10, help="seconds per wrk row")
    parser.add_argument("--sync", default="FULL", help="SQLite synchronous modes: FULL,NORMAL")
    parser.add_argument(
        "--per-kind",
        type=int,
        default=0,
        metavar="N",
        help="instead: N grants per client, then heartbeats, then releases, each kind timed alone",
    )
    parser.add_argument("--beats", type=int, default=3, help="--per-kind: heartbeats per lease")
    args = parser.parse_args()
    if args.per_kind:
        print_per_kind(args)
        return
    has_wrk = shutil.which("wrk") is not None
    rows: list[tuple[str, Row]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for sync in args.sync.split(","):
            for n in (int(c) for c in args.clients.split(",") if c):
                run = python_clients(n, args.ops)
                rows.append((sync, with_broker(Path(tmp), args.live, n, sync, run)))
            for n in (int(c) for c in args.wrk_connections.split(",") if c and has_wrk):
                run = wrk(n, args.seconds)
                rows.append((sync, with_broker(Path(tmp), args.live, n, sync, run)))
            rows.append((sync, sqlite_direct(Path(tmp), args.live, args.ops, sync)))
    print(f"grant+release with {args.live} live leases; one op = 1 grant + 1 release = 2 requests")
    print(
        f"{'load':<24} {'sync':<6} {'ops/s':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'latency of':>10} {'CPU/op':>9}"
    )
    for sync, row in rows:
        requests = f"{2 * row.ops:>7.0f}" if not row.name.startswith("SQLite") else f"{'-':>7}"
        print(
            f"{row.name:<24} {sync:<6} {row.ops:>7.0f} {requests} {row.p50_ms:>7.2f} "
            f"{row.p99_ms:>7.2f} {row.latency_of:>10} {row.cpu_per_op_us:>6.0f} us"
        )
    if not has_wrk:
        print("(no wrk here: `apt-get install wrk` adds the broker-capacity rows)")


def print_per_kind(args: argparse.Namespace) -> None:
    print(
        f"one request kind at a time, {args.live} live leases; requests/s over the phase, "
        "latency per request, broker CPU per request"
    )
    print(f"{'load':<24} {'sync':<6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU/req':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for sync in args.sync.split(","):
            for n in (int(c) for c in args.clients.split(",") if c):
                for row in per_kind(Path(tmp), args.live, n, args.per_kind, args.beats, sync):
                    print(
                        f"{row.name:<24} {sync:<6} {row.ops:>7.0f} {row.p50_ms:>7.2f} "
                        f"{row.p99_ms:>7.2f} {row.cpu_per_op_us:>6.0f} us"
                    )


if __name__ == "__main__":
    main()
