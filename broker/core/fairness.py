"""Who goes first, and which slots a class in session keeps: the scheduler's policy rules. Pure.

``broker.core.scheduler.Scheduler`` calls ``grant_order`` to sort its queue before it offers free
slots, ``groups_for`` / ``charge_group`` to apply group rules (kinds, slots per user), and
``reservation_needs`` / ``blocked`` to keep reserved slots for classes in session.

Order (``grant_order``), first to last:

1. *aged* requests: waiting for ``aging_after`` or longer (``Policy.aging_after``, by default
   4 x ``idle_suspend_when_queued``, at least 2 minutes), in arrival order, whatever their
   usage or priority, so nobody starves;
2. members of a group whose class session is active (for a kind that group allows);
3. higher group priority (a user's best group; open users 0);
4. less decayed recent usage (GPU-seconds, halved every ``usage_half_life``);
5. arrival (``seq``).

Reservations: while a session of group G is active, ``reserved_slots`` free slots of G's kinds
are kept for G's members who hold none yet: a non-member may take a slot of those kinds only if,
after it, at least ``need`` free slots of G's kinds remain, where ``need`` is the reserved
count less the slots members already hold, and at most the number of members without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from broker.core.groups import GroupConfig
from broker.core.leases import ANY_KIND, Lease
from broker.core.slots import SlotPool


@dataclass(frozen=True)
class GrantContext:
    """What ``grant_order`` needs to know beyond the queued leases (the scheduler builds it)."""

    now: float
    aging_after: float = float("inf")
    usage: Mapping[str, float] = field(default_factory=dict)  # user -> decayed GPU-seconds
    priority: Mapping[str, int] = field(default_factory=dict)  # user -> best group priority
    session_groups: tuple[GroupConfig, ...] = ()  # groups whose class session is active


def grant_order(queued: Iterable[Lease], context: GrantContext | None = None) -> list[Lease]:
    """The order in which queued requests are offered free slots (see the module's docstring).
    Without ``context``: arrival order."""
    if context is None:
        return sorted(queued, key=lambda lease: lease.seq)
    return sorted(queued, key=order_key(context))


def order_key(context: GrantContext) -> Callable[[Lease], tuple]:
    """The sort key of ``grant_order``: a request's place, smallest first (unique: it ends with
    the request's seq). ``context.usage`` and ``context.priority`` are read with ``.get``."""

    per_user: dict[str, tuple[int, float]] = {}  # user -> (-priority, usage), asked once
    in_session: dict[tuple[str, str], int] = {}  # (user, kind) -> 0 if a session serves it

    def key(lease: Lease) -> tuple:
        if context.now - lease.created_at >= context.aging_after:
            return (0, 0, 0, 0.0, lease.seq)
        user = lease.user
        mine = per_user.get(user)
        if mine is None:
            mine = (-context.priority.get(user, 0), context.usage.get(user, 0.0))
            per_user[user] = mine
        session = 1
        if context.session_groups:
            pair = (user, lease.kind)
            if pair not in in_session:
                in_session[pair] = 0 if _in_session(context, user, lease.kind) else 1
            session = in_session[pair]
        return (1, session, mine[0], mine[1], lease.seq)

    return key


def _in_session(context: GrantContext, user: str, kind: str) -> bool:
    """Is ``user`` a member of a group in session that allows ``kind`` (or "any")?"""
    return any(
        user in group.members and (kind == ANY_KIND or group.allows(kind))
        for group in context.session_groups
    )


def groups_for(user: str, groups: Iterable[GroupConfig]) -> tuple[GroupConfig, ...]:
    """The groups ``user`` is a member of, highest priority first (then file order)."""
    mine = [group for group in groups if user in group.members]
    return tuple(sorted(mine, key=lambda group: -group.priority))


def charge_group(
    kind: str, groups: tuple[GroupConfig, ...], held: Mapping[str, int]
) -> GroupConfig | None:
    """The first of a user's ``groups`` that allows ``kind`` and has room under its
    ``max_slots_per_user`` (``held``: group name -> the user's granted leases charged to it)."""
    for group in groups:
        if group.allows(kind) and held.get(group.name, 0) < group.max_slots_per_user:
            return group
    return None


def quota_hours(groups: tuple[GroupConfig, ...]) -> float | None:
    """A user's daily GPU-hours: the most generous of their groups' (None: no limit, also when
    one of their groups sets none, or when they are in no group)."""
    if not groups or any(group.gpu_hours_per_day is None for group in groups):
        return None
    return max(group.gpu_hours_per_day or 0.0 for group in groups)


@dataclass(frozen=True)
class Reservation:
    """A class in session: ``need`` free slots of ``group``'s kinds are kept for its members."""

    group: GroupConfig
    need: int


def reservation_needs(
    session_groups: Iterable[GroupConfig], holders: Iterable[tuple[str, str]], now: float
) -> list[Reservation]:
    """One Reservation per group in session that still needs slots. ``holders``: (user, slot
    kind) of every granted lease."""
    holders = list(holders)
    out = []
    for group in session_groups:
        session = group.in_session(now)
        if session is None or session.reserved_slots <= 0:
            continue
        served = [user for user, kind in holders if user in group.members and group.allows(kind)]
        waiting_members = len(group.members) - len(set(served))
        need = min(session.reserved_slots - len(served), waiting_members)
        if need > 0:
            out.append(Reservation(group, need))
    return out


def blocked(
    user: str, kind: str, reservations: Iterable[Reservation], free: Mapping[str, int]
) -> bool:
    """True when granting ``user`` a slot of ``kind`` would eat into a reservation of a group
    they are not a member of. ``free``: kind -> free grantable slots of that kind."""
    for reservation in reservations:
        group = reservation.group
        if user in group.members or not group.allows(kind):
            continue
        available = sum(n for k, n in free.items() if group.allows(k))
        if available - 1 < reservation.need:
            return True
    return False


def pick_slot(
    pool: SlotPool,
    lease: Lease,
    groups: tuple[GroupConfig, ...],
    held: Mapping[str, int],
    reservations: list[Reservation],
) -> tuple[str, str | None] | None:
    """The grantable slot ``lease`` may take (on its ``prefer_host`` if one is free there,
    else the first in pool order) and the name of the group charged, or None. ``groups``: the
    user's; ``held``: group name -> the user's leases charged to it."""
    free = pool.free_counts() if reservations else {}
    kinds = pool.free_kinds() if lease.kind == ANY_KIND else [lease.kind]
    best: tuple[tuple[bool, int], str | None] | None = None  # (rank, group charged)
    for kind in kinds:
        rank = pool.rank(kind, lease.prefer_host)
        if rank is None or (best is not None and rank > best[0]):
            continue
        group = None
        if groups:
            charged = charge_group(kind, groups, held)
            if charged is None:
                continue
            group = charged.name
        if reservations and blocked(lease.user, kind, reservations, free):
            continue
        best = (rank, group)
    if best is None:
        return None
    return pool.id_at(best[0][1]), best[1]

