"""The broker daemon: the service that ties scheduler, store and clock together, and the server.

``BrokerService`` is what the HTTP handlers (``broker.api``) call: it turns a request into a
scheduler event with ``now`` from its clock, persists the decisions in one store transaction,
and wakes long-polls waiting on the leases that changed. ``BrokerServer`` runs it on a tornado
IOLoop (``gpu-broker serve`` through ``serve()``, tests through ``start_in_thread()``), with a
periodic ``Tick`` driving heartbeat expiry and queue timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable

import tornado.httpserver
import tornado.ioloop
import tornado.locks
import tornado.netutil
import tornado.util

from broker.config import Config
from broker.errors import BrokerError
from broker.scheduler import (
    Decision,
    Dropped,
    Event,
    Expired,
    Granted,
    Heartbeat,
    Lease,
    Policy,
    Queued,
    Refused,
    Release,
    Released,
    RequestLease,
    Scheduler,
    SlotState,
    Tick,
)
from broker.store import Store

log = logging.getLogger("broker")

MAX_LEASES_PER_USER = 4


class LeaseRefused(BrokerError):
    """A lease request that can never be granted (e.g. a kind the pool does not have)."""


class BrokerService:
    """State and rules of one running broker. Single-threaded: call it from its IOLoop only."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: Callable[[], float] = time.time,
        max_leases_per_user: int = MAX_LEASES_PER_USER,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        slots = [
            SlotState(s.id, s.host, s.kind, drained=config.host(s.host).drained)
            for s in config.slots
        ]
        policy = Policy(
            heartbeat_timeout=config.policy.heartbeat_timeout,
            queue_timeout=config.policy.queue_timeout,
            max_leases_per_user=max_leases_per_user,
        )
        self.scheduler = Scheduler(slots, policy, next_seq=store.max_seq() + 1)
        self._changed: dict[str, tornado.locks.Event] = {}
        now = clock()
        live = store.live_leases()
        decisions = self.scheduler.restore(live, now)
        with store.transaction():
            for lease in self.scheduler.leases():
                store.put_lease(lease)
            self._log_decisions(decisions, now)
            store.log(now, "broker_started", restored=len(live))

    # -- what the API calls ----------------------------------------------------------------

    def lease(self, lease_id: str) -> Lease | None:
        """The lease, live (from memory) or ended (from the store)."""
        return self.scheduler.lease(lease_id) or self.store.get_lease(lease_id)

    def request_lease(self, lease_id: str, user: str, kind: str, kernel_id: str) -> Lease:
        decisions = self._apply(RequestLease(lease_id, user, kind, kernel_id, self.clock()))
        for decision in decisions:
            if isinstance(decision, Refused):
                raise LeaseRefused(decision.reason)
        lease = self.scheduler.lease(lease_id)
        assert lease is not None
        return lease

    def release(self, lease_id: str) -> Lease | None:
        self._apply(Release(lease_id, self.clock()))
        return self.lease(lease_id)

    def heartbeat(self, lease_id: str, busy: bool, last_activity: float | None) -> Lease | None:
        self._apply(Heartbeat(lease_id, self.clock(), busy, last_activity))
        return self.lease(lease_id)

    def tick(self) -> list[Decision]:
        return self._apply(Tick(self.clock()))

    async def wait_for_change(self, lease_id: str, timeout: float) -> None:
        """Return when ``lease_id`` changes (state, slot, queue position) or after ``timeout``."""
        event = self._changed.get(lease_id)
        if event is None:
            event = self._changed[lease_id] = tornado.locks.Event()
        with contextlib.suppress(tornado.util.TimeoutError):
            await event.wait(timeout=datetime.timedelta(seconds=timeout))

    # -- internals -------------------------------------------------------------------------

    def _apply(self, event: Event) -> list[Decision]:
        """One event: scheduler decides, store commits decisions and lease rows together."""
        queue_before = self.scheduler.queue_length
        snapshot = self.scheduler.snapshot()
        try:
            decisions = self._decide_and_commit(event)
        except BaseException:
            self.scheduler.rollback(snapshot)  # memory and disk stay the same
            raise
        touched = dict.fromkeys(d.lease_id for d in decisions)
        if not isinstance(event, Tick):
            touched[event.lease_id] = None
        left_queue = any(isinstance(d, Granted | Released | Dropped) for d in decisions)
        if left_queue or self.scheduler.queue_length != queue_before:
            touched.update(dict.fromkeys(lease.id for lease in self.scheduler.queue()))
        for lease_id in touched:
            waiter = self._changed.pop(lease_id, None)
            if waiter is not None:
                waiter.set()
        return decisions

    def _decide_and_commit(self, event: Event) -> list[Decision]:
        decisions = self.scheduler.handle(event)
        now = event.now
        touched: dict[str, None] = {}
        if not isinstance(event, Tick):
            touched[event.lease_id] = None
        for decision in decisions:
            touched[decision.lease_id] = None
        if not decisions and isinstance(event, Tick):
            return decisions
        with self.store.transaction():
            if isinstance(event, RequestLease) and self.scheduler.lease(event.lease_id):
                self.store.log(now, "requested", event.lease_id, event.user, kind=event.kind)
            for lease_id in touched:
                lease = self.scheduler.lease(lease_id)
                if lease is not None:
                    self.store.put_lease(lease)
            self._log_decisions(decisions, now)
        return decisions

    def _log_decisions(self, decisions: list[Decision], now: float) -> None:
        for decision in decisions:
            if isinstance(decision, Granted):
                self.store.log(now, "granted", decision.lease_id, slot=decision.slot_id)
            elif isinstance(decision, Queued):
                self.store.log(now, "queued", decision.lease_id, position=decision.position)
            elif isinstance(decision, Released):
                self.store.end_lease(decision.lease_id, "released", now, "released")
                self.store.log(now, "released", decision.lease_id, slot=decision.slot_id)
            elif isinstance(decision, Expired):
                self.store.end_lease(decision.lease_id, "expired", now, "heartbeat_timeout")
                self.store.log(now, "expired", decision.lease_id, slot=decision.slot_id)
            elif isinstance(decision, Dropped):
                self.store.end_lease(decision.lease_id, "expired", now, decision.reason)
                self.store.log(now, "dropped", decision.lease_id, reason=decision.reason)


