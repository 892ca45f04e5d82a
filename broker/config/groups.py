"""``[[groups]]`` of the broker config: classes and teams, checked into ``GroupConfig``s.

Pure. ``broker.config.loader`` calls ``check_groups`` with its checker; the result goes into
``Config.groups`` and from there to the scheduler (``broker.core.groups`` defines the objects).
"""

from __future__ import annotations

import re
from collections.abc import Collection

from broker.config.policy import optional_duration
from broker.config.toml_check import Checker
from broker.core.groups import DAYS, ClassSession, GroupConfig

NAME = re.compile(r"[A-Za-z0-9._-]+")
_HHMM = re.compile(r"(\d{2}):(\d{2})")

_GROUP_KEYS = ("name", "members", "teachers", "kinds", "max_slots_per_user")
_GROUP_KEYS += ("gpu_hours_per_day", "priority", "sessions", "hub_group", "teacher_hub_group")
_GROUP_KEYS += ("release_after_cell",)
_SESSION_KEYS = ("days", "start", "end", "reserved_slots")


def check_groups(
    checker: Checker,
    data: dict,
    kinds: Collection[str] | None,
    slot_kinds: list[str],
    has_hub: bool = False,
) -> tuple[GroupConfig, ...] | None:
    """Check ``[[groups]]`` of the parsed document. ``kinds``: the pool's kinds, or None when a
    host's slots are probed later (``gpus = "auto"``: kinds and slot counts are not checked).
    ``slot_kinds``: the kind of every declared slot (for reserved_slots). ``has_hub``: the
    config names a JupyterHub (``[identity] jupyterhub``), which ``hub_group`` needs. None on
    problems."""
    raw = data.get("groups")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(g, dict) for g in raw):
        checker.issue(("groups",), "must be an array of tables: write each group as [[groups]]")
        return None
    before = len(checker.issues)
    names: dict[str, int] = {}
    groups = []
    for i, table in enumerate(raw):
        group = _group(checker, table, ("groups", i), kinds, slot_kinds, has_hub)
        if group is None:
            continue
        if group.name in names:
            checker.issue(
                ("groups", i, "name"),
                f"duplicate group name {group.name!r} (also groups[{names[group.name]}]): "
                "give each group its own name",
            )
        names.setdefault(group.name, i)
        groups.append(group)
    return tuple(groups) if len(checker.issues) == before else None


def _group(
    checker: Checker,
    table: dict,
    path: tuple,
    kinds: Collection[str] | None,
    slot_kinds: list[str],
    has_hub: bool,
) -> GroupConfig | None:
    checker.known_keys(table, _GROUP_KEYS, path)
    before = len(checker.issues)
    name = checker.typed(table, "name", path, str, '"physics101"')
    if "name" not in table:
        checker.issue(path, 'missing name: add name = "physics101" (letters, digits, . _ -)')
    elif name is not None and not NAME.fullmatch(name):
        checker.issue((*path, "name"), f"bad group name {name!r}: use letters, digits, . _ - only")
    members = _names(checker, table, "members", path, '["ana", "ben"]')
    teachers = _names(checker, table, "teachers", path, '["prof"]')
    group_kinds = _names(checker, table, "kinds", path, '["mig-1g.10gb"]')
    for j, kind in enumerate(group_kinds):
        if kinds is not None and kind not in kinds:
            known = ", ".join(repr(k) for k in sorted(kinds))
            checker.issue(
                (*path, "kinds"),
                f"kinds[{j}]: no slot of kind {kind!r} in the pool; kinds: {known}",
            )
    most = checker.typed(table, "max_slots_per_user", path, int, "1")
    if most is not None and most < 1:
        checker.issue((*path, "max_slots_per_user"), f"must be 1 or more, got {most}")
    hours = table.get("gpu_hours_per_day")
    if hours is not None:
        if isinstance(hours, bool) or not isinstance(hours, int | float):
            checker.issue(
                (*path, "gpu_hours_per_day"), f"must be a number like 2 or 1.5, got {hours!r}"
            )
        elif not 0 < hours <= 24:
            checker.issue(
                (*path, "gpu_hours_per_day"), f"must be more than 0 and at most 24, got {hours}"
            )
    priority = checker.typed(table, "priority", path, int, "10")
    release = optional_duration(checker, table, "release_after_cell", path)
    capacity = None  # unknown when slots are probed later or a kind is wrong anyway
    if kinds is not None and all(kind in kinds for kind in group_kinds):
        capacity = sum(1 for k in slot_kinds if not group_kinds or k in group_kinds)
    sessions = _sessions(checker, table, path, capacity)
    hub_groups = {}
    for key in ("hub_group", "teacher_hub_group"):
        value = checker.typed(table, key, path, str, '"ml-101"')
        if value is not None and not value.strip():
            checker.issue((*path, key), "must be the name of a JupyterHub group, not empty")
        elif value is not None and not has_hub:
            checker.issue(
                (*path, key),
                f"{key} needs a hub: add [identity] jupyterhub = {{ url = "
                '"http://127.0.0.1:8081" } (docs/jupyterhub.md)',
            )
        hub_groups[key] = value
    if len(checker.issues) > before or sessions is None:
        return None
    return GroupConfig(
        name=name,
        members=frozenset(members),
        teachers=frozenset(teachers),
        kinds=tuple(group_kinds),
        max_slots_per_user=most if most is not None else 1,
        gpu_hours_per_day=float(hours) if hours is not None else None,
        priority=priority or 0,
        sessions=sessions,
        hub_group=hub_groups["hub_group"],
        teacher_hub_group=hub_groups["teacher_hub_group"],
        release_after_cell=release,
    )


