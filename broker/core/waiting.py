"""Why a queued request still waits, and when that may change. Pure: reads a scheduler's state,
no clock, no I/O.

``broker.http.views.lease_json`` puts ``why_waiting(scheduler, lease, now)`` into every queued
lease's JSON (``"waiting": {"code", "message", "until"}``); the provisioner shows the message in
the waiting cell and the JupyterLab status panel, and the dashboard's queue shows it per request.

The reasons, first match wins (``CODES``):

- ``user_limit``: the user holds ``policy.max_leases_per_user`` slots already;
- ``class_limit``: every group of theirs that allows the kind is at its ``max_slots_per_user``;
- ``gone``: no slot of the kind is left in the pool (a config reload retired them);
- ``reserved``: free slots of the kind exist, but a class in session keeps them for its members
  (``until``: the end of that class session);
- ``ahead``: a free slot exists and requests before this one are being served;
- ``drained`` / ``unreachable``: no slot of the kind is in use, and those left are on hosts an
  admin drained, or are being fenced after their host stopped answering;
- ``busy``: every slot of the kind is in use (``until``: the earliest time the idle and
  lease-length rules would ask a holder to give one back, when one applies).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.core.fairness import Reservation, blocked, reservation_needs
from broker.core.groups import DAY_SECONDS, GroupConfig
from broker.core.idle import ran_a_cell, release_after
from broker.core.leases import ANY_KIND, Lease, since
from broker.core.state import SchedulerState

CODES = ("user_limit", "class_limit", "gone", "reserved", "ahead", "drained", "unreachable", "busy")


@dataclass(frozen=True)
class Waiting:
    """Why a request waits: ``code`` (one of ``CODES``), one sentence for the user, and when it
    may lift (unix seconds; None when nothing says)."""

    code: str
    message: str
    until: float | None = None

    def as_json(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "until": self.until}


def why_waiting(state: SchedulerState, lease: Lease, now: float) -> Waiting:
    """Why queued ``lease`` is not granted at ``now`` (see the module doc)."""
    policy = state.policy
    held = state.held_by(lease.user)
    if held >= policy.max_leases_per_user:
        return Waiting(
            "user_limit",
            f"you hold {_slots(held)} already, the most one user may hold at once: stop or "
            "suspend (%gpu suspend) one of your other Shared GPU kernels",
        )
    groups = [
        g for g in state.groups_of(lease.user) if lease.kind == ANY_KIND or g.allows(lease.kind)
    ]
    charged = {g.name: state.held_in_group(lease.user, g.name) for g in groups}
    if groups and all(charged[g.name] >= g.max_slots_per_user for g in groups):
        names = ", ".join(g.name for g in groups)
        most = max(g.max_slots_per_user for g in groups)
        return Waiting(
            "class_limit",
            f"you hold the {_slots(most)} your class allows per student ({names}): stop or "
            "suspend (%gpu suspend) one of your other Shared GPU kernels",
        )
    what = "GPU slot" if lease.kind == ANY_KIND else f"{lease.kind!r} GPU slot"
    kinds = _kinds_for(lease, state, tuple(groups))
    slots = [s for s in state.slots() if s.kind in kinds and not s.retired]
    if not slots:
        return Waiting("gone", f"no {what} is left in the pool: ask the admin, or stop this kernel")
    states = {s.id: state.slot_state(s.id) for s in slots}
    free = [s for s in slots if states[s.id] == "free"]
    if free:
        sessions = tuple(g for g in policy.groups if g.in_session(now) is not None)
        reservations = reservation_needs(sessions, state.holders(), now) if sessions else []
        counts = state.pool.free_counts()
        if reservations and all(blocked(lease.user, s.kind, reservations, counts) for s in free):
            return _reserved(lease, reservations, what, now)
        ahead = (state.position(lease.id) or 1) - 1
        if not ahead:
            return Waiting("ahead", f"a {what} is free: it is being granted to you")
        return Waiting(
            "ahead", f"a {what} is free; {_requests(ahead)} before yours are served first"
        )
    busy = [s for s in slots if states[s.id] == "busy"]
    if not busy:
        drained = sorted({s.host for s in slots if states[s.id] == "drained"})
        if drained:
            hosts = ", ".join(drained)
            return Waiting(
                "drained",
                f"every {what} not in use is on a host the admin drained for maintenance "
                f"({hosts}): your request waits until it is back in the pool",
            )
        lost = ", ".join(sorted({s.host for s in slots}))
        return Waiting(
            "unreachable",
            f"every {what} is on a host that stopped answering ({lost}); the broker is checking "
            "that no kernel still runs there before it grants the slot again",
        )
    until, rule = _next_release(state, [s.lease_id for s in busy if s.lease_id], now)
    ahead = (state.position(lease.id) or 1) - 1
    text = f"all {len(busy)} {what}s are in use" if len(busy) > 1 else f"the one {what} is in use"
    if ahead:
        text += f" and {_requests(ahead)} {'waits' if ahead == 1 else 'wait'} before yours"
    if rule:
        text += f"; {rule}"
    return Waiting("busy", text, until)


def _kinds_for(lease: Lease, state: SchedulerState, groups: tuple[GroupConfig, ...]) -> set[str]:
    """The slot kinds ``lease`` may take: its kind, or for "any" those its groups allow."""
    if lease.kind != ANY_KIND:
        return {lease.kind}
    kinds = set(state.kinds)
    if groups and all(g.kinds for g in groups):
        kinds &= {k for g in groups for k in g.kinds}
    return kinds


def _reserved(lease: Lease, reservations: list[Reservation], what: str, now: float) -> Waiting:
    """A class in session keeps the free slots: say which, and when its session ends."""
    mine = [r for r in reservations if lease.user not in r.group.members]
    names = ", ".join(r.group.name for r in mine)
    ends = [_session_end(r.group, now) for r in mine]
    until = min((e for e in ends if e is not None), default=None)
    text = f"the free {what}s are kept for class {names} while it is in session"
    if until is not None:
        hour = int(until % DAY_SECONDS // 3600) or 24  # a session to the day's end: "24:00"
        clock = f"{hour:02d}:{int(until % 3600 // 60):02d} UTC"
        text += f", until {clock}"
    return Waiting("reserved", text, until)


def _session_end(group: GroupConfig, now: float) -> float | None:
    """Unix time the group's class session active at ``now`` ends (None: none is active)."""
    session = group.in_session(now)
    if session is None:
        return None
    day_start = now - now % DAY_SECONDS
    return day_start + session.end_minute * 60.0


