"""The broker's HTTP front: the hot lease calls served straight on tornado's HTTP connection,
everything else through the ``tornado.web`` application of ``broker.http.handlers``.

Every kernel start, stop and heartbeat is one of three calls: POST /api/v1/leases, DELETE
/api/v1/leases/{id}, POST /api/v1/leases/{id}/heartbeat. ``tornado.web.RequestHandler`` costs
about as much CPU per request as all the broker's own work for these (header objects, transforms,
UI namespaces, its finish machinery), so ``ApiRouter`` hands them to ``LeaseCall``, which runs the
same rules (``broker.http.calls``) and writes the reply itself. Other methods and paths, wrong ones
included, go to the application, so 404s and 405s read as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from email.utils import formatdate

import tornado.iostream
import tornado.routing
import tornado.web
from tornado import httputil
from tornado.escape import url_unescape

from broker.http import calls
from broker.http.calls import INTERNAL_ERROR, JSON_HEADERS, ApiError, Call, Reply
from broker.http.hub_identity import HubIdentities, Lookup, look_up
from broker.service.service import BrokerService

__all__ = ["ApiRouter", "LeaseCall", "log_access"]

log = logging.getLogger("broker.api")

Endpoint = Callable[..., Reply]

_HOT: tuple[tuple[str, re.Pattern[str], Endpoint], ...] = (
    ("POST", re.compile(r"/api/v1/leases$"), calls.request_lease),
    ("DELETE", re.compile(r"/api/v1/leases/([^/]+)$"), calls.release_lease),
    ("POST", re.compile(r"/api/v1/leases/([^/]+)/heartbeat$"), calls.heartbeat),
)


class ApiRouter(tornado.routing.Router):
    """What ``BrokerServer`` serves: ``LeaseCall`` for the hot calls, ``app`` for the rest."""

    def __init__(
        self,
        service: BrokerService,
        app: tornado.web.Application,
        hub: HubIdentities | None = None,
    ) -> None:
        self.service = service
        self.app = app
        self.hub = hub

    def find_handler(
        self, request: httputil.HTTPServerRequest, **kwargs: object
    ) -> httputil.HTTPMessageDelegate | None:
        if self.hub is not None and self.hub.enabled:
            strip_service_prefix(request, self.hub.config.service_prefix)
        for method, pattern, endpoint in _HOT:
            if request.method == method:
                match = pattern.match(request.path)
                if match is not None:
                    return LeaseCall(self.service, request, endpoint, match.groups(), self.hub)
        return self.app.find_handler(request, **kwargs)


class LeaseCall(httputil.HTTPMessageDelegate):
    """One hot call: read the body, ask the hub if the token needs it (a cache miss, or a lease
    request's fresh classes), run the endpoint (once no COMMIT runs), answer once its writes are
    on disk."""

    def __init__(
        self,
        service: BrokerService,
        request: httputil.HTTPServerRequest,
        endpoint: Endpoint,
        raw_args: tuple[str, ...],
        hub: HubIdentities | None = None,
    ) -> None:
        self.service = service
        self.request = request
        self.endpoint = endpoint
        self.raw_args = raw_args
        self.hub = hub
        self.lookup: Lookup | None = None
        self.failure: ApiError | None = None
        self.chunks: list[bytes] = []

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.request.body = b"".join(self.chunks)
        if self.hub is not None:
            header = self.request.headers.get("Authorization", "")
            fresh = self.endpoint is calls.request_lease
            self.lookup = look_up(self.hub, calls.bearer(header), fresh)
            if self.lookup.wait is not None:
                asyncio.ensure_future(self.lookup.wait).add_done_callback(self._looked_up)
                return
        self._when_idle()

    def _looked_up(self, future: asyncio.Future) -> None:
        assert self.lookup is not None
        exc = future.exception()
        if exc is not None:
            self.failure = calls.hub_failure(exc)
            if self.failure.status == 500:
                log.error("hub lookup failed", exc_info=exc)
        else:
            self.lookup.user = future.result()
        self._when_idle()

    def _when_idle(self) -> None:
        if not self.service.store.when_idle(self._answer):
            self._answer()  # else after the COMMIT in flight: the loop serves others meanwhile

    def _answer(self) -> None:
        try:
            if self.failure is not None:
                raise self.failure
            reply = self._run()
        except ApiError as exc:
            reply = Reply(exc.status, exc.body())
        except Exception:
            log.exception("%s %s failed", self.request.method, self.request.path)
            reply = Reply(500, ApiError(500, "internal", INTERNAL_ERROR).body())
        pending = self.service.store.durable_future()
        if pending is None:
            self._write(reply)
        else:
            pending.add_done_callback(lambda _: self._write(reply))

    def on_connection_close(self) -> None:
        pass  # the reply, if any, is dropped by the connection

    def _run(self) -> Reply:
        args = [_path_arg(raw) for raw in self.raw_args]
        header = self.request.headers.get("Authorization", "")
        identity = calls.authenticate(self.service, header, self.hub, self.lookup)
        return self.endpoint(Call(self.service, identity, self.request.body), *args)

    def _write(self, reply: Reply) -> None:
        payload = json.dumps(reply.body).encode()
        headers = httputil.HTTPHeaders(
            {
                **JSON_HEADERS,
                "Content-Length": str(len(payload)),
                "Date": _http_date(),
                **reply.headers,
            }
        )
        reason = httputil.responses.get(reply.status, "Unknown")
        start_line = httputil.ResponseStartLine("HTTP/1.1", reply.status, reason)
        connection = self.request.connection
        assert connection is not None
        try:
            connection.write_headers(start_line, headers, payload)
            connection.finish()
        except tornado.iostream.StreamClosedError:
            return  # the client left; the call's effect stands
        log_access(reply.status, self.request)


def strip_service_prefix(request: httputil.HTTPServerRequest, prefix: str) -> None:
    """Serve ``PREFIX/...`` as ``/...``: the hub's proxy routes ``/services/NAME/`` to the broker
    unchanged, so the API and the dashboard answer there too (``request.service_prefix`` keeps
    it for the dashboard's links; "" when the request came straight)."""
    path = request.path
    if path == prefix or path.startswith(prefix + "/"):
        request.path = path[len(prefix) :] or "/"
        request.uri = request.uri[len(prefix) :] or "/"
        request.service_prefix = prefix  # type: ignore[attr-defined]


def _path_arg(raw: str) -> str:
    """A path segment as tornado.web gives it to handlers: percent-decoded UTF-8, else 400."""
    value = url_unescape(raw, encoding=None, plus=False)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", f"Invalid unicode in url: {value[:40]!r}") from None


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def log_access(status: int, request: httputil.HTTPServerRequest) -> None:
    """The access log line of every call (this module's and ``broker.http.handlers``'s handlers'):
    no query strings, no headers, so nothing secret."""
    level = logging.DEBUG if status < 400 else logging.INFO
    if log.isEnabledFor(level):
        elapsed = 1000 * request.request_time()
        log.log(level, "%d %s %s %.1fms", status, request.method, request.path, elapsed)
