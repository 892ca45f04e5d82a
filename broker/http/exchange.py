"""One request and its reply, as tornado sees them: ``Exchange`` is the
``tornado.httputil.HTTPConnection`` that ``broker.http.front.HttpProtocol`` hands each parsed
``Request`` to; it builds tornado's ``HTTPServerRequest``, asks the router for a delegate, and
writes what the delegate answers to the protocol's transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from tornado import httputil
from tornado.concurrent import Future

from broker.http import limits


class HttpProtocol(Protocol):
    """What an ``Exchange`` needs of its connection (``broker.http.front.HttpProtocol``)."""

    context: Context
    router: Any
    transport: asyncio.Transport | None

    def done(self, exchange: Exchange, keep_alive: bool) -> None: ...

__all__ = ["Context", "Exchange", "Request"]


class Context:
    """What ``HTTPServerRequest`` reads off its connection's ``context``."""

    def __init__(self, remote_ip: str) -> None:
        self.remote_ip = remote_ip
        self.protocol = "http"


class Request:
    """One request being read or waiting for its turn on the connection."""

    __slots__ = (
        "body", "body_bytes", "body_from", "head_bytes", "headers", "keep_alive", "method", "size",
        "started", "url", "version",
    )  # fmt: skip

    def __init__(self, started: float) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.method = ""
        self.version = "HTTP/1.1"
        self.keep_alive = True
        self.started = started  # loop time of its first byte
        self.body_from = 0.0  # loop time its headers ended (0: not yet)
        self.head_bytes = 0
        self.body_bytes = 0
        self.size = limits.REQUEST_OVERHEAD  # what it holds, for the budget


class Exchange(httputil.HTTPConnection):
    """One request and its reply: tornado's delegate writes the reply through this."""

    def __init__(self, protocol: HttpProtocol, request: Request) -> None:
        self.protocol = protocol
        self.request = request
        self.context = protocol.context
        self.keep_alive = request.keep_alive
        self.head = request.method == "HEAD"
        self.close_callback: Callable[[], None] | None = None
        self.started_reply = False
        self.finished = False

    def start(self) -> None:
        request = self.request
        headers = httputil.HTTPHeaders()
        for name, value in request.headers:
            headers.add(name.decode("latin-1"), value.strip(b" \t").decode("latin-1"))
        start_line = httputil.RequestStartLine(
            request.method, request.url.decode("latin-1"), request.version
        )
        server_request = httputil.HTTPServerRequest(
            connection=self, start_line=start_line, headers=headers
        )
        delegate = self.protocol.router.find_handler(server_request)
        if delegate is None:
            self._write_plain(404, b"")
            self.finish()
            return
        delegate.headers_received(start_line, headers)
        body = b"".join(request.body)
        if body:
            delegate.data_received(body)
        delegate.finish()

    # -- tornado.httputil.HTTPConnection ---------------------------------------------------------

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        self.close_callback = callback

    def write_headers(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> Future[None]:
        assert isinstance(start_line, httputil.ResponseStartLine)
        self.started_reply = True
        if "Content-Length" not in headers and start_line.code not in (204, 304):
            self.keep_alive = False  # no length: the end of the connection ends the body
        if self.keep_alive and self.request.version == "HTTP/1.0":
            headers["Connection"] = "Keep-Alive"
        elif not self.keep_alive:
            headers["Connection"] = "close"
        lines = [f"HTTP/1.1 {start_line.code} {start_line.reason}"]
        lines.extend(f"{name}: {value}" for name, value in headers.get_all())
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._send(head + (chunk or b"") if not self.head else head)
        return _done()

    def write(self, chunk: bytes) -> Future[None]:
        if not self.head:
            self._send(chunk)
        return _done()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.protocol.done(self, self.keep_alive)

    # -- internals -------------------------------------------------------------------------------

    def lost(self) -> None:
        """The client went away before the reply was written."""
        callback, self.close_callback = self.close_callback, None
        if callback is not None:
            callback()

    def _send(self, data: bytes) -> None:
        transport = self.protocol.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _write_plain(self, status: int, body: bytes) -> None:
        reason = httputil.responses.get(status, "Unknown")
        self._send(f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n\r\n".encode())


def _done() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future
