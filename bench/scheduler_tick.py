"""The scheduler's tick, and a request joining the queue, with many queued requests. Not a test.

    .venv/bin/python bench/scheduler_tick.py [--queued 1000] [--slots 200] [--users 400]

A full pool (``--slots`` granted leases) and ``--queued`` waiting requests from ``--users`` users,
some of them in a class with a quota and class hours. Measures, in one process with no I/O, the
median CPU time (the machine may be shared) of a ``Tick`` (expiry, idle and quota checks, the
queue's order) and of a ``RequestLease`` that joins the queue and reads its position (``--burst`` of
them between two ticks), the first read of the positions after a tick, and a release whose slot goes
to the first in line. To compare two versions in one sitting, run this file with ``PYTHONPATH``
pointing at the other checkout (older layouts had ``broker.scheduler`` instead of
``broker.core.scheduler``).
"""

from __future__ import annotations

import argparse
import statistics
import time

try:
    from broker.core.groups import ClassSession, GroupConfig
    from broker.core.scheduler import (
        Heartbeat,
        Policy,
        Release,
        RequestLease,
        Scheduler,
        SlotState,
        Tick,
    )
except ImportError:  # a checkout from before broker/ was grouped by concern
    from broker.classes import ClassSession, GroupConfig  # type: ignore[no-redef]
    from broker.scheduler import (  # type: ignore[no-redef]
        Heartbeat,
        Policy,
        Release,
        RequestLease,
        Scheduler,
        SlotState,
        Tick,
    )

MON_9 = 4 * 86400 + 9 * 3600  # a Monday, 09:00 UTC


def build(slots: int, queued: int, users: int) -> tuple[Scheduler, float]:
    """A full pool and a long queue; returns the scheduler and the time of the last event."""
    members = frozenset(f"u{i}" for i in range(0, users, 4))  # a quarter of the users: a class
    group = GroupConfig(
        "cls",
        members=members,
        max_slots_per_user=2,
        gpu_hours_per_day=8.0,
        priority=1,
        sessions=(ClassSession(frozenset({0}), 9 * 60, 11 * 60, 4),),
    )
    policy = Policy(
        heartbeat_timeout=1e9,
        max_leases_per_user=10,
        idle_suspend_after=1e9,
        idle_suspend_when_queued=1e9,
        max_lease=1e9,
        **(
            {"max_queued_per_user": 1000}
            if "max_queued_per_user" in Policy.__dataclass_fields__
            else {}
        ),
    )
    s = Scheduler(
        [SlotState(f"h{i % 8}/{i}", f"h{i % 8}", "a100") for i in range(slots)],
        policy,
        groups=(group,),
    )
    now = MON_9
    for i in range(slots + queued):
        now += 0.01
        s.handle(RequestLease(f"l{i}", f"u{i % users}", "a100", f"k{i}", now))
    for i in range(slots):
        s.handle(Heartbeat(f"l{i}", now, busy=True, last_activity=now))
    return s, now


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=200)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--burst", type=int, default=10, help="requests between two ticks")
    args = parser.parse_args()
    s, now = build(args.slots, args.queued, args.users)
    ticks, firsts, joins, releases = [], [], [], []
    extra = args.slots + args.queued
    for r in range(args.rounds):
        now += 1.0
        t0 = time.process_time()
        s.handle(Tick(now))
        ticks.append(time.process_time() - t0)
        t0 = time.process_time()
        s.positions()  # the first read of the order after time passed
        firsts.append(time.process_time() - t0)
        for j in range(args.burst):
            lease_id = f"x{r}.{j}"
            user = f"u{(extra + r * args.burst + j) % args.users}"
            t0 = time.process_time()
            s.handle(RequestLease(lease_id, user, "a100", f"kx{r}.{j}", now))
            s.position(lease_id)
            joins.append(time.process_time() - t0)
        holder = s.slots()[r % args.slots].lease_id
        t0 = time.process_time()
        s.handle(Release(holder, now))
        releases.append(time.process_time() - t0)
    print(
        f"{args.slots} slots, all granted; {args.queued} queued requests from {args.users} users "
        f"(a quarter in a class in session); CPU ms, median of {args.rounds} rounds"
    )
    print(f"  Tick (expiry, idle and quota checks)       {median_ms(ticks):8.3f} ms")
    print(f"  positions, first read after the tick       {median_ms(firsts):8.3f} ms")
    print(f"  RequestLease that queues, + its position   {median_ms(joins):8.3f} ms")
    print(f"  Release whose slot goes to the queue       {median_ms(releases):8.3f} ms")


if __name__ == "__main__":
    main()
