"""Issue 3's scheduling rules, one plain function each: quotas, fair order, aging, class
reservations, drain, reload, fencing, idle suspend. No event loop, no clock."""

from __future__ import annotations

from broker.core.fairness import GrantContext, grant_order
from broker.core.groups import ClassSession, GroupConfig
from broker.core.scheduler import (
    Dropped,
    Expired,
    Fenced,
    FenceNeeded,
    Granted,
    Heartbeat,
    Lease,
    Policy,
    Queued,
    Reconfigure,
    Refused,
    Release,
    Released,
    RequestLease,
    ResetSlot,
    Scheduler,
    SetDrain,
    SlotState,
    SuspendIdle,
    Tick,
    UsageRecord,
)

MON_9 = 4 * 86400 + 9 * 3600  # 1970-01-05 (a Monday) 09:00 UTC
HOUR = 3600.0


def slots(*kinds: str, host: str = "h1") -> list[SlotState]:
    return [SlotState(f"s{i}", host, kind) for i, kind in enumerate(kinds)]


def req(lease_id: str, user: str, kind: str = "any", now: float = 0.0) -> RequestLease:
    return RequestLease(lease_id, user, kind, f"k-{lease_id}", now)


CLASS = GroupConfig(
    "cls",
    members=frozenset({"ana", "ben", "cat"}),
    kinds=("mig",),
    max_slots_per_user=1,
    gpu_hours_per_day=2.0,
    priority=5,
    sessions=(ClassSession(frozenset({0, 2}), 9 * 60, 11 * 60, 2),),
)


def test_class_session_active_in_utc_hours() -> None:
    session = CLASS.sessions[0]
    assert session.active(MON_9) and session.active(MON_9 + 2 * HOUR - 1)
    assert not session.active(MON_9 - 1) and not session.active(MON_9 + 2 * HOUR)
    assert session.active(MON_9 + 2 * 86400) and not session.active(MON_9 + 86400)


def test_quota_refusal_says_when_it_resets() -> None:
    s = Scheduler(slots("mig", "mig"), groups=(CLASS,))
    s.restore_usage([UsageRecord("ana", MON_9 - 3 * HOUR, MON_9 - HOUR)])  # 2 h this morning
    [refused] = s.handle(req("1", "ana", "mig", now=MON_9))
    assert refused == Refused(
        "1", "daily quota of 2 GPU-hours used; resets at 00:00 UTC (1970-01-06 00:00 UTC)"
    )
    # the next UTC day it is granted again; yesterday's usage does not count
    assert s.handle(req("2", "ana", "mig", now=MON_9 + 15 * HOUR)) == [Granted("2", "s0")]


def test_lease_crossing_the_quota_is_suspended_on_tick() -> None:
    s = Scheduler(slots("mig"), Policy(heartbeat_timeout=1e9), groups=(CLASS,))
    s.handle(req("1", "ana", "mig", now=MON_9))
    s.handle(Heartbeat("1", MON_9 + HOUR, busy=True, last_activity=MON_9 + HOUR))
    assert s.handle(Tick(MON_9 + HOUR)) == []
    assert s.handle(Tick(MON_9 + 2 * HOUR)) == [SuspendIdle("1", "quota")]  # busy or not
    assert s.handle(Tick(MON_9 + 2 * HOUR + 60)) == []  # once; again after suspend_retry
    assert s.handle(Tick(MON_9 + 2 * HOUR + 300)) == [SuspendIdle("1", "quota")]


def test_queued_request_over_quota_is_dropped_when_a_slot_frees() -> None:
    s = Scheduler(slots("mig"), Policy(heartbeat_timeout=1e9), groups=(CLASS,))
    group = GroupConfig("two", members=frozenset({"ana"}), max_slots_per_user=2)
    s = Scheduler(slots("mig"), Policy(heartbeat_timeout=1e9), groups=(CLASS, group))
    # ana: in two groups; the most generous quota wins (no limit in "two")
    assert s.quota_seconds("ana") is None
    s = Scheduler(slots("mig"), Policy(heartbeat_timeout=1e9), groups=(CLASS,))
    s.handle(req("1", "ben", "mig", now=MON_9))
    s.handle(req("2", "ana", "mig", now=MON_9))
    s.restore_usage([UsageRecord("ana", MON_9 - 3 * HOUR, MON_9 - HOUR)])
    [released, dropped] = s.handle(Release("1", MON_9 + 60))
    assert released == Released("1", "s0") and isinstance(dropped, Dropped)
    assert dropped.reason.startswith("daily quota of 2 GPU-hours used")


