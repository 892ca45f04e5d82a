"""HTTP API v1, the admin and reporting side: drain/undrain a host, reset a slot, reload the
config, checkpoints of suspended kernels, usage reports and Prometheus metrics.

``broker.http.handlers.make_app`` mounts ``routes(args)``. Roles (``broker.http.auth``): drain,
reset and reload need an admin token; ``/metrics`` an admin or teacher token; checkpoints and usage
show what the caller may see (own; a teacher's groups; everything for an admin).
"""

from __future__ import annotations

import math
import time
from typing import Any

import tornado.web

from broker.config.durations import parse_duration
from broker.errors import ConfigError
from broker.http import metrics
from broker.http.auth import groups_of, may_act, taught_groups
from broker.http.calls import ApiError
from broker.http.handlers import BaseHandler
from broker.http.usage import to_csv, usage_report
from broker.http.views import checkpoint_json
from broker.service.reload import reload_config
from gpu_kernel.errors import SharedGPUError


class HostDrainHandler(BaseHandler):
    """POST /api/v1/hosts/{name}/drain|undrain (admin): no new grants on the host; persisted."""

    def post(self, name: str, action: str) -> None:
        self.require_role("admin")
        try:
            self.service.set_drain(name, action == "drain")
        except KeyError:
            raise ApiError(404, "not_found", f"no host {name!r} in the config") from None
        host = self.service.config.host(name)
        slots = [{"id": s.id, "state": self.service.slot_state(s.id)} for s in host.slots]
        self.send(200, {"host": name, "drained": self.service.drained(name), "slots": slots})


class SlotResetHandler(BaseHandler):
    """POST /api/v1/slots/{id}/reset (admin): a slot stuck after failed fencing is free again."""

    def post(self, slot_id: str) -> None:
        self.require_role("admin")
        try:
            state = self.service.reset_slot(slot_id)
        except KeyError:
            raise ApiError(404, "not_found", f"no slot {slot_id!r} in the config") from None
        self.send(200, {"slot": slot_id, "state": state})


class ReloadHandler(BaseHandler):
    """POST /api/v1/admin/reload (admin): load the config file again; leases are kept."""

    async def post(self) -> None:
        self.require_role("admin")
        try:
            config = await reload_config(self.service)
        except ConfigError as exc:
            issues = [str(issue) for issue in exc.issues]
            raise ApiError(
                400,
                "bad_config",
                "the new config was rejected, the old one stays:\n" + "\n".join(issues),
                issues=issues,
            ) from None
        except SharedGPUError as exc:  # e.g. an auto host that cannot be probed
            raise ApiError(
                400, "bad_config", f"reload failed, the old config stays: {exc}", issues=[str(exc)]
            ) from None
        self.send(
            200, {"path": str(config.path), "hosts": len(config.hosts), "slots": len(config.slots)}
        )


class CheckpointsHandler(BaseHandler):
    """GET /api/v1/checkpoints[?kernel_id=]: where suspended kernels' checkpoints live."""

    def get(self) -> None:
        kernel_id = self.get_query_argument("kernel_id", None)
        rows = self.service.store.checkpoints(kernel_id=kernel_id)
        rows = [row for row in rows if self.may_see(row.user)]
        self.send(200, {"checkpoints": [checkpoint_json(self.service, row) for row in rows]})


class CheckpointHandler(BaseHandler):
    """DELETE /api/v1/checkpoints/{kernel_id}: forget it (after a resume or a shutdown)."""

    def delete(self, kernel_id: str) -> None:
        store = self.service.store
        owner = store.kernel_owner(kernel_id) or self.identity.user
        row = store.checkpoint(owner, kernel_id)
        if row is None:
            raise ApiError(404, "not_found", f"no checkpoint for kernel {kernel_id!r}")
        if not may_act(self.identity, row.user):
            raise ApiError(403, "forbidden", f"the checkpoint of {kernel_id!r} is another user's")
        now = self.service.clock()
        with store.transaction():
            store.forget_checkpoint(row.user, kernel_id)
            store.log(now, "checkpoint_forgotten", row.lease_id, row.user, kernel_id=kernel_id)
        self.send(200, checkpoint_json(self.service, row))


class UsageHandler(BaseHandler):
    """GET /api/v1/usage?since=&group=&format=json|csv."""

    def get(self) -> None:
        now = self.service.clock()
        since = _since(self.get_query_argument("since", "0"), now)
        group = self.get_query_argument("group", None)
        fmt = self.get_query_argument("format", "json")
        if fmt not in ("json", "csv"):
            raise ApiError(400, "bad_request", f"query 'format': json or csv, got {fmt!r}")
        who, config = self.identity, self.service.config
        if who.is_admin:
            groups = {name: members for name, members, _ in groups_of(config)}
        else:
            groups = taught_groups(config, who)
        if group is not None:
            if group not in groups:
                known = {name for name, _, _ in groups_of(config)}
                if group in known:
                    raise ApiError(403, "forbidden", f"you do not teach group {group!r}")
                raise ApiError(404, "not_found", f"no group {group!r} in the config")
            groups = {group: groups[group]}
            members = set(groups[group])
            visible = members.__contains__
        else:
            visible = self.may_see
        leases = self.service.store.ended_leases(since) + [
            lease for lease in self.service.scheduler.leases() if lease.state == "granted"
        ]
        report = usage_report(leases, groups, since, now, visible)
        if fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_status(200)
            self.finish(to_csv(report))
            return
        self.send(200, report)


class MetricsHandler(BaseHandler):
    """GET /metrics (admin or teacher token): Prometheus text format."""

    def get(self) -> None:
        self.require_role("admin", "teacher")
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.set_status(200)
        hub = self.hub.stats if self.hub is not None and self.hub.enabled else None
        self.finish(metrics.render(self.service, hub))


def _since(raw: str, now: float) -> float:
    """Unix seconds, an ISO date/time (UTC), or a duration back from now ("7d")."""
    try:
        value = float(raw)
        if math.isfinite(value) and value >= 0:
            return value
    except ValueError:
        pass
    try:
        return max(0.0, now - parse_duration(raw))
    except (ValueError, TypeError):
        pass
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"):
        try:
            return float(time.mktime(time.strptime(raw, fmt)) - time.timezone)
        except (ValueError, OverflowError):
            continue
    raise ApiError(
        400,
        "bad_request",
        f"query 'since': unix seconds, a date like 2024-09-01 or a duration "
        f'like "7d", got {raw[:64]!r}',
    )


def routes(args: dict[str, Any]) -> list[tuple[str, type[tornado.web.RequestHandler], dict]]:
    return [
        (r"/api/v1/hosts/([^/]+)/(drain|undrain)", HostDrainHandler, args),
        (r"/api/v1/slots/(.+)/reset", SlotResetHandler, args),
        (r"/api/v1/admin/reload", ReloadHandler, args),
        (r"/api/v1/checkpoints", CheckpointsHandler, args),
        (r"/api/v1/checkpoints/([^/]+)", CheckpointHandler, args),
        (r"/api/v1/usage", UsageHandler, args),
        (r"/metrics", MetricsHandler, args),
    ]
