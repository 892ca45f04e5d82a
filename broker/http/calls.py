"""The lease endpoints' rules, apart from any HTTP machinery: authenticate a caller, check the
input, ask the service, say what to answer.

``broker.http.routes`` serves the hot lease calls (request, release, heartbeat) with these functions
straight on tornado's HTTP connection; the ``tornado.web`` handlers of ``broker.http.handlers`` and
``broker.http.admin`` use ``authenticate``, ``Call`` and ``ApiError`` for everything else. So both
paths give the same answers, the same errors and the same checks.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from broker.core.leases import Lease
from broker.http import auth
from broker.http.auth import Identity, may_act, may_see
from broker.http.hub_api import HubError, HubUnreachable, HubUser
from broker.http.hub_identity import HubIdentities, Lookup
from broker.http.views import lease_json
from broker.service.service import BrokerService, LeaseRefused, NotYours, RequestConflict
from broker.store.host_records import CheckpointRow
from gpu_kernel.protocol import KERNEL_ID_RE, USER_NAME_RE

JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"}
RELEASE_REASONS = ("released", "suspended", "kernel_may_run")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
INTERNAL_ERROR = "internal error in the broker (see its log)"


class ApiError(Exception):
    """Raised by endpoints; rendered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra  # more keys of the error object (e.g. "issues" of a bad config)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


@dataclass
class Reply:
    """What an endpoint answers: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def bearer(header: str) -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header (JupyterHub's ``token TOKEN``
    too), or ""."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() in ("bearer", "token") else ""


def authenticate(
    service: BrokerService,
    header: str,
    hub: HubIdentities | None = None,
    lookup: Lookup | None = None,
) -> Identity:
    """The caller behind an ``Authorization`` header; ApiError 401 (nothing changes) if none.
    With a hub, a token that is not a broker token is the hub's: ``lookup`` (from
    ``hub_identity.look_up``, awaited) has its user."""
    token = bearer(header)
    if hub is not None and hub.is_hub_token(token):
        return hub_identity(hub, lookup.user if lookup is not None else hub.cached(token)[1])
    identity = auth.verify(service.store, token) if token else None
    if identity is None:
        reason = "missing" if not header else "not valid (unknown, revoked or malformed)"
        raise ApiError(
            401,
            "unauthorized",
            f"the bearer token is {reason}: send 'Authorization: Bearer "
            "sgpu_...' with a token from `gpu-broker token create`",
        )
    if not USER_NAME_RE.fullmatch(identity.user):
        raise ApiError(
            403,
            "bad_user",
            f"this token's user name {identity.user[:40]!r} is not a POSIX login name, so it "
            "cannot own kernels: revoke it and create one for a login name "
            "(`gpu-broker token create --user NAME`)",
        )
    return identity


def hub_identity(hub: HubIdentities, user: HubUser | None) -> Identity:
    """The broker identity of a hub user; 401 for a token the hub does not know, 403 for one
    that may not use this service or a hub name that cannot be a broker user."""
    config = hub.config
    if user is None:
        raise ApiError(
            401,
            "unauthorized",
            f"JupyterHub at {config.url} does not know this token (expired, revoked, or not a "
            "user's): sign in to the hub again, or use a broker token",
        )
    if not hub.may_use_service(user):
        scope = f"access:services!service={config.service_name}"
        raise ApiError(
            403,
            "forbidden",
            f"this JupyterHub token of {user.name[:64]!r} may not use the service "
            f"{config.service_name!r}: it lacks the scope {scope}. Add the scope to "
            "c.Spawner.server_token_scopes and to the users' role in jupyterhub_config.py "
            "(docs/jupyterhub.md), then restart the user's server",
        )
    if not USER_NAME_RE.fullmatch(user.name):
        raise ApiError(
            403,
            "bad_user",
            f"JupyterHub user {user.name[:64]!r} cannot be a broker user: broker users own "
            "kernels and become Unix logins on the GPU hosts, so a name is 1 to 32 of A-Z "
            "a-z 0-9 _ . - starting with a letter or _. Have the hub's authenticator give "
            "login names (e.g. c.Authenticator.username_map, or an OAuth username_claim such "
            "as preferred_username instead of email); see docs/jupyterhub.md",
        )
    return Identity(user=user.name, role=hub.role_of(user), token_id="hub")


def hub_failure(exc: BaseException) -> ApiError:
    """The API's answer when the hub could not be asked: 503 while it is down, else 502."""
    if isinstance(exc, HubUnreachable):
        return ApiError(503, "hub_unreachable", f"{exc.message}: {exc.hint}")
    if isinstance(exc, HubError):
        message = f"{exc.message}: {exc.hint}" if exc.hint else exc.message
        return ApiError(502, "hub_error", message)
    return ApiError(500, "internal", INTERNAL_ERROR)