def test_group_kinds_and_slots_per_user() -> None:
    s = Scheduler(slots("a100", "mig", "mig"), groups=(CLASS,))
    [refused] = s.handle(req("1", "ana", "a100"))
    assert isinstance(refused, Refused) and "'mig'" in refused.reason and "cls" in refused.reason
    assert s.handle(req("2", "ana", "any")) == [Granted("2", "s1")]  # any: a kind she may use
    assert s.handle(req("3", "ana", "mig")) == [Queued("3", 1)]  # 1 slot per student
    assert s.handle(req("4", "zoe", "any")) == [Granted("4", "s0")]  # open user: any kind
    assert s.held_in_group("ana", "cls") == 1 and s.lease("2").group == "cls"


def test_fair_order_priority_then_usage_then_arrival() -> None:
    def lease(lease_id: str, user: str, seq: int) -> Lease:
        return Lease(lease_id, user, "any", "k", seq, created_at=0.0)

    queued = [lease("a", "heavy", 1), lease("b", "light", 2), lease("c", "vip", 3)]
    context = GrantContext(
        now=10, aging_after=100, usage={"heavy": 5000.0, "light": 10.0}, priority={"vip": 1}
    )
    assert [x.id for x in grant_order(queued, context)] == ["c", "b", "a"]
    assert [x.id for x in grant_order(queued)] == ["a", "b", "c"]  # no context: FIFO
    # aging: past the bound, arrival order wins whatever the usage
    aged = GrantContext(now=200, aging_after=100, usage={"heavy": 5000.0}, priority={"vip": 1})
    assert [x.id for x in grant_order(queued, aged)] == ["a", "b", "c"]


def test_scheduler_serves_light_user_before_heavy_one() -> None:
    s = Scheduler(slots("a"), Policy(heartbeat_timeout=1e9))
    s.restore_usage([UsageRecord("heavy", 0, 3 * HOUR)])
    s.handle(req("0", "x", now=4 * HOUR))
    s.handle(req("1", "heavy", now=4 * HOUR))
    s.handle(req("2", "light", now=4 * HOUR + 1))
    assert s.positions() == {"2": 1, "1": 2}
    assert s.handle(Release("0", 4 * HOUR + 10))[1] == Granted("2", "s0")


def test_aging_serves_a_long_wait_first() -> None:
    s = Scheduler(slots("a"), Policy(heartbeat_timeout=1e9, aging_after=60))
    s.restore_usage([UsageRecord("heavy", 0, 3 * HOUR)])
    s.handle(req("0", "x", now=4 * HOUR))
    s.handle(req("1", "heavy", now=4 * HOUR))
    s.handle(req("2", "light", now=4 * HOUR + 30))
    assert s.positions() == {"2": 1, "1": 2}
    s.handle(Tick(4 * HOUR + 61))  # heavy has waited past the aging bound, light has not
    assert s.positions() == {"1": 1, "2": 2}


def test_reservation_during_class_hours_only() -> None:
    pool = slots("mig", "mig", "mig")
    s = Scheduler(pool, Policy(heartbeat_timeout=1e9), groups=(CLASS,))
    # in session: 2 of 3 mig slots are kept for the class; an outsider gets one only
    assert s.handle(req("1", "zoe", "mig", now=MON_9)) == [Granted("1", "s0")]
    assert s.handle(req("2", "yan", "mig", now=MON_9)) == [Queued("2", 1)]
    assert s.handle(req("3", "ana", "mig", now=MON_9)) == [Granted("3", "s1")]
    assert s.handle(req("4", "yan2", "mig", now=MON_9))[-1] == Queued("4", 2)
    # class members go first in the queue during the session
    s.handle(Release("3", MON_9 + 1))  # ana leaves: the slot stays reserved
    assert s.handle(req("5", "ben", "mig", now=MON_9 + 2)) == [Granted("5", "s1")]
    # after class hours the reservation lifts at the next tick
    decisions = s.handle(Tick(MON_9 + 2 * HOUR))
    assert [d for d in decisions if isinstance(d, Granted)] == [Granted("2", "s2")]
    t = Scheduler(pool, Policy(heartbeat_timeout=1e9), groups=(CLASS,))
    tuesday = MON_9 + 86400
    assert [d for d in t.handle(req("1", "zoe", "mig", now=tuesday))] == [Granted("1", "s0")]
    assert t.handle(req("2", "yan", "mig", now=tuesday)) == [Granted("2", "s1")]


def test_drain_and_undrain() -> None:
    s = Scheduler(slots("a", "a"), Policy(heartbeat_timeout=1e9))
    s.handle(req("1", "u"))
    assert s.handle(SetDrain("h1", True, 1)) == []
    assert s.slot_state("s0") == "busy" and s.slot_state("s1") == "drained"
    assert s.handle(req("2", "v", now=2)) == [Queued("2", 1)]
    assert s.handle(Release("1", 3)) == [Released("1", "s0")]  # nothing new on a drained host
    assert s.handle(SetDrain("h1", False, 4)) == [Granted("2", "s0")]