def _next_release(
    state: SchedulerState, lease_ids: list[str], now: float
) -> tuple[float | None, str]:
    """The earliest time a rule asks a holder of one of the slots to give it back, and a clause
    that names the rule ("" when no rule applies: the slots are held by running cells)."""
    policy = state.policy
    best: tuple[float, str] | None = None
    for lease_id in lease_ids:
        held = state.lease(lease_id)
        if held is None:
            continue
        granted = since(held.granted_at, now)
        options = [(granted + policy.max_lease, "max_lease")]
        if not held.busy:
            last = max(held.last_activity or granted, granted)
            limit = policy.idle_suspend_when_queued
            per_cell = release_after(held, policy) if ran_a_cell(held) else None
            if per_cell is not None and per_cell < limit:
                options.append((last + per_cell, "after_cell"))
            else:
                options.append((last + limit, "idle_while_queued"))
        for when, rule in options:
            if best is None or when < best[0]:
                best = (when, rule)
    if best is None:
        return None, ""
    when, rule = best
    if rule == "max_lease":
        text = (
            f"the first lease reaches the longest one allowed ({_about(policy.max_lease)})"
            f" in {_about(max(0.0, when - now))}"
        )
    elif rule == "after_cell":
        text = "an idle kernel gives its slot back a few seconds after its cell ends"
    else:
        wait = _about(policy.idle_suspend_when_queued)
        text = f"a kernel idle for {wait} while others wait is suspended to free its slot"
    if rule == "max_lease" and when > now + 3600:
        return None, "each is running a cell"
    return when, text


def _slots(n: int) -> str:
    return f"{n} GPU slot" + ("s" if n != 1 else "")


def _requests(n: int) -> str:
    return f"{n} request" + ("s" if n != 1 else "")


def _about(seconds: float) -> str:
    """Whole seconds in the config's style: 45 -> "45s", 90 -> "1m30s", 7200 -> "2h"."""
    left = max(0, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