@dataclass
class Call:
    """One authenticated call: who asks, with which body, of which service."""

    service: BrokerService
    identity: Identity
    body: bytes = b""

    def json_body(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_json", f"the request body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "bad_json", "the request body must be a JSON object")
        return value

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


def kernel_id_of(body: dict, name: str, required: bool = True) -> str | None:
    """``body[name]`` if it is a kernel id the GPU hosts accept (a directory name there), else
    400 naming the field and the pattern."""
    value = field_of(body, name, str, "a kernel id (1-128 of A-Z a-z 0-9 - _)", required)
    if value is not None and not KERNEL_ID_RE.fullmatch(value):
        raise ApiError(
            400,
            "bad_request",
            f"field {name!r}: {json.dumps(value[:80])} is not a kernel id: use 1 to 128 "
            "characters of A-Z, a-z, 0-9, '-' and '_' (Jupyter's kernel ids are)",
        )
    return value


def field_of(body: dict, name: str, kind: type, expected: str, required: bool = True) -> Any:
    """``body[name]`` if it is a ``kind`` (bools are not ints; floats are finite), else 400."""
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


# -- the lease endpoints -----------------------------------------------------------------------


def request_lease(call: Call) -> Reply:
    """POST /api/v1/leases: ask for a slot (201 granted, 202 queued). With ``request_id`` a
    retry answers the lease the first try made (200 if it ended meanwhile)."""
    body = call.json_body()
    kind = field_of(body, "kind", str, 'a string: "any" or a slot kind such as "a100"')
    kernel_id = kernel_id_of(body, "kernel_id")
    assert kernel_id is not None
    if not kind.strip() or len(kind) > 64:
        raise ApiError(400, "bad_request", "field 'kind': expected 1 to 64 characters")
    resume_from = kernel_id_of(body, "resume_from", required=False)
    request_id = field_of(body, "request_id", str, "a string the client chose", required=False)
    if request_id is not None and not REQUEST_ID.fullmatch(request_id):
        raise ApiError(
            400, "bad_request", "field 'request_id': expected 1 to 64 of A-Z a-z 0-9 - _ ."
        )
    service, user = call.service, call.identity.user
    prefer_host = None
    if resume_from:
        owner = service.store.kernel_owner(resume_from)
        if owner is not None and owner != user:
            raise ApiError(403, "forbidden", f"kernel id {resume_from!r} belongs to another user")
        row = service.store.checkpoint(user, resume_from)
        if row is not None and row.state == "kept":
            prefer_host = row.host
    lease_id = uuid.uuid4().hex[:20]
    try:
        lease = service.request_lease(
            lease_id, user, kind, kernel_id, prefer_host=prefer_host, request_id=request_id
        )
    except LeaseRefused as exc:
        if exc.code == "queue_full":
            raise ApiError(429, "too_many_queued", exc.message) from None
        if exc.code == "not_a_member":
            raise ApiError(403, "not_a_member", exc.message) from None
        raise ApiError(400, "unknown_kind", exc.message) from None
    except NotYours as exc:
        raise ApiError(403, "forbidden", exc.message) from None
    except RequestConflict as exc:
        raise ApiError(409, "conflict", f"{exc.message}: {exc.hint}") from None
    status = {"granted": 201, "queued": 202}.get(lease.state, 200)
    return Reply(status, call.lease_json(lease), {"Location": f"/api/v1/leases/{lease.id}"})


