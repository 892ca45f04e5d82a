"""HTTP API v1 of the broker (tornado handlers). docs/api.md is the reference for clients.

``BrokerServer`` (``broker.server``) mounts ``make_app(service)``; ``broker.client.BrokerClient``
is the provisioner's and the CLI's way in. Every handler authenticates in ``prepare`` (401 and
nothing changes), checks its input (400 naming the field and what is expected), and answers
JSON; errors are always ``{"error": {"code", "message"}}``, never a traceback. A user touching
another user's lease gets 403 (admins may touch any lease; teachers may read their students').
Admin, checkpoint, usage and metrics endpoints live in ``broker.admin``.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

import tornado.web

from broker import auth
from broker.auth import Identity, may_act, may_see
from broker.host_records import CheckpointRow
from broker.leases import Lease
from broker.service import BrokerService, LeaseRefused
from broker.views import checkpoint_json, host_json, lease_json, slot_json, status_json

__all__ = [
    "ApiError",
    "BaseHandler",
    "checkpoint_json",
    "host_json",
    "lease_json",
    "make_app",
    "slot_json",
    "status_json",
]

log = logging.getLogger("broker.api")

MAX_WAIT = 60.0


class ApiError(Exception):
    """Raised by handlers; rendered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra  # more keys of the error object (e.g. "issues" of a bad config)


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

    def initialize(self, service: BrokerService) -> None:
        self.service = service

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        identity = None
        if scheme.lower() == "bearer":
            identity = auth.verify(self.service.store, token.strip())
        if identity is None:
            reason = "missing" if not header else "not valid (unknown, revoked or malformed)"
            raise ApiError(
                401,
                "unauthorized",
                f"the bearer token is {reason}: send 'Authorization: Bearer "
                "sgpu_...' with a token from `gpu-broker token create`",
            )
        self.identity = identity

    def send(self, status: int, body: dict[str, Any]) -> None:
        """Reply once everything written so far is on disk (group commit, ``Store.flush``)."""
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
            status, code, message = 500, "internal", "internal error in the broker (see its log)"
        self.clear_header("Location")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_status(status)
        self.finish(json.dumps({"error": {"code": code, "message": message, **extra}}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError | tornado.web.HTTPError):
            return  # expected: the client got a clear JSON error
        super().log_exception(typ, value, tb)

    # -- input --------------------------------------------------------------------------------

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_json", f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the request body must be a JSON object")
        return body

    def owned_lease(self, lease_id: str, act: bool = True) -> Lease:
        """The lease, if the caller may act on it (``act``) or read it; else 404/403."""
        lease = self.service.lease(lease_id)
        if lease is None:
            raise ApiError(404, "not_found", f"no lease {lease_id!r}")
        allowed = may_act(self.identity, lease.user) if act else self.may_see(lease.user)
        if not allowed:
            raise ApiError(403, "forbidden", f"lease {lease_id!r} belongs to another user")
        return lease

    def may_see(self, user: str) -> bool:
        return may_see(self.service.config, self.identity, user)

    def require_role(self, *roles: str) -> None:
        if self.identity.role not in roles:
            need = " or ".join(roles)
            raise ApiError(403, "forbidden", f"this needs a token with role {need}")

    def lease_json(self, lease: Lease) -> dict[str, Any]:
        return lease_json(self.service, lease)


def _field(body: dict, name: str, kind: type, expected: str, required: bool = True) -> Any:
    if name not in body:
        if required:
            raise ApiError(400, "bad_request", f"missing field {name!r}: expected {expected}")
        return None
    value = body[name]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    if not ok:
        raise ApiError(
            400, "bad_request", f"field {name!r}: expected {expected}, got {json.dumps(value)}"
        )
    return value


