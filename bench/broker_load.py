"""Broker load: lease grant+release through the real HTTP API with N live leases in the store,
against the same inserts/updates straight on SQLite. Not a test.

    .venv/bin/python bench/broker_load.py [--live 1000] [--ops 2000] [--threads 4]

One op = POST /api/v1/leases (granted) + DELETE /api/v1/leases/{id}: two HTTP round trips, two
scheduler events, each durable before its reply. The SQLite side does the same two transactions
(lease row + audit rows) with no HTTP and no scheduler. Rows, side by side in one run:

- "before": the load generator's clients are threads in the server's process (sharing its GIL)
  and every event commits (fsyncs) on its own: how this bench measured the broker at first;
- "after": the clients are separate processes (as real Jupyter servers are) and the broker
  commits once per IOLoop iteration for all the events of that iteration (group commit; each
  reply still waits until its event is on disk);
- the SQLite floor: one writer, one commit per transaction.

Goal (DESIGN.md): >= 2,000 ops/s, p99 < 20 ms with 1,000 live sessions.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

from broker.auth import create_token
from broker.client import BrokerClient
from broker.config import parse_config
from broker.scheduler import Lease
from broker.server import BrokerServer
from broker.store import Store


def config_text(slots: int) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0
database = "broker.sqlite"
[policy]
heartbeat_interval = "10m"
heartbeat_timeout = "1h"
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


def _cycles(url: str, token: str, count: int) -> list[float]:
    """One client: ``count`` grant+release cycles on one kept-alive connection."""
    mine: list[float] = []
    with BrokerClient(url, token) as client:
        for _ in range(count):
            t0 = time.perf_counter()
            lease = client.request_lease("sim", "k")
            assert lease.state == "granted", lease
            client.release(lease.id)
            mine.append(time.perf_counter() - t0)
    return mine


def _in_process(args: tuple[str, str, int]) -> list[float]:
    return _cycles(*args)


def run_http(
    tmp: Path, live: int, ops: int, threads: int, sync: str, after: bool
) -> tuple[float, list[float]]:
    name = f"http-{sync}-{'after' if after else 'before'}"
    path = tmp / name / "broker.toml"
    path.parent.mkdir()
    path.write_text(config_text(live + threads))
    config = parse_config(path.read_text(), path)
    store = Store(config.server.database)
    tokens = [create_token(store, f"bench{i}")[0] for i in range(threads)]
    store.close()
    server = BrokerServer(config, port=0, tick_interval=1.0, synchronous=sync, group_commit=after)
    url = server.start_in_thread()
    service = server.service
    assert service is not None
    server.call(
        lambda: [service.request_lease(f"live{i}", f"user{i}", "sim", "k") for i in range(live)]
    )
    per = ops // threads
    latencies: list[float] = []
    t0 = time.perf_counter()
    if after:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(threads) as pool:
            # warm the workers (imports) before the clock starts
            pool.map(time.sleep, [0.01] * threads)
            t0 = time.perf_counter()
            for mine in pool.map(_in_process, [(url, token, per) for token in tokens]):
                latencies.extend(mine)
    else:
        lock = threading.Lock()

        def worker(token: str) -> None:
            mine = _cycles(url, token, per)
            with lock:
                latencies.extend(mine)

        workers = [threading.Thread(target=worker, args=(token,)) for token in tokens]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    elapsed = time.perf_counter() - t0
    server.stop_thread()
    return len(latencies) / elapsed, latencies


def run_sqlite(tmp: Path, live: int, ops: int, sync: str) -> tuple[float, list[float]]:
    store = Store(tmp / f"direct-{sync}.sqlite", synchronous=sync)
    with store.transaction():
        for i in range(live):
            store.put_lease(Lease(f"live{i}", f"user{i}", "sim", "k", i + 1, 0.0, "granted", "s"))
    latencies = []
    t0 = time.perf_counter()
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
    elapsed = time.perf_counter() - t0
    store.close()
    return ops / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=1000, help="live leases in the store")
    parser.add_argument("--ops", type=int, default=2000, help="grant+release cycles")
    parser.add_argument("--threads", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--sync", default="FULL,NORMAL", help="synchronous modes to run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sync in args.sync.split(","):
            for after in (False, True):
                rate, lat = run_http(Path(tmp), args.live, args.ops, args.threads, sync, after)
                label = "after: client procs, group" if after else "before: client threads"
                rows.append((f"HTTP {label}", sync, rate, lat))
            rate, lat = run_sqlite(Path(tmp), args.live, args.ops, sync)
            rows.append(("SQLite direct, 1 writer", sync, rate, lat))
    print(f"grant+release, {args.live} live leases, {args.ops} ops per row, {args.threads} clients")
    print(f"{'path':<38} {'sync':<7} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, sync, rate, lat in rows:
        p50, p99 = statistics.median(lat) * 1000, pct(lat, 0.99) * 1000
        print(f"{name:<38} {sync:<7} {rate:>8.0f} {p50:>8.2f} {p99:>8.2f}")
    by = {(name.split(":")[0], sync): rate for name, sync, rate, _ in rows}
    for sync in args.sync.split(","):
        before, after = by.get(("HTTP before", sync)), by.get(("HTTP after", sync))
        if before and after:
            print(f"after/before ({sync}): {after / before:.1f}x")


if __name__ == "__main__":
    main()
