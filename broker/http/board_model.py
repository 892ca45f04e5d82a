"""What the dashboard shows one viewer, read off the running service: the pool for admins, the
classes a teacher teaches, a user's own kernels. ``broker.http.dashboard`` renders a ``Board``
with the ``dashboard.html`` template.

- **Admin**: hosts (drained or not), slots (kind, state, holder, since, idle), the queue with why
  each request waits, suspended kernels (checkpoint size and age), GPU-hours per group today,
  and every class.
- **Teacher**: each class they teach (``teachers`` or ``teacher_hub_group``): who holds a slot,
  who waits, who is suspended, GPU-hours per student today (UTC), and the plot of the class's
  slots in use today against its reservation (``broker.http.board_plot``).
- **User**: their own leases, suspended kernels and GPU-hours today.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.core.groups import DAY_SECONDS, GroupConfig
from broker.core.leases import Lease
from broker.core.waiting import why_waiting
from broker.http.auth import Identity, taught_groups
from broker.http.board_plot import class_plot, in_use_steps, reserved_steps
from broker.http.usage import usage_report
from broker.service.service import BrokerService
from broker.store.host_records import CheckpointRow


@dataclass
class ClassView:
    name: str
    members: int
    teachers: str
    kinds: str
    quota: str
    rows: list[dict] = field(default_factory=list)  # student, state, gpu_hours
    plot: str = ""  # inline SVG
    in_use: int = 0
    reserved_now: int = 0


@dataclass
class Board:
    user: str
    role: str
    hosts: list[dict] = field(default_factory=list)
    slots: list[dict] = field(default_factory=list)
    queue: list[dict] = field(default_factory=list)
    suspended: list[dict] = field(default_factory=list)
    group_usage: list[dict] = field(default_factory=list)
    classes: list[ClassView] = field(default_factory=list)
    own: list[dict] = field(default_factory=list)
    own_hours: float = 0.0


def duration(seconds: float | None) -> str:
    """ "45s", "12m", "3h05m", "2d4h"."""
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def build_board(service: BrokerService, who: Identity, now: float) -> Board:
    """Everything ``who`` may see on the dashboard at ``now``."""
    day_start = now - now % DAY_SECONDS
    live = service.scheduler.leases()
    today = service.store.ended_leases(day_start) + [
        lease for lease in live if lease.state == "granted"
    ]
    kept = service.store.checkpoints(state="kept")
    board = Board(user=who.user, role=who.role)
    if who.is_admin:
        _pool(board, service, live, kept, now)
        names = [group.name for group in service.config.groups]
        board.group_usage = usage_report(
            today,
            {g.name: tuple(g.members) for g in service.config.groups},
            day_start,
            now,
            lambda _: True,
        )["groups"]
    else:
        names = sorted(taught_groups(service.config, who))
    for name in names:
        board.classes.append(_class(service, service.config.group(name), live, today, kept, now))
    mine = [lease for lease in live if lease.user == who.user]
    board.own = [_lease_row(service, lease, now) for lease in mine]
    board.own += [_suspended_row(row, now) for row in kept if row.user == who.user]
    report = usage_report(today, {}, day_start, now, lambda user: user == who.user)
    board.own_hours = sum(row["gpu_hours"] for row in report["users"])
    return board


def _pool(
    board: Board, service: BrokerService, live: list[Lease], kept: list[CheckpointRow], now: float
) -> None:
    holder = {lease.slot_id: lease for lease in live if lease.state == "granted"}
    states = {slot.id: service.slot_state(slot.id) for slot in service.scheduler.slots()}
    for host in service.config.hosts:
        ids = [slot.id for slot in host.slots]
        board.hosts.append(
            {
                "name": host.name,
                "drained": service.drained(host.name),
                "slots": len(ids),
                "busy": sum(1 for i in ids if i in holder),
            }
        )
    for slot in service.scheduler.slots():
        lease = holder.get(slot.id)
        idle = None
        if lease is not None and not lease.busy:
            idle = now - (lease.last_activity or lease.granted_at or now)
        board.slots.append(
            {
                "id": slot.id,
                "host": slot.host,
                "kind": slot.kind,
                "state": states[slot.id],
                "holder": lease.user if lease else "",
                "since": duration(now - lease.granted_at) if lease and lease.granted_at else "—",
                "idle": "busy" if lease is not None and lease.busy else duration(idle),
            }
        )
    for position, lease in enumerate(service.scheduler.queue(), start=1):
        board.queue.append(
            {
                "position": position,
                "user": lease.user,
                "kind": lease.kind,
                "waited": duration(now - lease.created_at),
                "reason": why_waiting(service.scheduler, lease, now).message,
            }
        )
    board.suspended = [_suspended_row(row, now) for row in kept]


def _class(
    service: BrokerService,
    group: GroupConfig,
    live: list[Lease],
    today: list[Lease],
    kept: list[CheckpointRow],
    now: float,
) -> ClassView:
    day_start = now - now % DAY_SECONDS
    members = set(group.members)
    report = usage_report(today, {}, day_start, now, members.__contains__)
    hours = {row["user"]: row["gpu_hours"] for row in report["users"]}
    positions = {lease.id: p for p, lease in enumerate(service.scheduler.queue(), start=1)}
    rows = []
    for user in sorted(members):
        states = []
        for lease in live:
            if lease.user != user:
                continue
            if lease.state == "granted":
                since = duration(now - (lease.granted_at or now))
                states.append(f"holds {lease.slot_id} ({since})")
            else:
                states.append(f"waits (#{positions.get(lease.id, '?')})")
        for row in kept:
            if row.user == user:
                states.append(
                    f"suspended ({size(row.bytes)}, {duration(now - row.created_at)} ago)"
                )
        rows.append(
            {"user": user, "state": "; ".join(states) or "—", "gpu_hours": hours.get(user, 0.0)}
        )
    slots = [s for s in service.config.slots if group.allows(s.kind)]
    intervals = [
        (lease.granted_at, lease.ended_at if lease.ended_at is not None else now)
        for lease in today
        if lease.user in members
        and lease.granted_at is not None
        and _counts_for(lease, group, service)
    ]
    used = in_use_steps(intervals, day_start, now)
    reserved = reserved_steps(group.sessions, day_start)
    session = group.in_session(now)
    quota = f"{group.gpu_hours_per_day:g} GPU-hours a day" if group.gpu_hours_per_day else "none"
    return ClassView(
        name=group.name,
        members=len(members),
        teachers=", ".join(sorted(group.teachers)) or "—",
        kinds=", ".join(group.kinds) or "any",
        quota=quota,
        rows=rows,
        plot=class_plot(group.name, used, reserved, now - day_start, len(slots)),
        in_use=sum(1 for lease in live if lease.state == "granted" and lease.user in members),
        reserved_now=session.reserved_slots if session else 0,
    )


def _counts_for(lease: Lease, group: GroupConfig, service: BrokerService) -> bool:
    """Does a member's lease count as the class's? (Its slot is of a kind the class uses.)"""
    slot = service.slot_config(lease.slot_id or "")
    return group.allows(slot.kind if slot is not None else lease.kind)


def _lease_row(service: BrokerService, lease: Lease, now: float) -> dict:
    if lease.state == "granted":
        state = f"holds {lease.slot_id} for {duration(now - (lease.granted_at or now))}"
    else:
        state = f"waits (#{service.scheduler.position(lease.id) or '?'})"
    return {"kernel": lease.kernel_id, "state": state}


def _suspended_row(row: CheckpointRow, now: float) -> dict:
    return {
        "user": row.user,
        "kernel": row.kernel_id,
        "host": row.host,
        "size": size(row.bytes),
        "age": duration(now - row.created_at),
        "state": f"suspended on {row.host} ({size(row.bytes)}, "
        f"{duration(now - row.created_at)} ago)",
    }
