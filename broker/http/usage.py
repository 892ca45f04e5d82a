"""Usage reports: GPU-hours, leases and suspends per user and per group since a time.

``broker.http.admin.UsageHandler`` (``GET /api/v1/usage``) calls ``usage_report`` with the users the
caller may see, and ``to_csv`` for ``format=csv``; ``gpu-broker usage`` prints either. Figures
come from the store's lease rows (ended ones) and the scheduler's live leases, so they survive
restarts. A lease counts from ``max(granted_at, since)`` to its end (or now, while it runs).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from typing import Any

from broker.core.leases import Lease


def _hours(lease: Lease, since: float, now: float) -> float:
    if lease.granted_at is None:
        return 0.0
    end = lease.ended_at if lease.ended_at is not None else now
    return max(0.0, end - max(lease.granted_at, since)) / 3600.0


def usage_report(
    leases: Iterable[Lease],
    groups: dict[str, tuple[str, ...]],
    since: float,
    now: float,
    visible: Callable[[str], bool],
) -> dict[str, Any]:
    """Per-user rows (users ``visible`` allows) and per-group totals (of those users)."""
    users: dict[str, dict[str, Any]] = {}
    for lease in leases:
        if lease.granted_at is None or not visible(lease.user):
            continue
        row = users.setdefault(
            lease.user, {"user": lease.user, "gpu_hours": 0.0, "leases": 0, "suspends": 0}
        )
        row["gpu_hours"] += _hours(lease, since, now)
        row["leases"] += 1
        row["suspends"] += int(lease.end_reason == "suspended")
    member_of: dict[str, list[str]] = {}
    for name, members in groups.items():
        for member in members:
            member_of.setdefault(member, []).append(name)
    group_rows = []
    for name, members in sorted(groups.items()):
        rows = [users[m] for m in members if m in users]
        group_rows.append(
            {
                "group": name,
                "members": len(members),
                "active": len(rows),
                "gpu_hours": round(sum(r["gpu_hours"] for r in rows), 4),
                "leases": sum(r["leases"] for r in rows),
                "suspends": sum(r["suspends"] for r in rows),
            }
        )
    user_rows = []
    for user in sorted(users):
        row = dict(users[user], gpu_hours=round(users[user]["gpu_hours"], 4))
        row["groups"] = sorted(member_of.get(user, []))
        user_rows.append(row)
    return {"since": since, "until": now, "users": user_rows, "groups": group_rows}


def to_csv(report: dict[str, Any]) -> str:
    """One row per user, then one per group: scope,name,groups,gpu_hours,leases,suspends."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["scope", "name", "groups", "gpu_hours", "leases", "suspends"])
    for row in report["users"]:
        writer.writerow(
            [
                "user",
                row["user"],
                " ".join(row["groups"]),
                f"{row['gpu_hours']:.4f}",
                row["leases"],
                row["suspends"],
            ]
        )
    for row in report["groups"]:
        writer.writerow(
            ["group", row["group"], "", f"{row['gpu_hours']:.4f}", row["leases"], row["suspends"]]
        )
    return out.getvalue()