class LeasesHandler(BaseHandler):
    """POST /api/v1/leases: ask for a slot."""

    def post(self) -> None:
        body = self.json_body()
        kind = _field(body, "kind", str, 'a string: "any" or a slot kind such as "a100"')
        kernel_id = _field(body, "kernel_id", str, "a string: Jupyter's kernel id")
        if not kind.strip() or len(kind) > 64:
            raise ApiError(400, "bad_request", "field 'kind': expected 1 to 64 characters")
        if len(kernel_id) > 256:
            raise ApiError(400, "bad_request", "field 'kernel_id': expected at most 256 characters")
        resume_from = _field(body, "resume_from", str, "a kernel id or null", required=False)
        prefer_host = None
        if resume_from:
            row = self.service.store.checkpoint(resume_from)
            if row is not None and row.user == self.identity.user and row.state == "kept":
                prefer_host = row.host
        lease_id = uuid.uuid4().hex[:20]
        try:
            lease = self.service.request_lease(
                lease_id, self.identity.user, kind, kernel_id, prefer_host=prefer_host
            )
        except LeaseRefused as exc:
            raise ApiError(400, "unknown_kind", exc.message) from None
        self.set_header("Location", f"/api/v1/leases/{lease.id}")
        self.send(201 if lease.state == "granted" else 202, self.lease_json(lease))


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
        body = self.json_body()
        reason = _field(body, "reason", str, '"released" or "suspended"', required=False)
        reason = reason or "released"
        if reason not in ("released", "suspended"):
            raise ApiError(
                400,
                "bad_request",
                f'field \'reason\': expected "released" or "suspended", got {json.dumps(reason)}',
            )
        raw = body.get("checkpoint")
        if raw is not None and reason != "suspended":
            raise ApiError(400, "bad_request", "field 'checkpoint': only with reason 'suspended'")
        lease = self.owned_lease(lease_id)
        checkpoint = None
        if raw is not None:
            checkpoint = self.checkpoint_row(raw, lease)
        if lease.state not in ("queued", "granted"):
            checkpoint = None  # an ended lease is returned as it is (idempotent)
        lease = self.service.release(lease_id, reason, checkpoint) or lease
        self.send(200, self.lease_json(lease))

    def checkpoint_row(self, raw: Any, lease: Lease) -> CheckpointRow:
        if not isinstance(raw, dict):
            raise ApiError(
                400,
                "bad_request",
                'field \'checkpoint\': expected an object {"host", "path", "bytes", "kernel_id"}',
            )
        host = _field(raw, "host", str, "the host's name in the broker config")
        path = _field(raw, "path", str, "the checkpoint's path on that host")
        size = _field(raw, "bytes", int, "the checkpoint's size in bytes (an integer)")
        kernel_id = _field(raw, "kernel_id", str, "Jupyter's kernel id", required=False)
        kernel_id = kernel_id or lease.kernel_id
        if host not in {h.name for h in self.service.config.hosts}:
            raise ApiError(400, "bad_request", f"field 'checkpoint.host': no host {host!r}")
        if not path or len(path) > 4096 or "\x00" in path:
            raise ApiError(400, "bad_request", "field 'checkpoint.path': 1 to 4096 characters")
        if size < 0 or size > 2**62:
            raise ApiError(400, "bad_request", "field 'checkpoint.bytes': expected >= 0")
        if not kernel_id or len(kernel_id) > 256:
            raise ApiError(400, "bad_request", "field 'checkpoint.kernel_id': 1 to 256 characters")
        return CheckpointRow(
            kernel_id=kernel_id,
            user=lease.user,
            host=host,
            path=path,
            bytes=size,
            created_at=self.service.clock(),
            lease_id=lease.id,
        )


class HeartbeatHandler(BaseHandler):
    """POST /api/v1/leases/{id}/heartbeat: the lease is alive; report busy and last activity."""

    def post(self, lease_id: str) -> None:
        body = self.json_body()
        busy = _field(body, "busy", bool, "true or false", required=False) or False
        last_activity = None
        if body.get("last_activity") is not None:
            last_activity = _field(body, "last_activity", float, "unix seconds (a number) or null")
        self.owned_lease(lease_id)
        lease, orders = self.service.heartbeat(lease_id, busy, last_activity)
        assert lease is not None
        self.send(200, {"lease": self.lease_json(lease), "orders": orders})


class StatusHandler(BaseHandler):
    """GET /api/v1/status: the pool. Users see every slot but only their own leases' details."""

    def get(self) -> None:
        self.send(200, status_json(self.service, self.identity))


class WhoamiHandler(BaseHandler):
    def get(self) -> None:
        self.send(200, {"user": self.identity.user, "role": self.identity.role})


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "not_found", f"no such endpoint: {self.request.path}")


def make_app(service: BrokerService) -> tornado.web.Application:
    from broker.admin import routes as admin_routes  # admin builds on this module

    args = {"service": service}
    return tornado.web.Application(
        [
            (r"/api/v1/leases", LeasesHandler, args),
            (r"/api/v1/leases/([^/]+)", LeaseHandler, args),
            (r"/api/v1/leases/([^/]+)/heartbeat", HeartbeatHandler, args),
            (r"/api/v1/status", StatusHandler, args),
            (r"/api/v1/whoami", WhoamiHandler, args),
            *admin_routes(args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=_log_request,
    )


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without query strings or headers (nothing secret in logs)."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.INFO
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        "%d %s %s %.1fms",
        status,
        handler.request.method,
        handler.request.path,
        1000 * handler.request.request_time(),
    )