def release_lease(call: Call, lease_id: str) -> Reply:
    """DELETE /api/v1/leases/{id}: release (or, with a checkpoint, suspend; or
    ``kernel_may_run``: its slot is fenced first); idempotent."""
    body = call.json_body()
    reason = field_of(body, "reason", str, ", ".join(RELEASE_REASONS), required=False)
    reason = reason or "released"
    if reason not in RELEASE_REASONS:
        expected = ", ".join(f'"{r}"' for r in RELEASE_REASONS)
        raise ApiError(
            400,
            "bad_request",
            f"field 'reason': expected {expected}, got {json.dumps(reason)[:80]}",
        )
    raw = body.get("checkpoint")
    if raw is not None and reason != "suspended":
        raise ApiError(400, "bad_request", "field 'checkpoint': only with reason 'suspended'")
    lease = call.owned_lease(lease_id)
    checkpoint = None
    if raw is not None:
        checkpoint = _checkpoint_row(call, raw, lease)
    if lease.state not in ("queued", "granted"):
        checkpoint = None  # an ended lease is returned as it is (idempotent)
    lease = call.service.release(lease_id, reason, checkpoint) or lease
    return Reply(200, call.lease_json(lease))


def heartbeat(call: Call, lease_id: str) -> Reply:
    """POST /api/v1/leases/{id}/heartbeat: alive, busy or not; the reply carries orders."""
    body = call.json_body()
    busy = field_of(body, "busy", bool, "true or false", required=False) or False
    last_activity = None
    if body.get("last_activity") is not None:
        last_activity = field_of(body, "last_activity", float, "unix seconds (a number) or null")
    call.owned_lease(lease_id)
    lease, orders = call.service.heartbeat(lease_id, busy, last_activity)
    assert lease is not None
    return Reply(200, {"lease": call.lease_json(lease), "orders": orders})


def _checkpoint_row(call: Call, raw: Any, lease: Lease) -> CheckpointRow:
    if not isinstance(raw, dict):
        raise ApiError(
            400,
            "bad_request",
            'field \'checkpoint\': expected an object {"host", "path", "bytes", "kernel_id"}',
        )
    host = field_of(raw, "host", str, "the host's name in the broker config")
    path = field_of(raw, "path", str, "the checkpoint's path on that host")
    size = field_of(raw, "bytes", int, "the checkpoint's size in bytes (an integer)")
    kernel_id = kernel_id_of(raw, "kernel_id", required=False) or lease.kernel_id
    if kernel_id != lease.kernel_id:
        raise ApiError(
            403,
            "forbidden",
            f"field 'checkpoint.kernel_id': lease {lease.id!r} is for kernel "
            f"{lease.kernel_id!r}; a checkpoint is recorded only for the lease's own kernel",
        )
    if host not in {h.name for h in call.service.config.hosts}:
        raise ApiError(400, "bad_request", f"field 'checkpoint.host': no host {host!r}")
    if not path or len(path) > 4096 or "\x00" in path:
        raise ApiError(400, "bad_request", "field 'checkpoint.path': 1 to 4096 characters")
    if size < 0 or size > 2**62:
        raise ApiError(400, "bad_request", "field 'checkpoint.bytes': expected >= 0")
    return CheckpointRow(
        kernel_id=kernel_id,
        user=lease.user,
        host=host,
        path=path,
        bytes=size,
        created_at=call.service.clock(),
        lease_id=lease.id,
    )
