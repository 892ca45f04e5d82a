"""``HostLink``: the SSH connection to the host of a kernel, its tunnels, and its watch.

``KernelSession`` (``provisioner.session``) owns one link and calls it from its worker thread:
``open(target)`` (the connection it has, when the host did not change; else one that an ended
session left in ``idle_connections``), ``launch(request)`` (the launcher's channel stays open
as the kernel's *watch*: a status line a second, and one with the exit code the moment the
kernel ends; that launcher was started ahead, ``remote.prepare_launch``, when the connection's
last kernel launched or ended), ``ctl``/``run`` for host commands, ``drop_kernel()`` when the
kernel has ended or moved, ``close()``.

The link's own thread reads the watch. When the lines stop for ``link_timeout`` seconds or the
channel dies, the link is lost: it tells the session (``link_lost``), closes the dead connection
with every tunnel and listener it had, and reconnects with exponential backoff and jitter until
it succeeds, the kernel is found to have ended, the session closes it, or ``give_up_after``
seconds pass. A reconnect forwards the kernel's ports anew (``link_restored(upstream)``) and
closes nothing it did not replace. Listeners never leak: each kernel's forwards are closed when
it is dropped or replaced.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from gpu_kernel import remote
from gpu_kernel.cancel import Cancelled, CancelToken
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.protocol import KernelStatus, LaunchReply, LaunchRequest
from gpu_kernel.ssh import CommandStream, HostConnection, HostTarget, connect
from provisioner.idle_connections import IDLE, IdleConnections

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0


class LinkListener(Protocol):
    """What the link tells its session (from the link's thread; each call returns at once)."""

    def kernel_exited(self, code: int | None) -> None: ...

    def link_lost(self, why: str) -> None: ...

    def link_restored(self, upstream: dict[str, int]) -> None: ...

    def link_retrying(self, attempt: int, why: str, next_in: float) -> None: ...

    def link_gave_up(self, why: str) -> None: ...


@dataclass
class KernelOnHost:
    """The kernel process the link watches, as the launcher reported it."""

    reply: LaunchReply
    upstream: dict[str, int] = field(default_factory=dict)  # local ports of the tunnels
    exit_code: int | None = None
    saved: dict | None = None  # {"path", "bytes"}: where it saved its state, if it did
    exited: threading.Event = field(default_factory=threading.Event)


def _close_tunnels(conn: HostConnection, upstream: dict[str, int]) -> None:
    """Stop forwarding the local ports of ``upstream`` (channel -> local port) on ``conn``: a
    kernel ended, moved or was replaced, a forward failed half-way, or the connection goes to
    the idle ones."""
    for local in upstream.values():
        conn.unforward(local)


class HostLink:
    """One SSH connection (replaced when the lease moves to another host) and one watched kernel."""

    def __init__(
        self,
        kernel_id: str,
        listener: LinkListener,
        link_timeout: float = 10.0,
        give_up_after: float = 300.0,
        idle: IdleConnections = IDLE,
    ) -> None:
        """``idle``: where a connection this link no longer needs waits for the next kernel
        (and where ``open`` looks first)."""
        self.kernel_id = kernel_id
        self._idle = idle
        self._listener = listener
        self.link_timeout = link_timeout
        self.give_up_after = give_up_after
        self._lock = threading.Lock()  # guards the fields below; never held over the network
        self._conn: HostConnection | None = None
        self.target: HostTarget | None = None
        self.kernel: KernelOnHost | None = None
        self._watch: CommandStream | None = None
        self._generation = 0  # bumped when the watched kernel or connection changes
        self._stop = CancelToken()  # for the reconnect loop: the link is closing

    # ---- connection ----------------------------------------------------------------------------

    @property
    def connection(self) -> HostConnection | None:
        return self._conn

    def open(self, target: HostTarget, cancel: CancelToken) -> HostConnection:
        """The connection to ``target``: the one we have when it is alive and to the same host,
        else an idle one to that host that still answers, else a new one. The old one (to
        another host) goes to the idle connections, its tunnels closed."""
        with self._lock:
            conn = self._conn
            if conn is not None and conn.is_alive() and self.target == target:
                return conn
        self._replace_connection(None, None, keep_old=True)
        conn = self._idle.connection(target, cancel)
        with self._lock:
            self._conn, self.target = conn, target
        return conn

    def _replace_connection(
        self, conn: HostConnection | None, target: HostTarget | None, keep_old: bool = False
    ) -> None:
        """Put ``conn`` in place of the connection; the old one closes (with ``keep_old``:
        waits with the idle connections, once its kernel's tunnels are closed)."""
        with self._lock:
            old, self._conn = self._conn, conn
            old_target = self.target
            if target is not None:
                self.target = target
            watch, self._watch = self._watch, None
            kernel = self.kernel if old is not None else None
            self._generation += 1
        if watch is not None:
            watch.close()
        if old is None:
            return
        if keep_old and old_target is not None:
            if kernel is not None:
                _close_tunnels(old, kernel.upstream)
            self._idle.give(old_target, old)
        else:
            old.close()

    # ---- the kernel ----------------------------------------------------------------------------

    def launch(self, request: LaunchRequest, cancel: CancelToken) -> KernelOnHost:
        """Start the kernel on the open connection, tunnel its ports, watch it. A cancel does
        not break the launch (a few seconds at most; breaking it would leave a kernel running
        that nobody knows of): it is seen once the kernel is watched, and ends it."""
        conn, target = self._conn, self.target
        assert conn is not None and target is not None
        reply, stream = remote.launch_watched(conn, target, request)
        kernel = self._take(conn, reply, stream)
        remote.prepare_launch(conn, target)  # for a restart, or the next kernel on this host
        cancel.check()  # the caller's clean-up ends the kernel
        return kernel

    def _take(
        self, conn: HostConnection, reply: LaunchReply, stream: CommandStream
    ) -> KernelOnHost:
        """Tunnel the kernel's ports over ``conn`` and watch it through ``stream``."""
        kernel = KernelOnHost(reply)
        try:
            kernel.upstream = self._forward(conn, reply.ports)
        except BaseException:
            stream.close()
            raise
        self._watch_kernel(kernel, stream)
        return kernel

    def _forward(self, conn: HostConnection, ports: dict[str, int]) -> dict[str, int]:
        upstream: dict[str, int] = {}
        try:
            for name, port in ports.items():
                upstream[name] = conn.forward(port)
        except BaseException:
            _close_tunnels(conn, upstream)
            raise
        return upstream

    def _watch_kernel(self, kernel: KernelOnHost, stream: CommandStream) -> None:
        stream.set_read_timeout(self.link_timeout)
        with self._lock:
            old_kernel, self.kernel = self.kernel, kernel
            old_watch, self._watch = self._watch, stream
            self._generation += 1
            generation = self._generation
            conn = self._conn
        if old_watch is not None:
            old_watch.close()
        if old_kernel is not None and conn is not None:
            _close_tunnels(conn, old_kernel.upstream)
        threading.Thread(
            target=self._watch_loop,
            args=(kernel, stream, generation),
            name=f"host-link-{self.kernel_id[:8]}",
            daemon=True,
        ).start()

    def drop_kernel(self) -> None:
        """The kernel ended or moved away: stop watching it and close its tunnels. The
        connection stays, with a launcher started on it for the next kernel (a resume here)."""
        with self._lock:
            kernel, self.kernel = self.kernel, None
            watch, self._watch = self._watch, None
            self._generation += 1
            conn, target = self._conn, self.target
        if watch is not None:
            watch.close()
        if kernel is not None and conn is not None:
            _close_tunnels(conn, kernel.upstream)
        if conn is not None and target is not None and conn.is_alive():
            remote.prepare_launch(conn, target)

    def adopt(self, reply: LaunchReply, cancel: CancelToken) -> KernelOnHost | None:
        """Watch and tunnel a kernel another process launched (re-attach); None when it is not
        running on the open connection's host."""
        conn, target = self._conn, self.target
        assert conn is not None and target is not None
        with cancel.hook(conn.close):
            status = remote.status(conn, target, self.kernel_id)
            if not status.alive:
                return None
            stream = remote.watch(conn, target, self.kernel_id)
        return self._take(conn, reply, stream)

    # ---- host commands -------------------------------------------------------------------------

    def ctl(self, action: str, cancel: CancelToken, signum: int | None = None) -> KernelStatus:
        """``status``, ``signal``, ``kill`` or ``cleanup`` of the kernel on the current host;
        when the connection is down (being replaced), over a new one (``cancel`` bounds it)."""
        conn, target = self._conn, self.target
        if target is None:
            raise SharedGPUError("the kernel has no host")
        if conn is None or not conn.is_alive():
            conn = connect(target, cancel)
            with self._lock:
                old, self._conn = self._conn, conn
            if old is not None:
                old.close()
        with cancel.hook(conn.close):
            if action == "signal":
                assert signum is not None
                return remote.signal(conn, target, self.kernel_id, signum)
            return getattr(remote, action)(conn, target, self.kernel_id)

    # ---- the watch and the reconnect -----------------------------------------------------------

    def _current(self, generation: int) -> bool:
        return self._generation == generation and not self._stop.cancelled

    def _watch_loop(self, kernel: KernelOnHost, stream: CommandStream, generation: int) -> None:
        """Read status lines; on the last one report the exit; on silence, reconnect."""
        try:
            while True:
                why = self._read_until_end(kernel, stream)
                if why is None or not self._current(generation):
                    return  # the kernel ended (reported), or we were replaced or closed
                stream = self._reconnect(kernel, why, generation)
                if stream is None:
                    return
                with self._lock:
                    generation = self._generation
        except Exception as exc:  # a bug here must not leave the kernel unwatched in silence
            log.exception("host link of kernel %s failed", self.kernel_id)
            if self._current(generation):
                self._listener.link_gave_up(f"the host link failed: {exc}")

    def _read_until_end(self, kernel: KernelOnHost, stream: CommandStream) -> str | None:
        """None once the kernel's end was read and reported; else why the link looks lost."""
        while True:
            try:
                line = stream.stdout.readline(65536)
            except TimeoutError:
                return f"no word from the host for {self.link_timeout:g} s"
            except (OSError, ValueError, EOFError) as exc:
                return f"the SSH connection failed ({exc or type(exc).__name__})"
            if not line:
                return "the SSH connection closed"
            try:
                status = KernelStatus.from_json(line)
            except SharedGPUError:
                log.debug("host link: ignored a line of the watch: %r", line[:200])
                continue
            if not status.alive:
                self._ended(kernel, status)
                return None

    def _ended(self, kernel: KernelOnHost, status: KernelStatus) -> None:
        code = status.exit_code
        kernel.exit_code, kernel.saved = code, status.checkpoint
        kernel.exited.set()
        if self.kernel is kernel:
            self._listener.kernel_exited(code)

    def _reconnect(self, kernel: KernelOnHost, why: str, generation: int) -> CommandStream | None:
        """Replace the dead connection; the new watch stream, or None when it is over."""
        target = self.target
        assert target is not None
        log.warning("SSH link to %s lost (%s); reconnecting", target.name, why)
        self._listener.link_lost(why)
        self._replace_connection(None, None)
        with self._lock:
            generation = self._generation  # ours now: a later replace ends this loop
        started = time.monotonic()
        attempt = 0
        while self._current(generation):
            attempt += 1
            try:
                conn = connect(target, self._stop)
                status = remote.status(conn, target, self.kernel_id)
                if not status.alive:
                    conn.close()
                    self._ended(kernel, status)
                    return None
                upstream = self._forward(conn, kernel.reply.ports)
                stream = remote.watch(conn, target, self.kernel_id)
                stream.set_read_timeout(self.link_timeout)
            except Cancelled:
                return None
            except SharedGPUError as err:
                why = err.message
                elapsed = time.monotonic() - started
                if elapsed >= self.give_up_after:
                    self._listener.link_gave_up(
                        f"could not reconnect to {target.name} for {elapsed:.0f} s: {why}"
                    )
                    return None
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.5)
                self._listener.link_retrying(attempt, why, delay)
                if self._stop.wait(delay):
                    return None
                continue
            with self._lock:
                if not self._current(generation):
                    replaced = True
                else:
                    replaced = False
                    self._conn = conn
                    self._watch = stream
                    kernel.upstream = upstream
            if replaced:
                stream.close()
                conn.close()
                return None
            log.info("reconnected to kernel %s on %s", self.kernel_id, target.name)
            self._listener.link_restored(upstream)
            return stream
        return None

    def close(self) -> None:
        """Stop watching and reconnecting; close every tunnel, and leave the connection with
        the idle ones (the next kernel on that host starts on it)."""
        self._stop.cancel("the kernel's session is closing")
        self._replace_connection(None, None, keep_old=True)
        with self._lock:
            self.kernel = None
