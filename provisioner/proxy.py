"""The session proxy: stable local ZMQ ports for Jupyter, forwarded to whichever kernel is attached.

The provisioner creates one ``SessionProxy`` per kernel, hands its ``ports`` to Jupyter, and calls
``attach(ports)`` each time a kernel (re)starts behind it and ``detach()`` when the kernel goes
away (suspend, SSH drop). Its heartbeat thread reads ``activity()``.

One background thread owns every socket and runs a ``zmq.Poller`` loop; callers talk to it through
a command queue woken over an inproc PAIR socket, so any thread may call the public methods.
Frames pass through untouched (the kernel and Jupyter share the HMAC key; nothing is re-signed).

State machine (``ProxyState``)::

    DETACHED --attach--> SYNCING --first IOPub message or sync_timeout--> ATTACHED
        ^                   |                                                |
        +------detach-------+--------------------detach----------------------+

While not ATTACHED, shell and control requests are queued (bounded) and sent in order once
ATTACHED; SYNCING waits for the kernel's ``iopub_welcome`` (ipykernel >= 7 sends one when our SUB
subscribes) so that output of queued requests is not lost to the PUB/SUB late-joiner race.
Every frontend request goes through ``_route_request``: the one place to add suspend/resume.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import zmq

from gpu_kernel.errors import SharedGPUError

from . import messages as m

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
MAX_QUEUED = 1000  # shell/control requests held while detached
_BATCH = 256  # messages drained from one socket before polling again (fairness)
_QUEUED_CHANNELS = ("shell", "control")


class ProxyError(SharedGPUError):
    """The session proxy could not do what was asked (closed, bad ports, thread gone)."""


class ProxyState(Enum):
    DETACHED = "detached"
    SYNCING = "syncing"  # upstream connected, waiting for IOPub to flow before sending requests
    ATTACHED = "attached"


@dataclass(frozen=True)
class Activity:
    """What the provisioner reports to the broker with each lease heartbeat."""

    busy: bool
    execution_state: str  # last IOPub status: "busy", "idle", "starting", or "unknown"
    last_activity: float  # time.time() of the last execute_request, or the idle that ended one
    attached: bool


class SessionProxy:
    """Five stable frontend sockets forwarded to the currently attached kernel's five ports."""

    def __init__(
        self,
        ip: str = "127.0.0.1",
        sync_timeout: float = 2.0,
        ports: dict[str, int] | None = None,
    ) -> None:
        """Bind the frontend; ``ports`` asks for the ports a previous proxy had (re-attach after a
        Jupyter server restart), falling back to random ones where a port is taken."""
        self._ctx = zmq.Context()
        self._sync_timeout = sync_timeout
        self._front: dict[str, zmq.Socket] = {}
        self._wake_rx: zmq.Socket | None = None
        self._wake_tx: zmq.Socket | None = None
        self.ports: dict[str, int] = {}
        kinds = {
            "shell": zmq.ROUTER,
            "control": zmq.ROUTER,
            "stdin": zmq.ROUTER,
            "iopub": zmq.XPUB,
            "hb": zmq.ROUTER,
        }
        try:
            for name, kind in kinds.items():
                sock = self._ctx.socket(kind)
                sock.linger = 0
                if kind == zmq.ROUTER:
                    sock.router_handover = 1  # a client reconnecting with its identity wins
                self.ports[name] = self._bind(sock, ip, (ports or {}).get(name))
                self._front[name] = sock
            addr = f"inproc://session-proxy-{uuid.uuid4().hex}"
            self._wake_rx = self._ctx.socket(zmq.PAIR)
            self._wake_rx.bind(addr)
            self._wake_tx = self._ctx.socket(zmq.PAIR)
            self._wake_tx.connect(addr)
        except zmq.ZMQError as exc:
            self._close_sockets()
            if self._wake_tx is not None:
                self._wake_tx.close(linger=0)
            self._ctx.term()
            raise ProxyError(f"session proxy could not bind on {ip}: {exc}") from exc
        self.ports = {name: self.ports[name] for name in CHANNELS}

        self._state = ProxyState.DETACHED
        self._up: dict[str, zmq.Socket] = {}
        self._queued: deque[tuple[str, list[bytes]]] = deque()
        self._sync_deadline = 0.0
        self._activity = Activity(False, "unknown", time.time(), False)
        self.kernel_info_reply: list[bytes] | None = None  # last one seen, frames as they were
        self._commands: queue.SimpleQueue[tuple[str, Any, Future[None]]] = queue.SimpleQueue()
        self._wake_lock = threading.Lock()
        self._closed = False
        self._poller = zmq.Poller()
        self._handlers: dict[zmq.Socket, Any] = {
            self._wake_rx: self._on_commands,
            self._front["shell"]: lambda: self._on_frontend("shell"),
            self._front["control"]: lambda: self._on_frontend("control"),
            self._front["stdin"]: lambda: self._on_frontend("stdin"),
            self._front["iopub"]: self._on_subscriptions,
            self._front["hb"]: self._on_heartbeat,
        }
        for sock in self._handlers:
            self._poller.register(sock, zmq.POLLIN)
        self._thread = threading.Thread(target=self._run, name="session-proxy", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ---------------------------------------------------------------

    @staticmethod
    def _bind(sock: zmq.Socket, ip: str, wanted: int | None) -> int:
        if wanted:
            try:
                sock.bind(f"tcp://{ip}:{wanted}")
                return wanted
            except zmq.ZMQError:
                log.warning("port %d is taken; the proxy takes another one", wanted)
        return sock.bind_to_random_port(f"tcp://{ip}")

    @property
    def state(self) -> ProxyState:
        return self._state

    def attach(self, upstream_ports: dict[str, int], ip: str = "127.0.0.1") -> None:
        """Connect to a kernel's shell/control/stdin/iopub ports (re-attach replaces the old)."""
        missing = [c for c in ("shell", "control", "stdin", "iopub") if c not in upstream_ports]
        if missing:
            raise ProxyError(f"attach() needs ports for {', '.join(missing)}")
        self._call("attach", ({c: int(p) for c, p in upstream_ports.items()}, ip))

    def detach(self) -> None:
        """Close the upstream sockets; shell and control requests queue until the next attach."""
        self._call("detach", None)

    def activity(self) -> Activity:
        """A snapshot of busy/idle and last activity (lock-free: an immutable object swap)."""
        return self._activity

    def close(self) -> None:
        """Stop the thread and close every socket, freeing the ports. Idempotent."""
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
            self._commands.put(("stop", None, Future()))
            with contextlib.suppress(zmq.ZMQError):
                self._wake_tx.send(b"", zmq.NOBLOCK)
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            log.warning("session proxy thread did not stop within 5 s")
            return
        self._wake_tx.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> SessionProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, arg: Any, timeout: float = 10.0) -> None:
        done: Future[None] = Future()
        with self._wake_lock:
            if self._closed or not self._thread.is_alive():
                raise ProxyError("the session proxy is closed", "create a new SessionProxy")
            self._commands.put((name, arg, done))
            self._wake_tx.send(b"")
        try:
            done.result(timeout)
        except FutureTimeout:
            raise ProxyError(f"session proxy did not {name} within {timeout:.0f} s") from None

    # ---- the proxy thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                timeout = None
                if self._state is ProxyState.SYNCING:
                    timeout = max(0.0, (self._sync_deadline - time.monotonic()) * 1000)
                for sock, _ in self._poller.poll(timeout):
                    try:
                        self._handlers[sock]()
                    except _Stop:
                        return
                    except Exception:
                        log.exception("session proxy: error handling a message; dropped")
                if self._state is ProxyState.SYNCING and time.monotonic() >= self._sync_deadline:
                    log.info("no IOPub message within %.1fs of attach; sending", self._sync_timeout)
                    self._set_attached()
        finally:
            self._close_upstream()
            self._close_sockets()

    def _on_commands(self) -> None:
        with contextlib.suppress(zmq.Again):
            while True:
                self._wake_rx.recv(zmq.NOBLOCK)
        while True:
            try:
                name, arg, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if name == "stop":
                raise _Stop
            try:
                if name == "attach":
                    self._do_attach(*arg)
                else:
                    self._do_detach()
            except Exception as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _do_attach(self, ports: dict[str, int], ip: str) -> None:
        self._do_detach()
        identity = uuid.uuid4().hex.encode()  # new per attach: no clash with a stale peer
        try:
            for channel, kind in (
                ("shell", zmq.DEALER),
                ("control", zmq.DEALER),
                ("stdin", zmq.DEALER),
                ("iopub", zmq.SUB),
            ):
                sock = self._ctx.socket(kind)
                sock.linger = 0
                if kind == zmq.DEALER and channel != "control":
                    sock.identity = identity  # the kernel routes input_request by shell identity
                if kind == zmq.SUB:
                    sock.setsockopt(zmq.SUBSCRIBE, b"")
                self._up[channel] = sock
                sock.connect(f"tcp://{ip}:{ports[channel]}")
        except zmq.ZMQError as exc:
            self._close_upstream()
            raise ProxyError(f"session proxy could not connect to {ip}: {exc}") from exc
        for channel, sock in self._up.items():
            self._handlers[sock] = (
                self._on_iopub if channel == "iopub" else lambda c=channel: self._on_reply(c)
            )
            self._poller.register(sock, zmq.POLLIN)
        self._state = ProxyState.SYNCING
        self._sync_deadline = time.monotonic() + self._sync_timeout
        self._activity = replace(self._activity, attached=True)

    def _do_detach(self) -> None:
        self._close_upstream()
        self._state = ProxyState.DETACHED
        self._activity = replace(self._activity, attached=False)

    def _set_attached(self) -> None:
        self._state = ProxyState.ATTACHED
        while self._queued:
            channel, frames = self._queued.popleft()
            self._send_up(channel, frames)

    def _close_upstream(self) -> None:
        for sock in self._up.values():
            self._poller.unregister(sock)
            self._handlers.pop(sock, None)
            sock.close(linger=0)
        self._up = {}

    def _close_sockets(self) -> None:
        for sock in [*self._front.values(), self._wake_rx]:
            if sock is not None:
                sock.close(linger=0)

    # ---- frontend -> kernel ---------------------------------------------------------------------

    def _on_frontend(self, channel: str) -> None:
        sock = self._front[channel]
        for _ in range(_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._route_request(channel, frames)

    def _route_request(self, channel: str, frames: list[bytes]) -> None:
        """Decide what happens to one frontend request (suspend/resume hooks in here)."""
        if channel == "shell":
            header = m.signed_frame(frames, m.HEADER)
            if (
                header is not None
                and b"execute_request" in header  # cheap filter before parsing
                and m.header_msg_type(header) == "execute_request"
            ):
                self._activity = replace(self._activity, last_activity=time.time())
        if self._state is ProxyState.ATTACHED:
            self._send_up(channel, frames)
        elif channel in _QUEUED_CHANNELS:
            if len(self._queued) >= MAX_QUEUED:
                log.warning(
                    "session proxy queue full (%d); %s request dropped", MAX_QUEUED, channel
                )
            else:
                self._queued.append((channel, frames))
        else:
            log.debug("session proxy detached: %s message dropped", channel)

    def _send_up(self, channel: str, frames: list[bytes]) -> None:
        try:
            self._up[channel].send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("session proxy: kernel's %s queue full; request dropped", channel)

    def _on_subscriptions(self) -> None:
        sock = self._front["iopub"]
        with contextlib.suppress(zmq.Again):
            for _ in range(_BATCH):
                sock.recv(zmq.NOBLOCK)  # subscribe/unsubscribe frames: nothing to do

    def _on_heartbeat(self) -> None:
        sock = self._front["hb"]
        with contextlib.suppress(zmq.Again):
            for _ in range(_BATCH):
                sock.send_multipart(sock.recv_multipart(zmq.NOBLOCK), zmq.NOBLOCK)

    # ---- kernel -> frontend ---------------------------------------------------------------------

    def _on_reply(self, channel: str) -> None:
        src, dst = self._up[channel], self._front[channel]
        for _ in range(_BATCH):
            try:
                frames = src.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if channel == "shell":
                header = m.signed_frame(frames, m.HEADER)
                if header is not None and b"kernel_info_reply" in header:
                    self.kernel_info_reply = frames
            dst.send_multipart(frames, zmq.NOBLOCK)

    def _on_iopub(self) -> None:
        src, dst = self._up["iopub"], self._front["iopub"]
        for _ in range(_BATCH):
            try:
                frames = src.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) > 1 and len(frames[1]) == 9 and frames[1].bytes == m.DELIM:
                d = 1  # the usual [topic, delim, ...]: skip the search
            else:
                d = m.delim_index(frames)
            header = m.signed_frame(frames, m.HEADER, d) if d >= 0 else None
            if header is not None and (b"status" in header or b"iopub_welcome" in header):
                msg_type = m.header_msg_type(header)
                if msg_type == "status":
                    self._on_status(frames, d)
                elif msg_type == "iopub_welcome":
                    if self._state is ProxyState.SYNCING:
                        self._set_attached()
                    continue  # addressed to our SUB, not to the frontends
            if self._state is ProxyState.SYNCING:
                self._set_attached()
            dst.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def _on_status(self, frames: list[Any], d: int) -> None:
        state = m.status_state(frames, d)
        if state is None:
            return
        old = self._activity
        last = old.last_activity
        parent = m.signed_frame(frames, m.PARENT, d)
        if state == "idle" and parent is not None and b"execute_request" in parent:
            last = time.time()  # an execution just ended
        self._activity = Activity(state == "busy", state, last, old.attached)


class _Stop(Exception):
    """Raised inside the proxy thread to leave the loop."""