def _names(checker: Checker, table: dict, key: str, path: tuple, example: str) -> list[str]:
    """A list of distinct non-empty strings (usernames, kinds)."""
    value = checker.typed(table, key, path, list, example)
    if value is None:
        return []
    seen: set[str] = set()
    out = []
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            checker.issue((*path, key), f"{key}[{j}] must be a non-empty string, got {item!r}")
        elif item in seen:
            checker.issue((*path, key), f"{key}[{j}]: {item!r} is listed twice: list it once")
        else:
            seen.add(item)
            out.append(item)
    return out


def _sessions(
    checker: Checker, table: dict, path: tuple, capacity: int | None
) -> tuple[ClassSession, ...] | None:
    raw = table.get("sessions")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        checker.issue(
            (*path, "sessions"),
            "must be an array of tables: write each as [[groups.sessions]]",
        )
        return None
    before = len(checker.issues)
    out = []
    for k, session in enumerate(raw):
        where = (*path, "sessions", k)
        checker.known_keys(session, _SESSION_KEYS, where)
        days = _names(checker, session, "days", where, '["mon", "wed"]')
        bad = [d for d in days if d.lower() not in DAYS]
        if bad:
            checker.issue((*where, "days"), f"unknown day {bad[0]!r}: use {', '.join(DAYS)}")
        if "days" not in session:
            checker.issue(where, 'missing days: add days = ["mon", "wed"]')
        start = _minute(checker, session, "start", where)
        end = _minute(checker, session, "end", where)
        if start is not None and end is not None and end <= start:
            checker.issue(
                (*where, "end"),
                "end must be after start on the same day (UTC): split a session that "
                "crosses midnight into two",
            )
        reserved = checker.typed(session, "reserved_slots", where, int, "8") or 0
        if reserved < 0:
            checker.issue((*where, "reserved_slots"), f"must be 0 or more, got {reserved}")
        elif capacity is not None and reserved > capacity:
            checker.issue(
                (*where, "reserved_slots"),
                f"reserved_slots ({reserved}) is more than the {capacity} slots of the group's "
                "kinds in the pool: lower it or add slots",
            )
        if len(checker.issues) == before and start is not None and end is not None:
            day_set = frozenset(DAYS.index(d.lower()) for d in days)
            out.append(ClassSession(day_set, start, end, reserved))
    return tuple(out) if len(checker.issues) == before else None


def _minute(checker: Checker, table: dict, key: str, path: tuple) -> int | None:
    """ "HH:MM" (UTC, 00:00..24:00) -> minutes after midnight."""
    if key not in table:
        checker.issue(path, f'missing {key}: add {key} = "09:00" (UTC)')
        return None
    value = checker.typed(table, key, path, str, '"09:00"')
    if value is None:
        return None
    match = _HHMM.fullmatch(value.strip())
    if match:
        hours, minutes = int(match.group(1)), int(match.group(2))
        if minutes < 60 and (hours < 24 or (hours == 24 and minutes == 0)):
            return hours * 60 + minutes
    checker.issue((*path, key), f'bad time {value!r}: write "HH:MM" in UTC, like "09:00"')
    return None
