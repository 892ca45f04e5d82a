"""HTTP API v1 of the broker (tornado handlers). docs/api.md is the reference for clients.

``BrokerServer`` (``broker.daemon``) serves ``make_router(service)``: the hot lease calls go to
``broker.http.routes``, the rest to ``make_app(service)``; both run the rules of
``broker.http.calls``. ``broker.client.BrokerClient`` is the provisioner's and the CLI's way in.
Every handler authenticates in ``prepare`` (401 and nothing changes), checks its input (400 naming
the field and what is expected), and answers JSON; errors are always ``{"error": {"code",
"message"}}``, never a traceback. A user touching another user's lease gets 403 (admins may touch
any lease; teachers may read their students'). Admin, checkpoint, usage and metrics endpoints live
in ``broker.http.admin``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import tornado.web

from broker.core.leases import Lease
from broker.http import calls
from broker.http.auth import Identity
from broker.http.calls import (
    INTERNAL_ERROR,
    JSON_HEADERS,
    ApiError,
    Call,
    Reply,
    authenticate,
    bearer,
    hub_failure,
)
from broker.http.hub_identity import HubIdentities, look_up
from broker.http.routes import log_access
from broker.http.views import lease_json, status_json
from broker.service.service import BrokerService

log = logging.getLogger("broker.api")

MAX_WAIT = 60.0


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}


class BaseHandler(tornado.web.RequestHandler):
    """Authentication, JSON in and out, errors as JSON."""

    service: BrokerService
    identity: Identity
    hub: HubIdentities | None = None
    fresh_groups = False  # True: the hub's groups as of this request (lease requests)

    def initialize(self, service: BrokerService, hub: HubIdentities | None = None) -> None:
        self.service = service
        self.hub = hub

    def set_default_headers(self) -> None:
        for name, value in JSON_HEADERS.items():
            self.set_header(name, value)

    async def prepare(self) -> None:
        header = self.request.headers.get("Authorization", "")
        lookup = look_up(self.hub, bearer(header), self.fresh_groups)
        if lookup.wait is not None:
            try:
                lookup.user = await lookup.wait
            except Exception as exc:
                raise hub_failure(exc) from None
        self.identity = authenticate(self.service, header, self.hub, lookup)

    def call(self) -> Call:
        return Call(self.service, self.identity, self.request.body)

    def send(self, status: int, body: dict[str, Any]) -> None:
        """Reply once everything written so far is on disk (``broker.store.group_commit``)."""
        self.set_status(status)
        payload = json.dumps(body)
        pending = self.service.store.durable_future()
        if pending is None:
            self.finish(payload)
            return
        self._auto_finish = False
        pending.add_done_callback(lambda _: self.finish(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        extra: dict[str, Any] = {}
        if isinstance(exc, ApiError):
            status, code, message, extra = exc.status, exc.code, exc.message, exc.extra
        elif isinstance(exc, tornado.web.HTTPError):
            status = exc.status_code
            code = _HTTP_CODES.get(status, "http_error")
            message = exc.log_message or self._reason
            if status == 405:
                message = f"method {self.request.method} is not allowed on {self.request.path}"
        else:
            status, code, message = 500, "internal", INTERNAL_ERROR
        self.clear_header("Location")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_status(status)
        self.finish(json.dumps({"error": {"code": code, "message": message, **extra}}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError | tornado.web.HTTPError):
            return  # expected: the client got a clear JSON error
        super().log_exception(typ, value, tb)

    def reply(self, reply: Reply) -> None:
        for name, value in reply.headers.items():
            self.set_header(name, value)
        self.send(reply.status, reply.body)

    # -- input (``broker.http.calls.Call`` holds the rules) ------------------------------------

    def json_body(self) -> dict[str, Any]:
        return self.call().json_body()

    def owned_lease(self, lease_id: str, act: bool = True) -> Lease:
        return self.call().owned_lease(lease_id, act)

    def may_see(self, user: str) -> bool:
        return self.call().may_see(user)

    def require_role(self, *roles: str) -> None:
        self.call().require_role(*roles)

    def lease_json(self, lease: Lease) -> dict[str, Any]:
        return lease_json(self.service, lease)


class LeasesHandler(BaseHandler):
    """POST /api/v1/leases: ask for a slot (``broker.http.routes`` serves it in the broker)."""

    fresh_groups = True

    def post(self) -> None:
        self.reply(calls.request_lease(self.call()))


class LeaseHandler(BaseHandler):
    """GET (optionally long-polling) and DELETE (release) one lease."""

    async def get(self, lease_id: str) -> None:
        lease = self.owned_lease(lease_id, act=False)
        raw = self.get_query_argument("wait", "0")
        try:
            wait = float(raw)
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait) or wait < 0:
            raise ApiError(400, "bad_request", f"query 'wait': expected seconds >= 0, got {raw!r}")
        wait = min(wait, MAX_WAIT)
        if wait > 0 and lease.state == "queued":
            await self.service.wait_for_change(lease_id, wait)
            lease = self.service.lease(lease_id) or lease
        self.send(200, self.lease_json(lease))

    def delete(self, lease_id: str) -> None:
        self.reply(calls.release_lease(self.call(), lease_id))


class HeartbeatHandler(BaseHandler):
    """POST /api/v1/leases/{id}/heartbeat: the lease is alive; report busy and last activity."""

    def post(self, lease_id: str) -> None:
        self.reply(calls.heartbeat(self.call(), lease_id))


class StatusHandler(BaseHandler):
    """GET /api/v1/status: the pool. Users see every slot but only their own leases' details."""

    def get(self) -> None:
        self.send(200, status_json(self.service, self.identity))


class WhoamiHandler(BaseHandler):
    def get(self) -> None:
        self.send(200, {"user": self.identity.user, "role": self.identity.role})


class NotFoundHandler(BaseHandler):
    async def prepare(self) -> None:
        await super().prepare()
        raise ApiError(404, "not_found", f"no such endpoint: {self.request.path}")


def log_request(handler: tornado.web.RequestHandler) -> None:
    log_access(handler.get_status(), handler.request)
