"""The session proxy: stable local ZMQ ports for Jupyter, forwarded to whichever kernel is attached.

The provisioner's session (``provisioner.session``) creates one ``SessionProxy`` per kernel, hands
its ``ports`` to Jupyter, and tells it what happens to the kernel behind: ``attach(ports)`` when a
kernel (re)starts or the SSH link comes back, ``detach()`` when the link drops, ``hold()`` /
``release()`` around a suspend request, ``stand_in(on_wake)`` when no kernel process exists
(before the first cell, or suspended), ``wake_failed(text)`` when the session could not bring one.
Its heartbeat thread reads ``activity()``. The states and their transitions are the table in
``provisioner.proxy_state``; every change goes through it.

One background thread owns every socket and runs a ``zmq.Poller`` loop; callers talk to it through
a command queue woken over an inproc PAIR socket, so any thread may call the public methods.
Frames pass through untouched (the kernel and Jupyter share the HMAC key; nothing is re-signed).
While not ATTACHED, shell and control requests are queued (bounded) and sent in order once
ATTACHED; SYNCING waits for the kernel's ``iopub_welcome`` (ipykernel >= 7 sends one when our SUB
subscribes) so that output of queued requests is not lost to the PUB/SUB late-joiner race.

What the proxy keeps from the frontends: IOPub statuses whose parent is a request the provisioner
made itself (``own_sessions``: its control client's session ids), so JupyterLab shows Busy for
the whole of a running cell and the broker's ``busy`` agrees (``provisioner.executions``). After
the SSH link comes back to the same kernel, the proxy sends one ``kernel_info_request`` of its
own; when its reply arrives, the cells sent before it that never got a reply lost it in the drop,
and the proxy ends each with an error that says so, instead of leaving it running forever.
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

from . import messages as m
from .executions import Executions
from .proxy_state import (
    MAX_QUEUED,
    QUEUED_CHANNELS,
    Activity,
    ProxyError,
    ProxyEvent,
    ProxyState,
    transition,
)
from .stand_in import Decision, Frontend, StandIn, kernel_info_content

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
_BATCH = 256  # messages drained from one socket before polling again (fairness)
UPSTREAM_RECONNECT_MAX_MS = 1000  # the upstream sockets' reconnect backoff, at most
LOST_TEXT = (
    "the connection to the kernel's host dropped while this cell was running or waiting to run; "
    "its output and result were lost (whatever it did to the kernel's variables is kept); "
    "run it again if you need its output"
)

E = ProxyEvent


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
        sockets: dict[str, zmq.Socket] = {}
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
                sockets[name] = sock
            addr = f"inproc://session-proxy-{uuid.uuid4().hex}"
            self._wake_rx = self._ctx.socket(zmq.PAIR)
            self._wake_rx.bind(addr)
            self._wake_tx = self._ctx.socket(zmq.PAIR)
            self._wake_tx.connect(addr)
        except zmq.ZMQError as exc:
            for sock in [*sockets.values(), self._wake_rx, self._wake_tx]:
                if sock is not None:
                    sock.close(linger=0)
            self._ctx.term()
            raise ProxyError(f"session proxy could not bind on {ip}: {exc}") from exc
        self.ports = {name: self.ports[name] for name in CHANNELS}
        self._front = sockets
        self.front = Frontend(sockets)
        self.stand_in_for = StandIn(self.front)

        self._state = ProxyState.DETACHED
        self._up: dict[str, zmq.Socket] = {}
        self._identity = uuid.uuid4().hex.encode()  # the upstream DEALERs' (see _do_attach)
        self._queued: deque[tuple[str, list[bytes]]] = deque()
        self._sync_deadline = 0.0
        self._activity = Activity(False, "unknown", time.time(), False)
        self._executions = Executions()
        self._own_sessions: frozenset[bytes] = frozenset()
        self._probe: tuple[str, int] | None = None  # (msg_id, mark) of our kernel_info probe
        self._notice: str | None = None  # for the next cell (notice_next_cell)
        self._on_wake: Callable[[], None] | None = None
        # called (in a thread of its own) with the content of the kernel's "I saved myself and
        # will exit" IOPub notice (%gpu suspend); requests are held from that moment
        self.kernel_suspended_hook: Callable[[dict[str, Any]], None] | None = None
        self._commands: queue.SimpleQueue[tuple[str, Any, Future[None]]] = queue.SimpleQueue()
        self._wake_lock = threading.Lock()
        self._closed = False
        self._poller = zmq.Poller()
        self._handlers: dict[zmq.Socket, Any] = {
            self._wake_rx: self._on_commands,
            sockets["shell"]: lambda: self._on_frontend("shell"),
            sockets["control"]: lambda: self._on_frontend("control"),
            sockets["stdin"]: lambda: self._on_frontend("stdin"),
            sockets["iopub"]: self._on_subscriptions,
            sockets["hb"]: self._on_heartbeat,
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
    def standing_in(self) -> bool:
        return self._state in (ProxyState.STANDING_IN, ProxyState.WAKING)

    @property
    def kernel_info_reply(self) -> dict[str, Any] | None:
        """Content of the last real ``kernel_info_reply`` seen (None before the first)."""
        return self.stand_in_for.kernel_info

    def configure_session(self, key: bytes, signature_scheme: str = "hmac-sha256") -> None:
        """Give the proxy the HMAC key, so it can answer and report while the kernel is away."""
        self._call("session", (key, signature_scheme))

    def set_own_sessions(self, session_ids: list[str]) -> None:
        """Session ids of the provisioner's own clients: their requests' statuses stay here."""
        self._call("own", frozenset(s.encode() for s in session_ids))

    def attach(
        self, upstream_ports: dict[str, int], ip: str = "127.0.0.1", same_kernel: bool = False
    ) -> None:
        """Connect to a kernel's shell/control/stdin/iopub ports. ``same_kernel``: the kernel
        behind is the one attached before (the SSH link came back): cells it had are still its
        own, and the proxy finds out which replies the drop lost."""
        missing = [c for c in ("shell", "control", "stdin", "iopub") if c not in upstream_ports]
        if missing:
            raise ProxyError(f"attach() needs ports for {', '.join(missing)}")
        ports = {c: int(p) for c, p in upstream_ports.items()}
        self._call("attach", (ports, ip, same_kernel))

    def detach(self) -> None:
        """The upstream is gone (SSH drop, kernel ended); requests queue until the next attach."""
        self._call("detach", None)

    def hold(self) -> None:
        """Keep new requests back while replies still flow (before asking the kernel to suspend)."""
        self._call("hold", None)

    def release(self) -> None:
        """Send what ``hold`` kept back and forward again (the kernel would not suspend)."""
        self._call("release", None)

    def stand_in(self, on_wake: Callable[[], None]) -> None:
        """No kernel process exists: answer alone; the next execute_request calls ``on_wake()``
        (in a thread of its own), which must end with ``attach`` or ``wake_failed``. Cells the
        kernel had not answered (a suspending kernel drops them) wake it again at once."""
        if self.front.signer is None:
            raise ProxyError("stand_in() needs configure_session() first")
        self._call("stand_in", on_wake)

    def forget_kernel(self) -> None:
        """The kernel process ended for good (restart): its unanswered cells went with it."""
        self._call("forget", None)

    def progress(self, text: str) -> None:
        """Show one line in the cell that woke the session (no-op when none waits)."""
        self._call("progress", text)

    def status_line(self, text: str) -> None:
        """Show ``text`` in the waking cell, replacing the previous status line."""
        self._call("status_line", text)

    def clear_status(self) -> None:
        """Remove the waking cell's status line (before the kernel runs it)."""
        self._call("clear", None)

    def notice_next_cell(self, text: str) -> None:
        """Show ``text`` (stderr) at the top of the next cell the kernel runs (something the
        user should know that happened between cells, e.g. a suspend that failed)."""
        self._call("notice", text)

    def notify_running_cell(self, text: str) -> None:
        """Show ``text`` (stderr) in the cell the kernel is running now, if any."""
        self._call("notify", text)

    def wake_failed(self, text: str, ename: str = "ResumeFailed") -> None:
        """Answer every waiting cell with an error that says why; keep standing in."""
        self._call("wake_failed", (text, ename))

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

    def _to(self, event: ProxyEvent) -> None:
        self._state = transition(self._state, event)

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
                    self._synced()
        except Exception:
            log.exception("session proxy: its thread stopped; the kernel is unreachable")
        finally:
            self._state = ProxyState.CLOSED
            self._close_upstream()
            for sock in [*self._front.values(), self._wake_rx]:
                if sock is not None:
                    sock.close(linger=0)

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
                self._command(name, arg)
            except Exception as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _command(self, name: str, arg: Any) -> None:
        if name == "attach":
            self._do_attach(*arg)
        elif name == "detach":
            self._to(E.DETACH)
            self._close_upstream()
            self._activity = replace(self._activity, attached=False)
        elif name == "session":
            self.front.configure(*arg)
        elif name == "own":
            self._own_sessions = arg
        elif name == "hold":
            self._to(E.HOLD)
        elif name == "release":
            self._to(E.RELEASE)
            self._send_queued()
        elif name == "stand_in":
            self._do_stand_in(arg)
        elif name == "forget":
            self._executions.forget()
        elif name == "progress":
            self.stand_in_for.progress(arg)
        elif name == "status_line":
            self.stand_in_for.status_line(arg)
        elif name == "clear":
            self.stand_in_for.clear()
        elif name == "notify":
            self._notify_running(arg)
        elif name == "notice":
            self._notice = arg
        elif name == "wake_failed":
            self._to(E.WAKE_FAILED)
            self._queued = deque(self.stand_in_for.fail(self._queued, *arg))
        else:
            raise ProxyError(f"unknown session proxy command {name!r}")

    def _do_attach(self, ports: dict[str, int], ip: str, same_kernel: bool) -> None:
        self._to(E.ATTACH)
        self._close_upstream()
        if not same_kernel:
            # a new kernel process: what the old one never answered went with it (stand_in
            # took the cells a suspending kernel dropped, to wake the next one with them)
            self._executions.forget()
            # a new identity: no clash with a stale peer of the old kernel
            self._identity = uuid.uuid4().hex.encode()
        try:
            for channel, kind in (
                ("shell", zmq.DEALER),
                ("control", zmq.DEALER),
                ("stdin", zmq.DEALER),
                ("iopub", zmq.SUB),
            ):
                sock = self._ctx.socket(kind)
                sock.linger = 0
                # a kernel that exits (a suspend: its save is done, its process is ending) is
                # asked for again with backoff up to 1 s, not every 100 ms: each try opens an
                # SSH channel to a closed port (hundreds per suspend on a loaded machine)
                sock.reconnect_ivl_max = UPSTREAM_RECONNECT_MAX_MS
                if kind == zmq.DEALER and channel != "control":
                    # the kernel routes input_request by shell identity; the same kernel after
                    # a reconnect sends its pending replies to the same identity
                    sock.identity = self._identity
                if kind == zmq.SUB:
                    sock.setsockopt(zmq.SUBSCRIBE, b"")
                self._up[channel] = sock
                sock.connect(f"tcp://{ip}:{ports[channel]}")
        except zmq.ZMQError as exc:
            self._close_upstream()
            self._state = ProxyState.DETACHED
            raise ProxyError(f"session proxy could not connect to {ip}: {exc}") from exc
        for channel, sock in self._up.items():
            self._handlers[sock] = (
                self._on_iopub if channel == "iopub" else lambda c=channel: self._on_reply(c)
            )
            self._poller.register(sock, zmq.POLLIN)
        self._sync_deadline = time.monotonic() + self._sync_timeout
        self._probe = None
        if same_kernel and self._executions.pending:
            self._send_probe()
        self._activity = replace(self._activity, attached=True)

    def _synced(self) -> None:
        self._to(E.SYNCED)
        self.stand_in_for.end_wake()
        self._send_queued()

    def _send_queued(self) -> None:
        while self._queued and self._state is ProxyState.ATTACHED:
            channel, frames = self._queued.popleft()
            self._send_up(channel, frames)

    def _do_stand_in(self, on_wake: Callable[[], None]) -> None:
        self._to(E.STAND_IN)
        self._close_upstream()
        self._on_wake = on_wake
        self._activity = replace(self._activity, attached=False, busy=False, execution_state="idle")
        # unanswered cells first (the saving kernel dropped them), then what waited here
        held = deque([*self._executions.take_unanswered(), *self._queued])
        self._queued = deque()
        for channel, frames in held:  # a cell run while we suspended wakes it at once
            self._stand_in(channel, frames, replayed=True)

    def _close_upstream(self) -> None:
        for sock in self._up.values():
            self._poller.unregister(sock)
            self._handlers.pop(sock, None)
            sock.close(linger=0)
        self._up = {}

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
        if self._state in (ProxyState.STANDING_IN, ProxyState.WAKING):
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

    def _stand_in(self, channel: str, frames: list[bytes], replayed: bool = False) -> None:
        decision = self.stand_in_for.handle(channel, frames, replayed)
        if decision in (Decision.QUEUE, Decision.WAKE):
            self._queue(channel, frames)
        if decision is Decision.WAKE:
            self._activity = replace(self._activity, last_activity=time.time())
            if self._state is ProxyState.STANDING_IN:
                self._wake(frames)

    def _wake(self, frames: list[bytes]) -> None:
        self._to(E.WAKE)
        self.stand_in_for.begin_wake(frames)
        on_wake = self._on_wake
        if on_wake is None:
            self._to(E.WAKE_FAILED)
            text = "this kernel cannot start (its session is gone); restart it"
            self._queued = deque(self.stand_in_for.fail(self._queued, text, "ResumeFailed"))
            return
        threading.Thread(target=on_wake, name="session-wake", daemon=True).start()

    def _queue(self, channel: str, frames: list[bytes]) -> None:
        if len(self._queued) >= MAX_QUEUED:
            log.warning("session proxy queue full (%d); %s request dropped", MAX_QUEUED, channel)
        else:
            self._queued.append((channel, frames))

    def _send_up(self, channel: str, frames: list[bytes]) -> None:
        if channel == "shell" and (msg_id := _execute_id(frames)) is not None:
            self._executions.sent(msg_id, channel, frames)
            if self._notice is not None and self.front.signer is not None:
                parent = {"header": m.loads(m.signed_frame(frames, m.HEADER)) or {}}
                text = self._notice.rstrip("\n") + "\n"
                self.front.publish("stream", {"name": "stderr", "text": text}, parent)
                self._notice = None
        try:
            self._up[channel].send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("session proxy: kernel's %s queue full; request dropped", channel)

    def _send_probe(self) -> None:
        """Our own kernel_info_request, queued behind every cell the kernel already has."""
        signer = self.front.signer
        if signer is None:
            return
        msg = signer.msg("kernel_info_request", {})
        self._probe = (msg["header"]["msg_id"], self._executions.mark())
        self._up["shell"].send_multipart(signer.serialize(msg), zmq.NOBLOCK)

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
            if channel == "shell" and not self._on_shell_reply(frames):
                continue
            dst.send_multipart(frames, zmq.NOBLOCK)

    def _on_shell_reply(self, frames: list[bytes]) -> bool:
        """Bookkeeping of one shell reply; False when it is ours and stays here."""
        header = m.signed_frame(frames, m.HEADER)
        if header is None:
            return True
        if b"execute_reply" in header:
            parent = m.loads(m.signed_frame(frames, m.PARENT)) or {}
            self._executions.replied(str(parent.get("msg_id")))
        elif b"kernel_info_reply" in header:
            parent = m.loads(m.signed_frame(frames, m.PARENT)) or {}
            if self._probe is not None and parent.get("msg_id") == self._probe[0]:
                self._end_probe()
                return False
            self.stand_in_for.kernel_info = kernel_info_content(frames)
        return True

    def _end_probe(self) -> None:
        """Our probe came back: the cells sent before it without a reply lost it in the drop."""
        assert self._probe is not None
        _, mark = self._probe
        self._probe = None
        for channel, frames in self._executions.unanswered_before(mark):
            d = m.delim_index(frames)
            header = m.loads(m.signed_frame(frames, m.HEADER, d)) or {}
            log.warning("session proxy: cell %s lost its reply in a drop", header.get("msg_id"))
            self.stand_in_for.answer_with_error(
                channel, frames[:d], header, LOST_TEXT, "ConnectionLost"
            )
        self._activity = replace(self._activity, busy=self._executions.busy)

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
                if msg_type == "status" and not self._on_status(frames, d):
                    continue  # the status of a request we made ourselves
                if msg_type == "iopub_welcome":
                    if self._state is ProxyState.SYNCING:
                        self._synced()
                    continue  # addressed to our SUB, not to the frontends
            if self._state is ProxyState.SYNCING:
                self._synced()
            dst.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def _on_status(self, frames: list[Any], d: int) -> bool:
        """Track the kernel's execution state; False for a status to hide from the frontends."""
        parent = m.loads(m.signed_frame(frames, m.PARENT, d)) or {}
        parent_header = parent if "msg_type" in parent else {}
        if str(parent_header.get("session", "")).encode() in self._own_sessions:
            return False
        state = m.status_state(frames, d)
        if state is None:
            return True
        is_execute = parent_header.get("msg_type") == "execute_request"
        self._executions.status(state, str(parent_header.get("msg_id", "")), is_execute)
        old = self._activity
        last = time.time() if state == "idle" and is_execute else old.last_activity
        self._activity = Activity(self._executions.busy, state, last, old.attached)
        return True

    def _notify_running(self, text: str) -> None:
        frames = self._executions.running_frames()
        if frames is None or self.front.signer is None:
            return
        parent = {"header": m.loads(m.signed_frame(frames, m.HEADER)) or {}}
        self.front.publish("stream", {"name": "stderr", "text": text.rstrip("\n") + "\n"}, parent)

    def _on_suspended_notice(self, frames: list[Any], d: int) -> None:
        if m.header_msg_type(m.signed_frame(frames, m.HEADER, d)) != "shared_gpu_suspended":
            return
        if self._state in (ProxyState.ATTACHED, ProxyState.SYNCING):
            self._to(E.HOLD)  # the next cell waits for the resume
        content = m.loads(m.signed_frame(frames, m.CONTENT, d)) or {}
        hook = self.kernel_suspended_hook
        if hook is not None:
            threading.Thread(target=hook, args=(content,), daemon=True).start()


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
