"""JSON views of leases, slots, checkpoints and the pool, as a caller may see them.

``broker.http.handlers`` and ``broker.http.admin`` build every reply with these; docs/api.md and
docs/openapi.yaml describe the shapes. Visibility follows ``broker.http.auth.may_see``: other users'
names and lease ids are ``null`` unless the caller is an admin or teaches that user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.config.durations import format_duration
from broker.core.idle import release_after
from broker.core.leases import Lease
from broker.core.quota import DAY_SECONDS, day_of
from broker.core.waiting import why_waiting
from broker.http.auth import Identity, may_see
from broker.store.host_records import CheckpointRow

if TYPE_CHECKING:
    from broker.service.service import BrokerService


def slot_json(service: BrokerService, slot_id: str | None) -> dict[str, Any] | None:
    if slot_id is None:
        return None
    slot = service.slot_config(slot_id)
    if slot is None:
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
    slot = service.slot_config(lease.slot_id)
    if slot is None:
        return None
    host = service.config.host(slot.host)
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
        # why it waits and when that may lift (``broker.core.waiting``); null unless queued
        "waiting": (
            why_waiting(service.scheduler, lease, service.clock()).as_json()
            if lease.state == "queued"
            else None
        ),
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
        "policy": {  # what the kernel's %gpu shows, and where checkpoints go
            "idle_suspend_after": getattr(policy, "idle_suspend_after", None),
            "idle_suspend_when_queued": getattr(policy, "idle_suspend_when_queued", None),
            "max_lease": getattr(policy, "max_lease", None),
            "checkpoint_dir": getattr(policy, "checkpoint_dir", None),
            # per-cell binding in force for it (its group's, else [policy]'s); null: off
            "release_after_cell": release_after(lease, service.scheduler.policy),
        },
        "quota": quota_json(service, lease.user),
    }


def quota_json(service: BrokerService, user: str) -> dict[str, Any]:
    """The user's daily GPU-hours: used, limit (null: none), and when the day resets."""
    now = service.clock()
    limit = service.scheduler.quota_seconds(user)
    return {
        "used_hours": round(service.scheduler.usage_today(user, now) / 3600, 3),
        "limit_hours": None if limit is None else round(limit / 3600, 3),
        "resets_at": (day_of(now) + 1) * DAY_SECONDS,
    }


def checkpoint_json(service: BrokerService, row: CheckpointRow) -> dict[str, Any]:
    """A checkpoint; an expired one carries the sentence to show the user."""
    max_age = float(getattr(service.config.policy, "checkpoint_max_age", 0) or 0)
    message = None
    if row.state == "expired":
        age = f" after {format_duration(max_age)}" if max_age else ""
        message = f"your suspended kernel's checkpoint expired{age} and was deleted"
    return {
        "kernel_id": row.kernel_id,
        "user": row.user,
        "host": row.host,
        "path": row.path,
        "bytes": row.bytes,
        "created_at": row.created_at,
        "lease_id": row.lease_id,
        "state": row.state,
        "expired_at": row.expired_at,
        "message": message,
    }


def status_json(service: BrokerService, who: Identity) -> dict[str, Any]:
    """The pool as ``who`` may see it."""
    scheduler = service.scheduler
    config = service.config
    seen: dict[str, bool] = {}

    def visible(user: str) -> bool:
        if user not in seen:
            seen[user] = may_see(config, who, user)
        return seen[user]

    hosts = []
    for host in config.hosts:
        entry: dict[str, Any] = {
            "name": host.name,
            "drained": service.drained(host.name),
            "slots": [slot.id for slot in host.slots],
        }
        if who.is_admin:
            entry.update(address=host.address, port=host.port)
        hosts.append(entry)
    slots = []
    for slot in scheduler.slots():
        entry = slot_json(service, slot.id) or {}
        lease = scheduler.lease(slot.lease_id) if slot.lease_id else None
        entry.update(state=service.slot_state(slot.id), drained=slot.drained, lease=None)
        if lease is not None:
            entry["lease"] = {
                "id": lease.id if visible(lease.user) else None,
                "user": lease.user if visible(lease.user) else None,
                "mine": lease.user == who.user,
                "kernel_id": lease.kernel_id if visible(lease.user) else None,
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
                "id": lease.id if visible(lease.user) else None,
                "user": lease.user if visible(lease.user) else None,
            }
        )
    leases = [lease_json(service, lease) for lease in scheduler.leases() if visible(lease.user)]
    checkpoints = [
        checkpoint_json(service, row)
        for row in service.store.checkpoints("kept")
        if visible(row.user)
    ]
    return {
        "now": service.clock(),
        "user": who.user,
        "role": who.role,
        "hosts": hosts,
        "slots": slots,
        "leases": leases,
        "queue": queue,
        "checkpoints": checkpoints,
    }
