"""What JupyterLab shows about one Shared GPU kernel: the ``ui_state()`` dict, built purely.

``SharedGPUProvisioner.ui_state()`` reads a few facts off its session (lease, kernel, checkpoint,
the proxy's activity) into a ``SessionFacts`` and calls ``ui_state(facts, now)``; the server
extension (``provisioner.server_extension``) serves the result to the browser as JSON. Nothing
here does I/O or reads a clock, so each state is tested with plain values.

States, in the order they take precedence: ``ended`` (shut down), ``failed`` (a start failed and
nothing is held), ``suspending``, ``queued`` (waiting for a slot, also while resuming),
``resuming`` / ``suspended`` (the state is saved in a checkpoint), ``reconnecting`` (the SSH
connection dropped; the kernel lives on), ``running``, ``starting`` (granted, not yet launched),
``unattached`` (no lease, no kernel, nothing saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.client import Lease

STATES = (
    "unattached",
    "queued",
    "starting",
    "running",
    "suspending",
    "suspended",
    "resuming",
    "reconnecting",
    "failed",
    "ended",
)


@dataclass(frozen=True)
class CheckpointFacts:
    """Where a suspended kernel's state is saved."""

    host: str
    bytes: int
    since: float  # unix time of the suspend


@dataclass(frozen=True)
class SessionFacts:
    """A snapshot of one kernel's session, read without blocking by the provisioner."""

    kernel_id: str
    lease: Lease | None = None  # the current request or grant (None: none held)
    kernel_running: bool = False  # a kernel process is up on the host
    checkpoint: CheckpointFacts | None = None  # set while the state lives in a checkpoint
    busy: bool = False  # a cell is running (the proxy's view of IOPub status)
    last_activity: float | None = None  # unix time of the last request or the idle ending it
    suspending: bool = False  # a suspend was asked and has not finished
    resuming: bool = False  # the proxy is bringing a suspended kernel back
    reconnecting: bool = False  # the SSH connection to the host is down
    failed: bool = False  # the last start or resume failed
    ended: bool = False  # shut down: the session is closed for good
    message: str | None = None  # one line for the user (an error, a refused suspend)
    policy: dict[str, Any] | None = None  # the last policy a lease carried (kept while suspended)
    quota: dict[str, Any] | None = None  # the last quota a lease carried


def _num(d: dict[str, Any] | None, key: str) -> float | None:
    value = (d or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def state_of(facts: SessionFacts) -> str:
    """The one word the status bar shows (see the module doc for the precedence)."""
    lease = facts.lease
    queued = lease is not None and lease.state == "queued"
    granted = lease is not None and lease.state == "granted"
    if facts.ended:
        return "ended"
    if facts.suspending and facts.kernel_running:
        return "suspending"
    if queued:
        return "queued"
    if facts.checkpoint is not None:
        return "resuming" if facts.resuming or granted else "suspended"
    if facts.kernel_running:
        return "reconnecting" if facts.reconnecting else "running"
    if facts.failed:
        return "failed"
    if granted:
        return "starting"
    return "unattached"


def suspend_in(
    policy: dict[str, Any] | None,
    idle_s: float | None,
    lease_age_s: float | None,
    busy: bool,
    queue_length: int,
) -> float | None:
    """Seconds before the broker would suspend a running kernel (the rules of ``broker.idle``):
    ``idle_suspend_after`` idle, ``idle_suspend_when_queued`` while others wait, and
    ``max_lease`` since the grant even when busy; ``release_after_cell`` (per-cell binding)
    while others wait. None when no rule applies or is known."""
    candidates: list[float] = []
    after = _num(policy, "idle_suspend_after")
    when_queued = _num(policy, "idle_suspend_when_queued")
    max_lease = _num(policy, "max_lease")
    if not busy and idle_s is not None:
        limit = after
        for rule in (when_queued, _num(policy, "release_after_cell")) if queue_length > 0 else ():
            if rule is not None:
                limit = rule if limit is None else min(limit, rule)
        if limit is not None:
            candidates.append(limit - idle_s)
    if max_lease is not None and lease_age_s is not None:
        candidates.append(max_lease - lease_age_s)
    return max(0.0, min(candidates)) if candidates else None


def ui_state(facts: SessionFacts, now: float) -> dict[str, Any]:
    """The JSON-able dict ``SharedGPUProvisioner.ui_state()`` returns (the contract with the
    server extension and the lab extension); ``now`` is unix time."""
    state = state_of(facts)
    lease = facts.lease
    granted = lease is not None and lease.state == "granted"
    queue = None
    if lease is not None and lease.state == "queued":
        waiting = lease.waiting if isinstance(lease.waiting, dict) else {}
        queue = {
            "position": int(lease.position or 0),
            "length": int(lease.queue_length),
            "reason": waiting.get("message") if isinstance(waiting.get("message"), str) else None,
        }
    slot = lease.slot if granted and lease is not None else None
    host = lease.host.name if granted and lease is not None and lease.host else None
    lease_age = None
    if granted and lease is not None and lease.granted_at is not None:
        lease_age = max(0.0, now - lease.granted_at)
    idle = None
    if state == "running" and not facts.busy:
        start = facts.last_activity
        if lease_age is not None:  # idle on this lease: never longer than the lease itself
            start = max(start or 0.0, now - lease_age)
        idle = None if start is None else max(0.0, now - start)
    policy = (lease.policy if lease is not None and lease.policy else None) or facts.policy
    quota = (lease.quota if lease is not None and lease.quota else None) or facts.quota
    suspend = None
    if state == "running":
        waiting = int(lease.queue_length) if lease is not None else 0
        suspend = suspend_in(policy, idle, lease_age, facts.busy, waiting)
    checkpoint = None
    if facts.checkpoint is not None:
        cp = facts.checkpoint
        checkpoint = {"host": cp.host, "bytes": int(cp.bytes), "since": float(cp.since)}
    return {
        "kernel_id": facts.kernel_id,
        "state": state,
        "message": facts.message,
        "queue": queue,
        "host": host,
        "slot": slot.id if slot else None,
        "kind": (slot.kind if slot else None) or (lease.kind if lease is not None else None),
        "device": slot.device if slot else None,
        "lease_age_s": lease_age,
        "idle_s": idle,
        "suspend_in_s": suspend,
        "busy": bool(facts.busy) and state in ("running", "reconnecting", "suspending"),
        "policy": dict(policy) if policy else None,
        "quota": dict(quota) if quota else None,
        "checkpoint": checkpoint,
    }
