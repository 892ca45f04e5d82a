"""The broker's HTTP/1.1 server: httptools (llhttp, C) parses requests on an asyncio protocol,
and each request goes to a tornado delegate (``ApiRouter`` or a ``tornado.web.Application``)
through ``Exchange``, a ``tornado.httputil.HTTPConnection`` that writes to the socket.
``BrokerServer`` makes one ``Connections`` per server and one ``HttpProtocol`` per connection.

Why not ``tornado.httpserver.HTTPServer``: its pure-Python header parsing and stream machinery
cost the broker's loop about as much CPU per request as everything else it does together, and
it has no connection cap, no header timeout of its own and no bound on what it reads ahead
(docs/internals.md has the measurements). The handlers, routing and errors stay tornado's.

What a client can rely on: keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked); pipelined
requests answered in order, one at a time per connection; ``Expect: 100-continue``; chunked
request bodies. What no client can do, each limit answered with a JSON error before the
connection closes (the constants below; docs/internals.md states the memory bound):

- open more than ``MAX_CONNECTIONS`` connections, or ``MAX_CONNECTIONS_PER_ADDRESS`` from one
  address (503);
- grow the broker's memory by not reading its replies: a connection whose unsent replies pass
  ``WRITE_HIGH_WATER`` is neither answered nor read until they drain, and is dropped when they
  do not drain within ``SEND_TIMEOUT``; at most ``MAX_QUEUED`` requests are read ahead, and more
  than ``MAX_PIPELINED`` in one go are refused (429);
- hold a connection by sending slowly: a request's line and headers must arrive within
  ``HEADER_TIMEOUT`` of its first byte, its body within ``BODY_TIMEOUT`` plus one second per
  ``BODY_MIN_RATE`` bytes (408); a connection with nothing in flight closes after
  ``IDLE_TIMEOUT``;
- send oversized or malformed requests: over ``MAX_HEADER_BYTES`` of headers (431), over
  ``MAX_BODY_BYTES`` of body (413), anything llhttp refuses (400);
- make the broker hold more than ``REQUEST_ALLOWANCE`` bytes of its requests per connection
  beyond a ``READ_BUDGET`` that all connections share: a connection that needs more is not read
  until others' requests are answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import httptools
from tornado import httputil
from tornado.concurrent import Future

from broker.calls import INTERNAL_ERROR, JSON_HEADERS, ApiError

log = logging.getLogger("broker.api")

__all__ = ["MAX_BODY_BYTES", "MAX_CONNECTIONS", "MAX_HEADER_BYTES", "Connections", "HttpProtocol"]

MAX_HEADER_BYTES = 64 * 1024  # request line and headers together
MAX_BODY_BYTES = 1024 * 1024  # every API body is a small JSON object
MAX_CONNECTIONS = 16_384  # 10,000 kernels keep one connection each for their heartbeats
MAX_CONNECTIONS_PER_ADDRESS = 4_096  # a Jupyter host's kernels share its address
HEADER_TIMEOUT = 5.0  # from a request's first byte to the end of its headers
BODY_TIMEOUT = 10.0  # from the end of the headers to the end of the body, plus ...
BODY_MIN_RATE = 8 * 1024  # ... one second per this many bytes of body received
IDLE_TIMEOUT = 60.0  # a connection with no request in flight (heartbeats come every 10-15 s)
SEND_TIMEOUT = 60.0  # replies over WRITE_HIGH_WATER the client does not read
WRITE_HIGH_WATER = 16 * 1024  # unsent reply bytes that stop a connection being answered/read
WRITE_LOW_WATER = 4 * 1024  # ... until they drain below this
MAX_QUEUED = 16  # pipelined requests read ahead before reading pauses
MAX_PIPELINED = 128  # requests waiting in one connection at most (one read's worth); 429 past it
READ_SIZE = 4 * 1024  # bytes taken off a socket at a time
REQUEST_ALLOWANCE = 8 * 1024  # request bytes each connection may hold without the budget
READ_BUDGET = 64 * 1024 * 1024  # request bytes over the allowances, all connections together
LINGER = 2.0  # seconds a refused request's connection drains before it closes
MAX_LINGERING = 256  # refused connections draining at once; past it they close at once
FD_RESERVE = 1024  # open files kept for the store, SSH to the hosts, logs
LOG_EVERY = 10.0  # seconds between two log lines about refusals (each line counts them)
REQUEST_OVERHEAD = 512  # bytes of Python objects per parsed request, on top of its bytes
HEADER_OVERHEAD = 160  # ... and per header

Router = Any  # anything with tornado's ``find_handler(request) -> HTTPMessageDelegate``

_CODES = {
    408: "request_timeout",
    413: "too_large",
    429: "too_many_pipelined",
    431: "headers_too_large",
    500: "internal",
    503: "too_many_connections",
}


class Connections:
    """The open connections of one ``BrokerServer``: the caps they are held to, the read budget
    and the read buffer they share, and the count of refusals for the log."""

    def __init__(self) -> None:
        self.open: set[HttpProtocol] = set()
        self.lingering: set[HttpProtocol] = set()  # refused, draining before the close
        self.per_address: dict[str, int] = {}
        self.spent = 0  # READ_BUDGET in use
        self.starved: dict[HttpProtocol, None] = {}  # waiting for budget, oldest first
        self.buffer = memoryview(bytearray(READ_SIZE))  # every read is consumed before the next
        self.fd_ceiling = _raise_open_files_limit()
        self.refusals = 0
        self.last_log = -LOG_EVERY

    def __iter__(self) -> Iterator[HttpProtocol]:
        return iter([*self.open, *self.lingering])

    def __len__(self) -> int:
        return len(self.open)

    def admit(self, protocol: HttpProtocol) -> str | None:
        """Count ``protocol`` in, or say why it may not be (then it is not counted)."""
        address = protocol.context.remote_ip
        cap = min(MAX_CONNECTIONS, self.fd_ceiling)
        if len(self.open) >= cap:
            return f"the broker has {len(self.open)} connections open, its limit; try again later"
        mine = self.per_address.get(address, 0)
        if mine >= MAX_CONNECTIONS_PER_ADDRESS:
            return (
                f"{address} has {mine} connections open, the limit for one address; "
                "close idle ones or try again later"
            )
        self.open.add(protocol)
        self.per_address[address] = mine + 1
        return None

    def forget(self, protocol: HttpProtocol) -> None:
        """``protocol``'s connection is gone: it counts no more and gives its budget back."""
        self.lingering.discard(protocol)
        if protocol in self.open:
            self.open.discard(protocol)
            address = protocol.context.remote_ip
            left = self.per_address.pop(address, 1) - 1
            if left > 0:
                self.per_address[address] = left
        self.starved.pop(protocol, None)
        self.settle(protocol, 0)

    def settle(self, protocol: HttpProtocol, held: int) -> bool:
        """``protocol`` holds ``held`` bytes of requests now: draw what is over its allowance
        from the budget; False if the budget is spent (it is read again after ``fed()``)."""
        over = held - REQUEST_ALLOWANCE if held > REQUEST_ALLOWANCE else 0
        if over != protocol.drawn:
            shrunk = over < protocol.drawn
            self.spent += over - protocol.drawn
            protocol.drawn = over
            if shrunk and self.starved and self.spent < READ_BUDGET:
                self._wake()
        if over and self.spent > READ_BUDGET:
            self.starved[protocol] = None
            return False
        return True

    def _wake(self) -> None:
        """Read again from the connections that waited longest, one read's worth each while
        the budget lasts."""
        room = (READ_BUDGET - self.spent) // READ_SIZE + 1
        while self.starved and room > 0:
            protocol = next(iter(self.starved))
            del self.starved[protocol]
            protocol.fed()
            room -= 1

    def refused(self, address: str, what: str) -> None:
        """Log a refusal: the first of every ``LOG_EVERY`` seconds, with the count before it."""
        self.refusals += 1
        now = asyncio.get_running_loop().time()
        if now - self.last_log >= LOG_EVERY:
            more = self.refusals - 1
            log.info(
                "%s: %s%s", address, what, f" ({more} more since the last line)" if more else ""
            )
            self.last_log, self.refusals = now, 0


