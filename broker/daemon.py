"""The broker daemon: ``BrokerServer`` runs one ``BrokerService`` (``broker.service.service``) on a
tornado IOLoop: ``gpu-broker serve`` through ``serve()``, tests through ``start_in_thread()``, with
a periodic ``Tick`` driving heartbeat expiry, queue timeouts, idle suspends, fencing retries and
checkpoint expiry. SIGHUP reloads the config file (``broker.service.reload``) without dropping a
lease; a bad file is rejected and the old config stays.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable

import tornado.ioloop
import tornado.netutil

from broker.config.loader import Config
from broker.errors import ConfigError
from broker.http.app import make_app, make_router
from broker.http.front import LISTEN_BACKLOG, Connections, HttpProtocol
from broker.service.reload import reload_config
from broker.service.service import BrokerService
from broker.store.sqlite import Store

log = logging.getLogger("broker")


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
        group_commit: bool = True,
        lease_routes: bool = True,
    ) -> None:
        self.config = config
        self.group_commit = group_commit
        self.lease_routes = lease_routes  # False: every call through tornado.web (bench, tests)
        self.host = host if host is not None else config.server.host
        self.port = port if port is not None else config.server.port
        self.tick_interval = tick_interval
        self.synchronous = synchronous
        self.clock = clock
        self.service: BrokerService | None = None
        self._listeners: list[asyncio.Server] = []
        self._connections = Connections()  # the caps and budget its connections share
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
        self._store = Store(self.config.server.database, synchronous=self.synchronous)
        self._store.group_commit = self.group_commit
        self.service = BrokerService(self.config, self._store, clock=self.clock)
        # What exists now (modules, config, restored leases) lives as long as the broker: keep
        # it out of the cyclic GC's generations, whose full passes otherwise cost each request
        # about a third of its time (bench/broker_load.py).
        gc.freeze()
        sockets = tornado.netutil.bind_sockets(self.port, self.host, family=socket.AF_UNSPEC)
        self.port = sockets[0].getsockname()[1]
        front = make_router(self.service) if self.lease_routes else make_app(self.service)
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(
                lambda: HttpProtocol(front, self._connections), sock=sock
            )
            sock.listen(LISTEN_BACKLOG)  # the kernel queues a class; asyncio accepts 100 a tick
            self._listeners.append(server)
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
        for listener in self._listeners:
            listener.close()
        for connection in list(self._connections):
            connection.close()
        for listener in self._listeners:
            await asyncio.wait_for(listener.wait_closed(), timeout=5)
        self._listeners = []
        if self.service is not None:
            self.service.close()
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
        assert server.service is not None
        service = server.service

        def on_hup() -> None:
            log.info("gpu-broker: SIGHUP, reloading %s", service.config.path)
            task = loop.create_task(reload_config(service))
            task.add_done_callback(_reload_done)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await stop.wait()
        log.info("gpu-broker: stopping (signal received)")
        await server.stop()

    asyncio.run(main())


def _reload_done(task: asyncio.Task) -> None:
    exc = task.exception()
    if exc is not None and not isinstance(exc, ConfigError):
        log.error("reload failed, the old config stays: %s", exc)
