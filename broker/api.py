"""HTTP API v1 of the broker (tornado handlers). docs/api.md is the reference for clients.

``BrokerServer`` (``broker.server``) mounts ``make_app(service)``; ``broker.client.BrokerClient``
is the provisioner's and the CLI's way in. Every handler authenticates in ``prepare`` (401 and
nothing changes), checks its input (400 naming the field and what is expected), and answers
JSON; errors are always ``{"error": {"code", "message"}}``, never a traceback. A user touching
another user's lease gets 403 (admins may touch any lease).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

import tornado.web

from broker import auth
from broker.auth import Identity
from broker.scheduler import Lease
from broker.server import BrokerService, LeaseRefused

log = logging.getLogger("broker.api")

MAX_WAIT = 60.0


class ApiError(Exception):
    """Raised by handlers; rendered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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
        self.set_status(status)
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            status, code, message = exc.status, exc.code, exc.message
        elif isinstance(exc, tornado.web.HTTPError):
            status = exc.status_code
            code = _HTTP_CODES.get(status, "http_error")
            message = exc.log_message or self._reason
            if status == 405:
                message = f"method {self.request.method} is not allowed on {self.request.path}"
        else:
            status, code, message = 500, "internal", "internal error in the broker (see its log)"
        self.set_status(status)
        self.finish(json.dumps({"error": {"code": code, "message": message}}))

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

    def owned_lease(self, lease_id: str) -> Lease:
        lease = self.service.lease(lease_id)
        if lease is None:
            raise ApiError(404, "not_found", f"no lease {lease_id!r}")
        if lease.user != self.identity.user and not self.identity.is_admin:
            raise ApiError(403, "forbidden", f"lease {lease_id!r} belongs to another user")
        return lease

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
        lease_id = uuid.uuid4().hex[:20]
        try:
            lease = self.service.request_lease(lease_id, self.identity.user, kind, kernel_id)
        except LeaseRefused as exc:
            raise ApiError(400, "unknown_kind", exc.message) from None
        self.set_header("Location", f"/api/v1/leases/{lease.id}")
        self.send(201 if lease.state == "granted" else 202, self.lease_json(lease))


class LeaseHandler(BaseHandler):
    """GET (optionally long-polling) and DELETE (release) one lease."""

    async def get(self, lease_id: str) -> None:
        lease = self.owned_lease(lease_id)
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
        lease = self.owned_lease(lease_id)
        lease = self.service.release(lease_id) or lease
        self.send(200, self.lease_json(lease))