class BrokerServer:
    """The HTTP server around one ``BrokerService``; ``host``/``port`` override the config's
    (port 0: any free port; ``url`` tells which)."""

    def __init__(
        self,
        config: Config,
        *,
        host: str | None = None,
        port: int | None = None,
        tick_interval: float = 1.0,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.host = host if host is not None else config.server.host
        self.port = port if port is not None else config.server.port
        self.tick_interval = tick_interval
        self.synchronous = synchronous
        self.clock = clock
        self.service: BrokerService | None = None
        self._http: tornado.httpserver.HTTPServer | None = None
        self._ticker: tornado.ioloop.PeriodicCallback | None = None
        self._store: Store | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Open the store, restore leases, listen. Call on the loop that will serve."""
        from broker.api import make_app  # api imports this module

        self._store = Store(self.config.server.database, synchronous=self.synchronous)
        self.service = BrokerService(self.config, self._store, clock=self.clock)
        sockets = tornado.netutil.bind_sockets(self.port, self.host, family=socket.AF_UNSPEC)
        self.port = sockets[0].getsockname()[1]
        self._http = tornado.httpserver.HTTPServer(make_app(self.service), xheaders=False)
        self._http.add_sockets(sockets)
        self._ticker = tornado.ioloop.PeriodicCallback(
            self._tick, self.tick_interval * 1000, jitter=0
        )
        self._ticker.start()

    def _tick(self) -> None:
        assert self.service is not None
        try:
            for decision in self.service.tick():
                log.info("tick: %s", decision)
        except Exception:  # a tick must never kill the ticker
            log.exception("tick failed")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._http is not None:
            self._http.stop()
            await asyncio.wait_for(self._http.close_all_connections(), timeout=5)
        if self._store is not None:
            self._store.close()
            self._store = None

    def describe(self) -> str:
        """One line for the log: URL, hosts, slots."""
        hosts = ", ".join(
            f"{h.name}({'drained, ' if h.drained else ''}{len(h.slots)} slots)"
            for h in self.config.hosts
        )
        kinds: dict[str, int] = {}
        for slot in self.config.slots:
            kinds[slot.kind] = kinds.get(slot.kind, 0) + 1
        slots = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        return f"gpu-broker serving {self.url}/api/v1 — hosts: {hosts}; slots: {slots}"

    # -- in a thread (tests, benchmarks) -----------------------------------------------------

    def start_in_thread(self) -> str:
        """Run on a new thread with its own event loop; return the URL once it listens."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._stopped = asyncio.Event()
                try:
                    await self.start()
                except BaseException as exc:
                    failure.append(exc)
                    ready.set()
                    return
                ready.set()
                await self._stopped.wait()
                await self.stop()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="gpu-broker", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if failure:
            raise failure[0]
        return self.url

    def stop_thread(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the server's loop and return its result (tests inspect state so)."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(_call(fn), self._loop)
        return future.result(timeout=10)


async def _call(fn: Callable[[], object]) -> object:
    return fn()


def serve(config: Config, tick_interval: float = 1.0) -> None:
    """``gpu-broker serve``: run until SIGTERM or SIGINT, then close cleanly."""

    async def main() -> None:
        server = BrokerServer(config, tick_interval=tick_interval)
        await server.start()
        log.info("%s", server.describe())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("gpu-broker: stopping (signal received)")
        await server.stop()

    asyncio.run(main())