def _raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to what ``MAX_CONNECTIONS`` needs (as far
    as the hard limit allows); return how many connections the limit leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = MAX_LINGERING + FD_RESERVE
    want = MAX_CONNECTIONS + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    if soft < want:
        log.warning(
            "open files limit %d (hard %d) leaves room for %d connections, not %d: raise it "
            "(systemd: LimitNOFILE=%d; shell: ulimit -n %d)",
            soft,
            hard,
            max(soft - spare, 0),
            MAX_CONNECTIONS,
            want,
            want,
        )
    return max(soft - spare, 0)


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
        self.size = REQUEST_OVERHEAD  # what it holds, for the budget


class HttpProtocol(asyncio.BufferedProtocol):
    """One client connection. ``router`` gives each request its tornado delegate."""

    def __init__(self, router: Router, connections: Connections) -> None:
        self.router = router
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request] = deque()
        self.current: Exchange | None = None  # the request being answered
        self.parsing: _Request | None = None
        self.held = 0  # bytes of requests read and not yet answered
        self.drawn = 0  # of which drawn from the read budget
        self.context = _Context("")
        self.timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        self.stuck_since = 0.0  # when the unsent replies went over the high-water mark
        self.reading = True
        self.write_paused = False
        self.starved = False  # waiting for the read budget
        self.discarding = False  # a refused request: read and drop until the close
        self.refusal: tuple[int, str] | None = None  # to send once ``current`` is answered

    # -- asyncio --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.context = _Context(str(peer[0]) if isinstance(peer, tuple) else "")
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
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
        if self.transport is None or self.transport.is_closing() or self.discarding:
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
        if self.held > REQUEST_ALLOWANCE or self.drawn:
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
        if len(self.queue) >= MAX_PIPELINED:
            raise _Refused(
                429, f"over {MAX_PIPELINED} requests sent ahead of their replies; read the replies"
            )
        self.parsing = _Request(asyncio.get_running_loop().time())
        self.held += REQUEST_OVERHEAD
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url), len(url))
        self.parsing.url += url  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._count_head(size + 4, size + HEADER_OVERHEAD)
        self.parsing.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None and self.transport is not None
        request.body_from = asyncio.get_running_loop().time()
        request.method = self.parser.get_method().decode("ascii")
        request.version = f"HTTP/{self.parser.get_http_version()}"
        request.keep_alive = self.parser.should_keep_alive()
        length = _header(request.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _Refused(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        if (_header(request.headers, b"expect") or b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length != b"0":  # a body may follow: its time limit may end before the head's
            self._arm()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.body_bytes += len(body)
        if request.body_bytes > MAX_BODY_BYTES:
            raise _Refused(413, f"the request body is over {MAX_BODY_BYTES} bytes")
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
        if request.head_bytes > MAX_HEADER_BYTES:
            raise _Refused(431, f"the request line and headers are over {MAX_HEADER_BYTES} bytes")

    def _flow(self) -> None:
        """Read from the socket only while the client reads its replies, few requests wait,
        and the read budget has room (or the connection is being drained before its close)."""
        assert self.transport is not None
        want = self.discarding or not (
            self.write_paused or self.starved or len(self.queue) >= MAX_QUEUED
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
        if self not in self.connections.open and len(lingering) >= MAX_LINGERING:
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
        self.timer = asyncio.get_running_loop().call_later(LINGER, self.transport.abort)

    # -- timeouts --------------------------------------------------------------------------------

    def _due(self) -> float | None:
        """When this connection's next time limit runs out (loop time), None if none runs."""
        due: float | None = None
        if self.write_paused:
            due = self.stuck_since + SEND_TIMEOUT
        request = self.parsing
        if request is not None:
            if request.body_from:
                limit = request.body_from + BODY_TIMEOUT + request.body_bytes / BODY_MIN_RATE
            else:
                limit = request.started + HEADER_TIMEOUT
            due = limit if due is None else min(due, limit)
        elif self.current is None and not self.queue and not self.write_paused:
            due = self.idle_since + IDLE_TIMEOUT
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