class HeartbeatHandler(BaseHandler):
    """POST /api/v1/leases/{id}/heartbeat: the lease is alive; report busy and last activity."""

    def post(self, lease_id: str) -> None:
        body = self.json_body()
        busy = _field(body, "busy", bool, "true or false", required=False) or False
        last_activity = None
        if body.get("last_activity") is not None:
            last_activity = _field(body, "last_activity", float, "unix seconds (a number) or null")
        self.owned_lease(lease_id)
        lease = self.service.heartbeat(lease_id, busy, last_activity)
        assert lease is not None
        self.send(200, {"lease": self.lease_json(lease), "orders": []})


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
    args = {"service": service}
    return tornado.web.Application(
        [
            (r"/api/v1/leases", LeasesHandler, args),
            (r"/api/v1/leases/([^/]+)", LeaseHandler, args),
            (r"/api/v1/leases/([^/]+)/heartbeat", HeartbeatHandler, args),
            (r"/api/v1/status", StatusHandler, args),
            (r"/api/v1/whoami", WhoamiHandler, args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=_log_request,
    )


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without query strings or headers (nothing secret in logs)."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.INFO
    log.log(
        level,
        "%d %s %s %.1fms",
        status,
        handler.request.method,
        handler.request.path,
        1000 * handler.request.request_time(),
    )


# -- JSON views ------------------------------------------------------------------------------


def slot_json(service: BrokerService, slot_id: str | None) -> dict[str, Any] | None:
    if slot_id is None:
        return None
    try:
        slot = service.config.slot(slot_id)
    except KeyError:
        return {"id": slot_id, "host": None, "kind": None, "device": None, "simulated": None}
    return {
        "id": slot.id,
        "host": slot.host,
        "kind": slot.kind,
        "device": slot.device,
        "simulated": slot.simulated,
    }


def host_json(service: BrokerService, lease: Lease) -> dict[str, Any] | None:
    """The SSH target for a granted lease; "{username}" filled in, "~" left for the client."""
    if lease.state != "granted" or lease.slot_id is None:
        return None
    host = service.config.host(service.config.slot(lease.slot_id).host)
    fill = lambda value: None if value is None else value.replace("{username}", lease.user)  # noqa: E731
    return {
        "name": host.name,
        "address": host.address,
        "port": host.port,
        "user": host.ssh_user(lease.user),
        "key_file": fill(host.key_file),
        "known_hosts": fill(host.known_hosts),
        "python": host.python,
    }


def lease_json(service: BrokerService, lease: Lease) -> dict[str, Any]:
    policy = service.config.policy
    return {
        "id": lease.id,
        "user": lease.user,
        "kind": lease.kind,
        "kernel_id": lease.kernel_id,
        "state": lease.state,
        "position": service.scheduler.position(lease.id) if lease.state == "queued" else None,
        "queue_length": service.scheduler.queue_length,
        "slot": slot_json(service, lease.slot_id),
        "host": host_json(service, lease),
        "heartbeat_interval": policy.heartbeat_interval,
        "heartbeat_timeout": policy.heartbeat_timeout,
        "created_at": lease.created_at,
        "granted_at": lease.granted_at,
        "last_heartbeat": lease.last_heartbeat,
        "busy": lease.busy,
        "last_activity": lease.last_activity,
        "ended_at": lease.ended_at,
        "end_reason": lease.end_reason,
    }


def status_json(service: BrokerService, who: Identity) -> dict[str, Any]:
    """The pool as ``who`` may see it: other users' names and lease ids only for admins."""
    scheduler = service.scheduler

    def visible(lease: Lease) -> bool:
        return who.is_admin or lease.user == who.user

    hosts = []
    for host in service.config.hosts:
        entry: dict[str, Any] = {
            "name": host.name,
            "drained": host.drained,
            "slots": [slot.id for slot in host.slots],
        }
        if who.is_admin:
            entry.update(address=host.address, port=host.port)
        hosts.append(entry)
    slots = []
    for slot in scheduler.slots():
        entry = slot_json(service, slot.id) or {}
        lease = scheduler.lease(slot.lease_id) if slot.lease_id else None
        state = "busy" if lease else ("drained" if slot.drained else "free")
        entry.update(state=state, drained=slot.drained, lease=None)
        if lease is not None:
            entry["lease"] = {
                "id": lease.id if visible(lease) else None,
                "user": lease.user if visible(lease) else None,
                "mine": lease.user == who.user,
                "granted_at": lease.granted_at,
                "last_heartbeat": lease.last_heartbeat,
                "busy": lease.busy,
                "last_activity": lease.last_activity,
            }
        slots.append(entry)
    queue = []
    for position, lease in enumerate(scheduler.queue(), start=1):
        queue.append(
            {
                "position": position,
                "kind": lease.kind,
                "created_at": lease.created_at,
                "mine": lease.user == who.user,
                "id": lease.id if visible(lease) else None,
                "user": lease.user if visible(lease) else None,
            }
        )
    leases = [lease_json(service, lease) for lease in scheduler.leases() if visible(lease)]
    return {
        "now": service.clock(),
        "user": who.user,
        "role": who.role,
        "hosts": hosts,
        "slots": slots,
        "leases": leases,
        "queue": queue,
    }
