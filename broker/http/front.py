"""The broker's HTTP/1.1 server: httptools (llhttp, C) parses requests on an asyncio protocol,
and each request goes to a tornado delegate (``ApiRouter`` or a ``tornado.web.Application``)
through ``Exchange``, a ``tornado.httputil.HTTPConnection`` that writes to the socket.

Why not ``tornado.httpserver.HTTPServer``: its pure-Python header parsing and stream machinery
cost the broker's loop about as much CPU per request as everything else it does together
(``bench/broker_load.py``). The handlers, routing and errors stay tornado's.

What a client can rely on: keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked); pipelined
requests answered in order, one at a time per connection; ``Expect: 100-continue``; chunked
request bodies. Limits, each answered with a JSON error before the connection closes: headers
over ``MAX_HEADER_BYTES`` (431), a body over ``MAX_BODY_BYTES`` (413), a malformed request
(400). A request must arrive whole within ``REQUEST_TIMEOUT`` seconds, and an idle kept-alive
connection closes after ``IDLE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools
from tornado import httputil
from tornado.concurrent import Future

from broker.http.calls import INTERNAL_ERROR, JSON_HEADERS, ApiError

log = logging.getLogger("broker.api")

__all__ = ["MAX_BODY_BYTES", "MAX_HEADER_BYTES", "HttpProtocol"]

MAX_HEADER_BYTES = 64 * 1024  # request line and headers together
MAX_BODY_BYTES = 1024 * 1024  # every API body is a small JSON object
REQUEST_TIMEOUT = 60.0  # from a request's first byte to its last
IDLE_TIMEOUT = 3600.0  # a kept-alive connection with nothing in flight (tornado's default)
MAX_QUEUED = 16  # pipelined requests read ahead before reading pauses
LINGER = 2.0  # seconds a refused request's connection drains before it closes

Router = Any  # anything with tornado's ``find_handler(request) -> HTTPMessageDelegate``


class _Context:
    """What ``HTTPServerRequest`` reads off its connection's ``context``."""

    def __init__(self, remote_ip: str) -> None:
        self.remote_ip = remote_ip
        self.protocol = "http"


class _Refused(Exception):
    """A request the server answers itself, with ``status``, before closing the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Request:
    """One parsed request, waiting for its turn on the connection."""

    __slots__ = ("body", "headers", "keep_alive", "method", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.method = ""
        self.version = "HTTP/1.1"
        self.keep_alive = True


class HttpProtocol(asyncio.Protocol):
    """One client connection. ``router`` gives each request its tornado delegate."""

    def __init__(self, router: Router, connections: set[HttpProtocol]) -> None:
        self.router = router
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request] = deque()
        self.current: Exchange | None = None  # the request being answered
        self.parsing: _Request | None = None
        self.header_bytes = 0
        self.body_bytes = 0
        self.context = _Context("")
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.discarding = False  # a refused request: read and drop until the close
        self.refusal: tuple[int, str] | None = None  # to send once ``current`` is answered

    # -- asyncio --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.context = _Context(str(peer[0]) if isinstance(peer, tuple) else "")
        self.connections.add(self)
        self._arm(IDLE_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.queue.clear()
        if self.current is not None:
            self.current.lost()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self.discarding:
            return
        if self.parsing is None and self.current is None and not self.queue:
            self._arm(REQUEST_TIMEOUT)
        try:
            self.parser.feed_data(data)
        except _Refused as exc:
            self._refuse(exc.status, exc.message)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.message)
            else:
                self._refuse(400, "malformed HTTP request")
        except httptools.HttpParserUpgrade:
            self._refuse(400, "this server does not switch protocols")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = _Request()
        self.header_bytes = self.body_bytes = 0

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self._count_header(len(url))
        self.parsing.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.parsing is not None
        self._count_header(len(name) + len(value) + 4)
        self.parsing.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None and self.transport is not None
        request.method = self.parser.get_method().decode("ascii")
        request.version = f"HTTP/{self.parser.get_http_version()}"
        request.keep_alive = self.parser.should_keep_alive()
        length = _header(request.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _Refused(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        if (_header(request.headers, b"expect") or b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        assert self.parsing is not None
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            raise _Refused(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        self.parsing.body.append(body)

    def on_message_complete(self) -> None:
        request, self.parsing = self.parsing, None
        assert request is not None and self.transport is not None
        self.queue.append(request)
        if len(self.queue) >= MAX_QUEUED and not self.paused:
            self.transport.pause_reading()
            self.paused = True
        if self.current is None:
            self._next()

    # -- answering -------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the oldest queued request, if any (one at a time: replies in order)."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.queue:
            self._arm(REQUEST_TIMEOUT if self.parsing is not None else IDLE_TIMEOUT)
            if self.paused:
                self.transport.resume_reading()
                self.paused = False
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        request = self.queue.popleft()
        exchange = self.current = Exchange(self, request)
        try:
            exchange.start()
        except httputil.HTTPInputError as exc:  # e.g. a control character in a header
            self.current = None
            self._refuse(400, f"malformed HTTP request: {exc}")
        except Exception:
            log.exception("%s %s failed", request.method, request.url[:200])
            if self.current is exchange:
                self.current = None
                if exchange.started_reply:
                    self.close()
                else:
                    self._refuse(500, INTERNAL_ERROR)

    def done(self, exchange: Exchange, keep_alive: bool) -> None:
        """``exchange`` wrote its whole reply."""
        if self.current is not exchange:
            return
        self.current = None
        if self.refusal is not None:
            status, message = self.refusal
            self.refusal = None
            self.discarding = False
            self._refuse(status, message)
        elif not keep_alive:
            self.close()
        else:
            self._next()

    def _count_header(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _Refused(431, f"the request line and headers are over {MAX_HEADER_BYTES} bytes")

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request the router never saw, then close (the stream is out of step). A
        reply still being made for an earlier request goes out first."""
        if self.transport is None or self.transport.is_closing():
            return
        log.info("%d from %s: %s", status, self.context.remote_ip, message)
        self.queue.clear()
        self.discarding = True
        if self.current is not None:
            self.refusal = (status, message)  # ``done`` sends it
            return
        codes = {413: "too_large", 431: "headers_too_large", 500: "internal"}
        body = json.dumps(ApiError(status, codes.get(status, "bad_request"), message).body())
        reason = httputil.responses.get(status, "Bad Request")
        head = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in JSON_HEADERS.items())]
        head += [f"Content-Length: {len(body)}", "Connection: close"]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n" + body).encode())
        self._linger()

    def _linger(self) -> None:
        """Close after the reply, reading (and dropping) what the client still sends for a
        moment: closing with unread bytes would reset the connection and lose the reply."""
        assert self.transport is not None
        self.discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(LINGER)

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        if self.current is None or self.discarding:  # a long poll still working is not idle
            self.close()


class Exchange(httputil.HTTPConnection):
    """One request and its reply: tornado's delegate writes the reply through this."""

    def __init__(self, protocol: HttpProtocol, request: _Request) -> None:
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


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value.strip()
    return None


def _done() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future
