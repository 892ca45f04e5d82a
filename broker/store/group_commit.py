"""Group commit for the broker's store: one SQLite transaction per IOLoop iteration, committed
on a thread of its own so the loop goes on serving HTTP while the COMMIT (the fsync) runs.

``broker.store.sqlite.Store`` owns one ``GroupCommit`` and opens its connection as a
``GatedConnection``. The first event of an iteration opens the batch (``begin``); at the end of
the iteration ``_commit`` hands the COMMIT to the commit thread. While it runs, every statement
from the loop waits (the gate), so nothing slips into the batch being committed; hot calls that
can wait without blocking the loop ask ``when_idle`` instead. Replies wait on ``durable``: no
client hears of a change before it is on disk. A failed COMMIT leaves memory ahead of the disk,
so the process exits and a restart reloads the disk (no client saw the lost changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("broker")

__all__ = ["GatedConnection", "GroupCommit"]


class GatedConnection:
    """A sqlite3 connection whose statements wait while the commit thread runs a COMMIT."""

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw
        self.idle = threading.Event()
        self.idle.set()

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if not self.idle.is_set():
            self.idle.wait()
        return self.raw.execute(sql, params)

    def close(self) -> None:
        self.idle.wait()
        self.raw.close()


class GroupCommit:
    """The open batch, the COMMIT in flight, and the replies and calls waiting on them.
    All methods but ``_commit_on_thread`` run on the IOLoop's thread."""

    def __init__(self, connection: GatedConnection) -> None:
        self.connection = connection
        self.open = False  # a batch is open: BEGIN ran, COMMIT not yet asked for
        self._batch: list[asyncio.Future] = []  # replies waiting for the open batch
        self._in_flight: list[asyncio.Future] | None = None  # replies of the COMMIT running
        self._after: list[Callable[[], None]] = []  # calls waiting for the connection
        self._thread: ThreadPoolExecutor | None = None

    def begin(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the iteration's batch (waits out a COMMIT in flight); commit it at its end."""
        self.connection.execute("BEGIN IMMEDIATE")
        self.open = True
        loop.call_soon(self._commit, loop)

    def durable(self) -> asyncio.Future | None:
        """A future done once everything written so far is on disk; None when it already is."""
        if self.open:
            waiting = self._batch
        elif self._in_flight is not None:
            waiting = self._in_flight
        else:
            return None
        future = asyncio.get_running_loop().create_future()
        waiting.append(future)
        return future

    def when_idle(self, call: Callable[[], None]) -> bool:
        """Queue ``call`` until the COMMIT in flight is done and return True; False (and
        nothing queued) when the connection is free now."""
        if self.connection.idle.is_set():
            return False
        self._after.append(call)
        return True

    def flush(self) -> None:
        """Commit the open batch here and now (closing the store)."""
        self.connection.idle.wait()
        if not self.open:
            return
        self.connection.raw.execute("COMMIT")
        self.open = False
        waiters, self._batch = self._batch, []
        _wake(waiters)

    def close(self) -> None:
        self.flush()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    # -- the commit --------------------------------------------------------------------------

    def _commit(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.open:
            return  # flushed already
        waiters, self._batch = self._batch, []
        self.open = False
        self._in_flight = waiters
        self.connection.idle.clear()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="gpu-broker-commit")
        self._thread.submit(self._commit_on_thread, loop, waiters)

    def _commit_on_thread(
        self, loop: asyncio.AbstractEventLoop, waiters: list[asyncio.Future]
    ) -> None:
        try:
            self.connection.raw.execute("COMMIT")
        except sqlite3.Error as exc:
            log.critical("COMMIT failed (%s): exiting so a restart reloads the disk", exc)
            os._exit(70)
        self.connection.idle.set()
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the replies
            loop.call_soon_threadsafe(self._committed, waiters)

    def _committed(self, waiters: list[asyncio.Future]) -> None:
        if self._in_flight is waiters:
            self._in_flight = None
        _wake(waiters)
        calls, self._after = self._after, []
        for call in calls:
            call()


def _wake(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
