"""The broker's HTTP/1.1 server: httptools (llhttp, C) parses requests on an asyncio protocol,
``HttpProtocol``, one per connection; each parsed request goes to a tornado delegate
(``ApiRouter`` or a ``tornado.web.Application``) through ``broker.http.exchange.Exchange``.
``BrokerServer`` gives every connection of a server one ``broker.http.limits.Connections``.

Why not ``tornado.httpserver.HTTPServer``: per request its wire handling costs about 2.5 times
the CPU of this one (half as much again per lease call), per idle connection twice the memory,
and it has no connection cap, no header timeout of its own, and reads unfinished bodies whole
(docs/internals.md has the measurements). The handlers, routing and errors stay tornado's.

What a client can rely on: keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked); pipelined
requests answered in order, one at a time per connection; ``Expect: 100-continue``; chunked
request bodies. What no client can do (``broker.http.limits`` lists the limits and the memory
bound): grow the broker's memory by not reading its replies (the connection is no longer read),
hold more connections than the caps (503), send slowly (408), send too much (413, 431, 429),
or keep an idle connection open past a minute.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Any

import httptools
from tornado import httputil

from broker.http import limits
from broker.http.calls import INTERNAL_ERROR, JSON_HEADERS, ApiError
from broker.http.exchange import Context, Exchange, Request
from broker.http.limits import LISTEN_BACKLOG, Connections

log = logging.getLogger("broker.api")

__all__ = ["LISTEN_BACKLOG", "Connections", "HttpProtocol"]

Router = Any  # anything with tornado's ``find_handler(request) -> HTTPMessageDelegate``

_CODES = {
    408: "request_timeout",
    413: "too_large",
    429: "too_many_pipelined",
    431: "headers_too_large",
    500: "internal",
    503: "too_many_connections",
}


class _Refused(Exception):
    """A request the server answers itself, with ``status``, before closing the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpProtocol(asyncio.BufferedProtocol):
    """One client connection. ``router`` gives each request its tornado delegate."""

    def __init__(self, router: Router, connections: Connections) -> None:
        self.router = router
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.current: Exchange | None = None  # the request being answered
        self.parsing: Request | None = None
        self.held = 0  # bytes of requests read and not yet answered
        self.drawn = 0  # of which drawn from the read budget
        self.context = Context("")
        self.timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        self.stuck_since = 0.0  # when the unsent replies went over the high-water mark
        self.reading = True
        self.write_paused = False
        self.starved = False  # waiting for the read budget
        self.discarding = False  # a refused request: read and drop until the close
        self.drained = 0  # bytes read and dropped so
        self.refusal: tuple[int, str] | None = None  # to send once ``current`` is answered

    # -- asyncio --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.context = Context(str(peer[0]) if isinstance(peer, tuple) else "")
        transport.set_write_buffer_limits(high=limits.WRITE_HIGH_WATER, low=limits.WRITE_LOW_WATER)
        why = self.connections.admit(self)
        if why is not None:
            self._refuse(503, why)
            return
        self.idle_since = asyncio.get_running_loop().time()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.forget(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        if self.current is not None:
            self.current.lost()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.connections.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.discarding:
            self.drained += nbytes
            if self.drained > limits.MAX_DRAIN:  # a refused client still sending hard
                self.transport.abort()
            return
        try:
            self.parser.feed_data(self.connections.buffer[:nbytes])
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
        if self.held > limits.REQUEST_ALLOWANCE or self.drawn:
            self.starved = not self.connections.settle(self, self.held)
        self._flow()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.stuck_since = asyncio.get_running_loop().time()
        self._flow()
        self._arm()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._flow()
        if self.current is None and self.refusal is None:
            self._next()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def fed(self) -> None:
        """The read budget has room again (``Connections`` calls this)."""
        self.starved = False
        self._flow()

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if len(self.queue) >= limits.MAX_PIPELINED:
            raise _Refused(
                429,
                f"over {limits.MAX_PIPELINED} requests sent ahead of their replies: read them",
            )
        self.parsing = Request(asyncio.get_running_loop().time())
        self.held += limits.REQUEST_OVERHEAD
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url), len(url))
        self.parsing.url += url  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._count_head(size + 4, size + limits.HEADER_OVERHEAD)
        self.parsing.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None and self.transport is not None
        request.body_from = asyncio.get_running_loop().time()
        request.method = self.parser.get_method().decode("ascii")
        request.version = f"HTTP/{self.parser.get_http_version()}"
        request.keep_alive = self.parser.should_keep_alive()
        length = _header(request.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > limits.MAX_BODY_BYTES:
            raise _Refused(413, f"the request body is over {limits.MAX_BODY_BYTES} bytes")
        if (_header(request.headers, b"expect") or b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length != b"0":  # a body may follow: its time limit may end before the head's
            self._arm()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.body_bytes += len(body)
        if request.body_bytes > limits.MAX_BODY_BYTES:
            raise _Refused(413, f"the request body is over {limits.MAX_BODY_BYTES} bytes")
        request.size += len(body)
        self.held += len(body)
        request.body.append(body)

    def on_message_complete(self) -> None:
        request, self.parsing = self.parsing, None
        assert request is not None
        self.queue.append(request)
        if self.current is None and not self.write_paused:
            self._next()

    # -- answering -------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the oldest queued request, if any (one at a time: replies in order)."""
        if self.transport is None or self.transport.is_closing() or self.write_paused:
            return
        if not self.queue:
            if self.parsing is None:
                self.idle_since = asyncio.get_running_loop().time()
                self._arm()
            self._flow()
            return
        request = self.queue.popleft()
        exchange = self.current = Exchange(self, request)
        self._flow()
        try:
            exchange.start()
        except httputil.HTTPInputError as exc:  # e.g. a control character in a header
            self._answered(exchange)
            self._refuse(400, f"malformed HTTP request: {exc}")
        except Exception:
            log.exception("%s %s failed", request.method, request.url[:200])
            if self.current is exchange:
                self._answered(exchange)
                if exchange.started_reply:
                    self.close()
                else:
                    self._refuse(500, INTERNAL_ERROR)

    def done(self, exchange: Exchange, keep_alive: bool) -> None:
        """``exchange`` wrote its whole reply."""
        if self.current is not exchange:
            return
        self._answered(exchange)
        if self.refusal is not None:
            status, message = self.refusal
            self.refusal = None
            self.discarding = False
            self._refuse(status, message)
        elif not keep_alive:
            self.close()
        else:
            self._next()

    def _answered(self, exchange: Exchange) -> None:
        self.current = None
        self.held -= exchange.request.size
        if self.drawn:
            self.starved = not self.connections.settle(self, self.held)

    def _count_head(self, raw: int, size: int) -> None:
        """The request being read grew by ``raw`` bytes of its head, ``size`` bytes in memory."""
        request = self.parsing
        assert request is not None
        request.head_bytes += raw
        request.size += size
        self.held += size
        if request.head_bytes > limits.MAX_HEADER_BYTES:
            raise _Refused(
                431, f"the request line and headers are over {limits.MAX_HEADER_BYTES} bytes"
            )

    def _flow(self) -> None:
        """Read from the socket only while the client reads its replies, few requests wait,
        and the read budget has room (or the connection is being drained before its close)."""
        assert self.transport is not None
        want = self.discarding or not (
            self.write_paused or self.starved or len(self.queue) >= limits.MAX_QUEUED
        )
        if want != self.reading and not self.transport.is_closing():
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request the router never saw, then close (the stream is out of step). A
        reply still being made for an earlier request goes out first."""
        if self.transport is None or self.transport.is_closing():
            return
        self.connections.refused(self.context.remote_ip, f"{status} {message}")
        self.queue.clear()
        self.parsing = None
        self.held = self.current.request.size if self.current is not None else 0
        if self.drawn:
            self.connections.settle(self, self.held)
        self.starved = False
        self.discarding = True
        if self.current is not None:
            self.refusal = (status, message)  # ``done`` sends it
            return
        body = json.dumps(ApiError(status, _CODES.get(status, "bad_request"), message).body())
        reason = httputil.responses.get(status, "Bad Request")
        head = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in JSON_HEADERS.items())]
        head += [f"Content-Length: {len(body)}", "Connection: close"]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n" + body).encode())
        self._linger()

    def _linger(self) -> None:
        """Close after the reply, reading (and dropping) what the client still sends for a
        moment: closing with unread bytes would reset the connection and lose the reply."""
        assert self.transport is not None
        lingering = self.connections.lingering
        if self not in self.connections.open and len(lingering) >= limits.MAX_LINGERING:
            self.transport.close()  # refused at the door during a flood: no time to drain
            return
        if self not in self.connections.open:
            lingering.add(self)
        self.discarding = True
        self._flow()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(limits.LINGER, self.transport.abort)

    # -- timeouts --------------------------------------------------------------------------------

    def _due(self) -> float | None:
        """When this connection's next time limit runs out (loop time), None if none runs."""
        due: float | None = None
        if self.write_paused:
            due = self.stuck_since + limits.SEND_TIMEOUT
        request = self.parsing
        if request is not None:
            if request.body_from:
                limit = (
                    request.body_from
                    + limits.BODY_TIMEOUT
                    + request.body_bytes / limits.BODY_MIN_RATE
                )
            else:
                limit = request.started + limits.HEADER_TIMEOUT
            due = limit if due is None else min(due, limit)
        elif self.current is None and not self.queue and not self.write_paused:
            due = self.idle_since + limits.IDLE_TIMEOUT
        return due

    def _arm(self) -> None:
        """Make sure the timer fires by the next time limit (firing early costs one check)."""
        due = self._due()
        if due is None or self.discarding:
            return
        if self.timer is not None:
            if self.timer.when() <= due:
                return
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_at(due, self._check)

    def _check(self) -> None:
        self.timer = None
        if self.transport is None or self.transport.is_closing() or self.discarding:
            return
        due = self._due()
        if due is None or asyncio.get_running_loop().time() < due:
            self._arm()
        elif self.write_paused:
            self.connections.refused(
                self.context.remote_ip, "replies left unread, connection dropped"
            )
            self.transport.abort()
        elif self.parsing is not None:
            part = "body" if self.parsing.body_from else "request line and headers"
            self._refuse(408, f"the request's {part} did not arrive in time")
        else:
            self.close()


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value.strip()
    return None
