"""SSH connections no kernel uses now, kept a minute for the next kernel on the same host.

A connection to a GPU host costs a TCP and SSH handshake and a key exchange (~65 ms of a start
here, more across a network). ``HostLink`` hands its connection here when its kernel's session
closes or moves to another host (``give``), and asks here first when it needs one (``take``):
a user who restarts a kernel, or opens a second notebook, starts on a connection already up.

``borrowed(target)`` does the same for a session's short errands to a host it does not run on
(copying a checkpoint from the host that saved it, deleting it there afterwards).

One ``IdleConnections`` per Jupyter server (``IDLE``): every kernel in it runs as the server's
Unix user with the same SSH keys, so a connection is shared only between kernels that would
have opened the same one. A connection comes back only without tunnels (its kernel's are
closed first) and is handed to one link at a time. ``take`` checks that the host still answers
(an SSH keep-alive round trip, ``CHECK_TIMEOUT`` at most): one that does not is closed, and the
caller connects anew. A connection left ``KEEP`` seconds is closed by a sweeper thread that
exists only while connections wait. A kept connection has a launcher started on it
(``remote.prepare_launch``): the next kernel there does not wait for the host's login shell.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from gpu_kernel import remote
from gpu_kernel.cancel import NEVER, CancelToken
from gpu_kernel.ssh import HostConnection, HostTarget, connect

log = logging.getLogger(__name__)

KEEP = 60.0  # s an idle connection waits for the next kernel on its host
PER_HOST = 2  # idle connections kept per host (a burst of closes keeps no more)
CHECK_TIMEOUT = 2.0  # s a kept connection's host has to answer before a kernel takes it


@dataclass
class _Kept:
    target: HostTarget
    conn: HostConnection
    until: float


class IdleConnections:
    """Idle SSH connections by host target; ``HostLink`` gives and takes them."""

    def __init__(self, keep: float = KEEP, per_host: int = PER_HOST) -> None:
        self.keep, self.per_host = keep, per_host
        self._lock = threading.Lock()  # guards _kept and _sweeper; never held over the network
        self._wake = threading.Condition(self._lock)
        self._kept: list[_Kept] = []
        self._sweeper: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def kept(self, target: HostTarget) -> list[HostConnection]:
        """The connections kept for ``target`` now, oldest first."""
        with self._lock:
            return [k.conn for k in self._kept if k.target == target]

    def take(self, target: HostTarget) -> HostConnection | None:
        """A kept connection to ``target`` whose host answers, or None (connect anew)."""
        while True:
            with self._lock:
                mine = [k for k in self._kept if k.target == target]
                if not mine:
                    return None
                kept = mine[-1]  # the newest: the likeliest still up
                self._kept.remove(kept)
            if kept.conn.responds(CHECK_TIMEOUT):
                return kept.conn
            log.info("a kept SSH connection to %s no longer answers; closing it", target.name)
            kept.conn.close()

    def connection(self, target: HostTarget, cancel: CancelToken = NEVER) -> HostConnection:
        """A kept connection to ``target`` whose host answers, else a new one (``connect``)."""
        return self.take(target) or connect(target, cancel)

    def give(self, target: HostTarget, conn: HostConnection) -> None:
        """Keep ``conn`` for the next kernel on ``target``, or close it: when keeping is off,
        it is dead, or it still forwards ports (then a kernel's tunnels would outlive it)."""
        if self.keep <= 0 or target.is_local or not conn.is_alive() or conn.forwarding():
            conn.close()
            return
        surplus: list[_Kept] = []
        with self._lock:
            self._kept.append(_Kept(target, conn, time.monotonic() + self.keep))
            mine = [k for k in self._kept if k.target == target]
            surplus = mine[: max(0, len(mine) - self.per_host)]
            for kept in surplus:
                self._kept.remove(kept)
            if self._sweeper is None:
                self._sweeper = threading.Thread(
                    target=self._sweep, name="idle-ssh-connections", daemon=True
                )
                self._sweeper.start()
            self._wake.notify()
        for kept in surplus:
            kept.conn.close()
        if all(k.conn is not conn for k in surplus):
            remote.prepare_launch(conn, target)

    def close(self) -> None:
        """Close every kept connection (the server is stopping)."""
        with self._lock:
            kept, self._kept = self._kept, []
            self._wake.notify()
        for k in kept:
            k.conn.close()

    def _sweep(self) -> None:
        """Close connections kept past their time; ends when none is left."""
        while True:
            with self._lock:
                now = time.monotonic()
                expired = [k for k in self._kept if k.until <= now]
                for k in expired:
                    self._kept.remove(k)
                if not expired:
                    if not self._kept:
                        self._sweeper = None
                        return
                    self._wake.wait(min(k.until for k in self._kept) - now)
            for k in expired:
                try:
                    k.conn.close()
                except Exception:  # a sweeper that dies would keep connections for ever
                    log.exception("closing an idle SSH connection to %s failed", k.target.name)


IDLE = IdleConnections()  # the Jupyter server's


@contextlib.contextmanager
def borrowed(
    target: HostTarget, cancel: CancelToken = NEVER, idle: IdleConnections = IDLE
) -> Iterator[HostConnection]:
    """A connection to ``target`` for a few commands (a checkpoint's copy from its host, its
    deletion there): a kept one, else a new one; kept again afterwards, closed if the block
    raised (it may have broken mid-command)."""
    conn = idle.connection(target, cancel)
    try:
        yield conn
    except BaseException:
        conn.close()
        raise
    idle.give(target, conn)