def test_reconfigure_keeps_leases_and_adds_slots() -> None:
    s = Scheduler(slots("a", "a"), Policy(heartbeat_timeout=1e9))
    s.handle(req("1", "u"))
    s.handle(req("2", "v"))
    s.handle(req("3", "w"))
    new_pool = [SlotState("s1", "h1", "a"), SlotState("n0", "h2", "a")]
    decisions = s.handle(Reconfigure(new_pool, Policy(heartbeat_timeout=1e9), (), 5))
    assert decisions == [Granted("3", "n0")]
    assert s.lease("1").slot_id == "s0" and s.slot("s0").retired  # kept until released
    assert s.handle(Release("1", 6)) == [Released("1", "s0")]
    assert s.slot("s0") is None and [x.id for x in s.slots()] == ["s1", "n0"]


def test_fencing_flow() -> None:
    s = Scheduler(slots("a"), Policy(heartbeat_timeout=10, fence_retry=30))
    s.handle(req("1", "u", now=0))
    s.handle(req("2", "v", now=1))
    fence = FenceNeeded("s0", "1", "h1", "k-1")
    assert s.handle(Tick(11)) == [Expired("1", "s0"), fence]
    assert s.slot_state("s0") == "fencing" and s.free_slots() == []
    assert s.handle(Fenced("s0", False, 12)) == []
    assert s.slot_state("s0") == "unreachable"
    assert s.handle(Tick(30)) == []
    assert s.handle(Tick(42)) == [fence]  # retried every fence_retry
    assert [f.slot_id for f in s.fences()] == ["s0"]
    assert s.handle(Fenced("s0", True, 43)) == [Granted("2", "s0")]
    # an admin reset frees an unreachable slot too; a normal release needs no fencing
    s.handle(Tick(60))
    s.handle(Fenced("s0", False, 61))
    assert s.handle(ResetSlot("s0", 62)) == [] and s.slot_state("s0") == "free"
    s.handle(req("3", "w", now=63))
    assert s.handle(Release("3", 64, "suspended")) == [Released("3", "s0", "suspended")]
    assert s.slot_state("s0") == "free"


def test_idle_decisions() -> None:
    policy = Policy(
        heartbeat_timeout=1e9, idle_suspend_after=900, idle_suspend_when_queued=30, max_lease=5000
    )
    s = Scheduler(slots("a", "b"), policy)
    s.handle(req("idle", "u", "a", now=0))
    s.handle(req("busy", "v", "b", now=0))
    s.handle(Heartbeat("busy", 100, busy=True, last_activity=0))
    s.handle(Heartbeat("idle", 100, busy=False, last_activity=10))
    assert s.handle(Tick(100)) == []  # idle 90 s, nobody waits
    s.handle(req("want-a", "w", "a", now=100))
    assert s.handle(Tick(101)) == [SuspendIdle("idle", "idle_while_queued")]
    assert s.lease("idle").suspend_requested_at == 101
    assert s.handle(Tick(400)) == []  # decided once ...
    assert s.handle(Tick(401)) == [SuspendIdle("idle", "idle_while_queued")]  # ... again 5 min on
    assert s.handle(Tick(1000)) == [SuspendIdle("idle", "idle")]  # idle 990 s, queue or not
    assert SuspendIdle("busy", "idle") not in s.handle(Tick(4999))  # busy: never for idleness
    assert s.handle(Tick(5000)) == [SuspendIdle("busy", "max_lease")]
    assert s.slot_state("s1") == "busy"


def test_a_kernel_used_after_the_suspend_order_gets_a_new_order_once_idle_again():
    from broker.core.scheduler import Heartbeat, Policy, RequestLease, Scheduler, SuspendIdle, Tick
    from broker.core.slots import SlotState

    policy = Policy(heartbeat_timeout=60, queue_timeout=0, idle_suspend_after=10)
    sched = Scheduler([SlotState("h/0", "h", "sim")], policy, 1)
    sched.handle(RequestLease("L", "ann", "sim", "k", now=0))
    sched.handle(Heartbeat("L", now=5, busy=False, last_activity=0))
    assert [d for d in sched.handle(Tick(now=11)) if isinstance(d, SuspendIdle)]
    # a cell started just as the order was on its way: the kernel refused, and ran the cell
    sched.handle(Heartbeat("L", now=12, busy=True, last_activity=11.5))
    sched.handle(Heartbeat("L", now=14, busy=False, last_activity=13))
    assert not [d for d in sched.handle(Tick(now=15)) if isinstance(d, SuspendIdle)]
    assert [d for d in sched.handle(Tick(now=24)) if isinstance(d, SuspendIdle)]
