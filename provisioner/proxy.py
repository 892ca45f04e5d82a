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
    any --suspend--> SUSPENDED --execute_request--> RESUMING --attach--> SYNCING
                         ^                              |
                         +--------resume_failed---------+

While not ATTACHED, shell and control requests are queued (bounded) and sent in order once
ATTACHED; SYNCING waits for the kernel's ``iopub_welcome`` (ipykernel >= 7 sends one when our SUB
subscribes) so that output of queued requests is not lost to the PUB/SUB late-joiner race.
While SUSPENDED the proxy stands in for the kernel (``local_replies``): kernel_info from the last
real reply, empty completions, and the first ``execute_request`` calls ``on_resume`` (in a thread
of its own) while the cell shows the progress the session publishes. Every frontend request goes
through ``_route_request``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

import zmq
from jupyter_client.session import Session

from . import messages as m
from .proxy_state import (
    MAX_QUEUED,
    QUEUED_CHANNELS,
    Activity,
    ProxyError,
    ProxyState,
)
from .stand_in import StandInMixin

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
_BATCH = 256  # messages drained from one socket before polling again (fairness)


class SessionProxy(StandInMixin):
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
        self._session: Session | None = None  # signs what the proxy says itself (suspended)
        self._on_resume: Callable[[], None] | None = None
        self._resume_parent: dict[str, Any] | None = None  # the cell that triggered the resume
        # execute_requests sent to the kernel and not answered yet, by msg_id: a kernel that
        # suspends drops those that reach it after it began saving; they go to the resumed one
        self._inflight: dict[str, tuple[str, list[bytes]]] = {}
        # called (in a thread of its own) with the content of the kernel's "I saved myself and
        # will exit" IOPub notice (%gpu suspend); requests are held from that moment
        self.kernel_suspended_hook: Callable[[dict[str, Any]], None] | None = None
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

    @property
    def suspended(self) -> bool:
        return self._state in (ProxyState.SUSPENDED, ProxyState.RESUMING)

    def attach(self, upstream_ports: dict[str, int], ip: str = "127.0.0.1") -> None:
        """Connect to a kernel's shell/control/stdin/iopub ports (re-attach replaces the old)."""
        missing = [c for c in ("shell", "control", "stdin", "iopub") if c not in upstream_ports]
        if missing:
            raise ProxyError(f"attach() needs ports for {', '.join(missing)}")
        self._call("attach", ({c: int(p) for c, p in upstream_ports.items()}, ip))

    def detach(self) -> None:
        """Close the upstream sockets; shell and control requests queue until the next attach."""
        self._call("detach", None)

    def hold(self) -> None:
        """Keep new requests back while replies still flow (before asking the kernel to suspend)."""
        self._call("hold", None)

    def release(self) -> None:
        """Send what ``hold`` kept back and forward again (the kernel would not suspend)."""
        self._call("release", None)

    def configure_session(self, key: bytes, signature_scheme: str = "hmac-sha256") -> None:
        """Give the proxy the HMAC key, so it can answer and report while the kernel is away."""
        self._call("session", (key, signature_scheme))

    def suspend(self, on_resume: Callable[[], None]) -> None:
        """The kernel process is gone: stand in for it; the next execute_request calls
        ``on_resume()`` in a new thread, which must end with ``attach`` or ``resume_failed``."""
        if self._session is None:
            raise ProxyError("suspend() needs configure_session() first")
        self._call("suspend", on_resume)

    def publish_progress(self, text: str) -> None:
        """Show one line in the cell that is waiting for the resume (no-op when none waits)."""
        self._call("progress", text)

    def resume_failed(self, text: str) -> None:
        """Answer every waiting cell with an error that says why; stay suspended."""
        self._call("resume_failed", text)

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
                elif name == "detach":
                    self._do_detach()
                elif name == "session":
                    key, scheme = arg
                    self._session = Session(
                        key=key, signature_scheme=scheme, username="shared-gpu", check_pid=False
                    )
                elif name == "hold":
                    if self._state is ProxyState.ATTACHED:
                        self._state = ProxyState.HOLDING
                elif name == "release":
                    if self._state is ProxyState.HOLDING:
                        self._set_attached()
                elif name == "suspend":
                    self._do_suspend(arg)
                elif name == "progress":
                    self._publish_progress(arg)
                elif name == "resume_failed":
                    self._do_resume_failed(arg)
            except Exception as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _do_attach(self, ports: dict[str, int], ip: str) -> None:
        self._do_detach()
        self._inflight.clear()  # a new kernel process: the old one's cells are gone with it
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
        self._resume_parent = None
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
        """Decide what happens to one frontend request."""
        if self._state in (ProxyState.SUSPENDED, ProxyState.RESUMING):
            self._stand_in(channel, frames)
            return
        if channel == "shell" and _execute_id(frames) is not None:
            self._activity = replace(self._activity, last_activity=time.time())
        if self._state is ProxyState.ATTACHED:
            self._send_up(channel, frames)
        elif channel in QUEUED_CHANNELS:
            self._queue(channel, frames)
        else:
            log.debug("session proxy detached: %s message dropped", channel)

    def _queue(self, channel: str, frames: list[bytes]) -> None:
        if len(self._queued) >= MAX_QUEUED:
            log.warning("session proxy queue full (%d); %s request dropped", MAX_QUEUED, channel)
        else:
            self._queued.append((channel, frames))

    def _send_up(self, channel: str, frames: list[bytes]) -> None:
        if channel == "shell" and (msg_id := _execute_id(frames)) is not None:
            self._inflight[msg_id] = (channel, frames)
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
                elif header is not None and b"execute_reply" in header and self._inflight:
                    parent = m.loads(m.signed_frame(frames, m.PARENT)) or {}
                    self._inflight.pop(str(parent.get("msg_id")), None)
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
            if header is not None and b"shared_gpu_suspended" in header:
                self._on_suspended_notice(frames, d)
                continue  # for us, not for the frontends
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


def _execute_id(frames: list[bytes]) -> str | None:
    """msg_id of a shell execute_request (None for any other message); parses only then."""
    header = m.signed_frame(frames, m.HEADER)
    if header is None or b"execute_request" not in header:  # cheap filter before parsing
        return None
    parsed = m.loads(header) or {}
    msg_id = parsed.get("msg_id")
    return str(msg_id) if parsed.get("msg_type") == "execute_request" and msg_id else None


class _Stop(Exception):
    """Raised inside the proxy thread to leave the loop."""
