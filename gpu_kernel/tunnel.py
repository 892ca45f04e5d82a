"""Port forwarding for ``SSHConnection.forward``: every tunnel of a connection in one thread.

``ForwardPump`` owns the local listening sockets of one SSH transport. Each accepted connection
gets a ``direct-tcpip`` channel to 127.0.0.1:<remote port> on the host; one thread moves bytes
both ways with ``select()`` over sockets and channels (a paramiko ``Channel`` has a ``fileno()``),
with per-direction buffers for back-pressure and clean half-close. No paramiko import here: the
transport and its channels are used through their methods only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

from gpu_kernel import fdwait

log = logging.getLogger(__name__)

CHUNK = 65536
BUFFER_LIMIT = 4 * CHUNK  # stop reading a side while this much waits for the other
OPEN_TIMEOUT = 10.0


class _Pipe:
    """One forwarded TCP connection: a local socket and its SSH channel."""

    def __init__(self, sock: socket.socket, chan: Any, local_port: int) -> None:
        self.sock, self.chan = sock, chan
        self.local_port = local_port  # the listener it came from
        sock.setblocking(False)
        chan.settimeout(0.0)
        self.to_sock = bytearray()
        self.to_chan = bytearray()
        self.sock_eof = self.chan_eof = False  # EOF received from that side
        self.sock_shut = self.chan_shut = False  # EOF passed on to that side
        self.done = False

    def want_sock_read(self) -> bool:
        return not self.sock_eof and len(self.to_chan) < BUFFER_LIMIT

    def want_chan_read(self) -> bool:
        return not self.chan_eof and len(self.to_sock) < BUFFER_LIMIT

    def step(self, readable: set[Any]) -> None:
        """Read what is ready, write what can be written, pass EOFs on; close when both ended."""
        try:
            if self.sock in readable:
                data = self.sock.recv(CHUNK)
                if data:
                    self.to_chan += data
                else:
                    self.sock_eof = True
            if self.chan in readable:
                with contextlib.suppress(socket.timeout):
                    data = self.chan.recv(CHUNK)
                    if data:
                        self.to_sock += data
                    else:
                        self.chan_eof = True
            if self.to_sock:
                with contextlib.suppress(BlockingIOError):
                    del self.to_sock[: self.sock.send(self.to_sock)]
            while self.to_chan and self.chan.send_ready():
                del self.to_chan[: self.chan.send(self.to_chan[:CHUNK])]
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, EOFError) as e:
            self._broken(e)
            return
        if self.sock_eof and not self.to_chan and not self.chan_shut:
            self.chan_shut = True
            try:
                self.chan.shutdown_write()
            except (OSError, EOFError) as e:
                self._broken(e)
                return
        if self.chan_eof and not self.to_sock and not self.sock_shut:
            self.sock_shut = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        # A closed channel may still hold data: it is gone only once recv() said EOF.
        remote_gone = self.chan_eof and self.chan.closed and not self.to_sock
        if (self.sock_shut and self.chan_shut) or remote_gone:
            self.close()

    def _broken(self, e: OSError | EOFError) -> None:
        """Reset by either side, or the transport went away (paramiko raises EOFError for a
        send on a transport that just died): this connection ends, the others go on."""
        log.debug("forwarded connection ended: %r", e)
        self.close()

    def close(self) -> None:
        self.done = True
        # closing sends a message: on a transport that just died that raises; it is gone anyway
        with contextlib.suppress(Exception):  # EOFError, OSError or paramiko.SSHException
            self.chan.close()
        self.sock.close()


class ForwardPump:
    """The forwarding thread of one SSH connection (``SSHConnection.forward`` creates it)."""

    def __init__(self, transport: Any, host_name: str) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        self._listeners: dict[socket.socket, int] = {}
        self._closing: set[int] = set()  # local ports whose listener and pipes go away
        self._pipes: list[_Pipe] = []
        self._refused: set[int] = set()  # remote ports whose last channel open failed
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(
            target=self._run, name=f"ssh-forward-{host_name}", daemon=True
        )
        self._thread.start()

    @property
    def connections(self) -> int:
        """How many forwarded connections are open now."""
        return len(self._pipes)

    @property
    def listening(self) -> list[int]:
        """The local ports listened on, less those ``unlisten`` has closed or is closing (the
        pump's thread closes them at its next turn)."""
        with self._lock:
            ports = (s.getsockname()[1] for s in self._listeners)
            return sorted(port for port in ports if port not in self._closing)

    def listen(self, remote_port: int) -> int:
        """Listen on 127.0.0.1:0 for ``remote_port``; returns the local port."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        s.setblocking(False)
        with self._lock:
            self._listeners[s] = remote_port
        self._wake()
        return s.getsockname()[1]

    @property
    def alive(self) -> bool:
        """False once the thread has stopped (asked to, or by an unexpected error)."""
        return self._thread.is_alive()

    def unlisten(self, local_port: int) -> None:
        """Stop listening on ``local_port`` and close the connections accepted there (the
        kernel behind it is gone or replaced): the port no longer reaches the host."""
        with self._lock:
            self._closing.add(local_port)  # the pump's thread closes it (it may be selecting)
        self._wake()

    def stop(self) -> None:
        """Ask the thread to close every listener and forwarded connection; idempotent."""
        self._stopping = True
        self._wake()

    def join(self, timeout: float = 5.0) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._once()
        except Exception:
            log.exception("SSH port forwarding stopped")
        finally:
            with self._lock:
                listeners, self._listeners = list(self._listeners), {}
            for s in listeners:
                s.close()
            for p in self._pipes:
                p.close()
            self._pipes = []
            self._wake_r.close()
            self._wake_w.close()

    def _once(self) -> None:
        with self._lock:
            closing, self._closing = self._closing, set()
            for sock in [s for s, _ in self._listeners.items() if s.getsockname()[1] in closing]:
                del self._listeners[sock]
                sock.close()
            listeners = dict(self._listeners)
        if closing:
            for p in self._pipes:
                if p.local_port in closing:
                    p.close()
            self._pipes = [p for p in self._pipes if not p.done]
        rlist: list[Any] = [self._wake_r, *listeners]
        wlist: list[Any] = []
        chan_pending = False
        for p in self._pipes:
            if p.want_sock_read():
                rlist.append(p.sock)
            if p.want_chan_read():
                rlist.append(p.chan)
            if p.to_sock:
                wlist.append(p.sock)
            chan_pending = chan_pending or bool(p.to_chan)
        # A channel's fileno only signals readability: poll while its send window is full.
        r, w = fdwait.ready(rlist, wlist, 0.005 if chan_pending else 1.0)
        ready = set(r) | set(w)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        for s, port in listeners.items():
            if s in ready:
                self._accept(s, port)
        for p in self._pipes:
            if p.sock in ready or p.chan in ready or p.to_sock or p.to_chan or p.chan.closed:
                p.step(ready)
        self._pipes = [p for p in self._pipes if not p.done]

    def _accept(self, listener: socket.socket, remote_port: int) -> None:
        local_port = listener.getsockname()[1]
        while True:
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept on the tunnel to port %d failed: %s", remote_port, e)
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                chan = self._transport.open_channel(
                    "direct-tcpip", ("127.0.0.1", remote_port), peer, timeout=OPEN_TIMEOUT
                )
            except Exception as e:  # ChannelException (refused there), SSHException, EOFError
                # once per port: a kernel that is exiting is asked again until its forwards close
                level = logging.DEBUG if remote_port in self._refused else logging.INFO
                self._refused.add(remote_port)
                log.log(level, "cannot open a tunnel to port %d on the host: %s", remote_port, e)
                conn.close()
                continue
            self._refused.discard(remote_port)
            self._pipes.append(_Pipe(conn, chan, local_port))
