"""The scheduler's rules added for a pool of users who do not trust each other (issues 8, 9, 10):
a cap on waiting requests, "kernel may still run" releases, quota and max_lease orders a busy
kernel must obey, idle-while-queued only for a slot the queue could get, idle time from the
grant. Plain functions, no event loop, no clock."""

from __future__ import annotations

from broker.core.fairness import GrantContext, grant_order
from broker.core.scheduler import (
    Expired,
    FenceNeeded,
    Granted,
    Heartbeat,
    Policy,
    Queued,
    Refused,
    Release,
    Released,
    RequestLease,
    Scheduler,
    SetDrain,
    SlotState,
    SuspendIdle,
    Tick,
)


def req(lease_id: str, user: str, kind: str = "a", now: float = 0.0) -> RequestLease:
    return RequestLease(lease_id, user, kind, f"k-{lease_id}", now)


def test_a_user_may_have_only_so_many_requests_waiting() -> None:
    s = Scheduler(
        [SlotState("s0", "h1", "a")], Policy(heartbeat_timeout=1e9, max_queued_per_user=2)
    )
    assert s.handle(req("1", "ann")) == [Granted("1", "s0")]
    assert s.handle(req("2", "bob")) == [Queued("2", 1)]
    assert s.handle(req("3", "bob")) == [Queued("3", 2)]
    [refused] = s.handle(req("4", "bob"))
    assert refused.code == "queue_full" and "2 requests waiting" in refused.reason
    assert s.lease("4") is None and s.queued_by("bob") == 2  # nothing stored
    assert s.handle(req("5", "cy")) == [Queued("5", 3)]  # others still queue
    assert s.handle(Release("2", 1.0)) == [Released("2", None)]
    assert s.handle(req("6", "bob", now=2.0)) == [Queued("6", 3)]  # room again


def test_a_request_granted_at_once_does_not_count_as_waiting() -> None:
    slots = [SlotState("s0", "h1", "a"), SlotState("s1", "h1", "b")]
    s = Scheduler(slots, Policy(heartbeat_timeout=1e9, max_queued_per_user=1))
    s.handle(req("1", "ann", "a"))
    assert s.handle(req("2", "bob", "a")) == [Queued("2", 1)]
    assert s.handle(req("3", "bob", "b")) == [Granted("3", "s1")]  # needs no place in line


def test_kernel_may_run_release_fences_the_slot_first() -> None:
    s = Scheduler([SlotState("s0", "h1", "a")], Policy(heartbeat_timeout=1e9))
    s.handle(req("1", "ann"))
    s.handle(req("2", "bob", now=1.0))
    decisions = s.handle(Release("1", 2.0, "kernel_may_run"))
    assert decisions == [Released("1", "s0", "kernel_may_run"), FenceNeeded("s0", "1", "h1", "k-1")]
    assert s.slot_state("s0") == "fencing" and s.lease("2").state == "queued"


def test_a_forced_order_not_obeyed_ends_the_lease_and_fences_it() -> None:
    policy = Policy(heartbeat_timeout=30, max_lease=100, busy_grace=10)
    s = Scheduler([SlotState("s0", "h1", "a")], policy)
    s.handle(req("1", "ann"))
    for now in range(10, 101, 10):  # busy all along, heartbeats on time
        s.handle(Heartbeat("1", now, busy=True, last_activity=now))
    assert s.handle(Tick(100)) == [SuspendIdle("1", "max_lease")]  # busy or not
    assert s.lease("1").forced_at == 100
    for now in (110, 120, 130, 140):  # the client keeps working: the order stands
        s.handle(Heartbeat("1", now, busy=True, last_activity=now))
        assert s.handle(Tick(now)) == []
    # 100 + busy_grace 10 + heartbeat_timeout 30 = 140: past it, the broker ends the lease
    s.handle(Heartbeat("1", 141, busy=True, last_activity=141))
    assert s.handle(Tick(141)) == [
        Expired("1", "s0", "suspend_ignored"),
        FenceNeeded("s0", "1", "h1", "k-1"),
    ]


def test_a_drained_hosts_idle_kernel_is_left_alone_for_a_queue_it_cannot_serve() -> None:
    """Issue 10: draining a host suspended another user's idle kernel there, for a queued request
    that the drained host could not serve anyway."""
    policy = Policy(heartbeat_timeout=1e9, idle_suspend_after=900, idle_suspend_when_queued=30)
    s = Scheduler([SlotState("a/0", "hostA", "sim"), SlotState("b/0", "hostB", "sim")], policy)
    s.handle(req("ann", "ann", "sim"))  # on hostA
    s.handle(req("bob", "bob", "sim"))  # on hostB
    s.handle(SetDrain("hostA", True, 1.0))
    s.handle(Heartbeat("ann", 2.0, last_activity=0.0))
    s.handle(Heartbeat("bob", 2.0, busy=True, last_activity=2.0))
    s.handle(req("cy", "cy", "sim", now=3.0))
    assert s.handle(Tick(100.0)) == []  # ann's slot, once free, could not go to cy: drained
    s.handle(SetDrain("hostA", False, 101.0))
    assert s.handle(Tick(102.0)) == [SuspendIdle("ann", "idle_while_queued")]


def test_idle_time_never_counts_from_before_the_grant() -> None:
    """Issue 10: a fresh lease showed "idle for 1m22s" beside "lease age 23s": the provisioner
    reported its session's last activity from before the grant (the queue wait)."""
    s = Scheduler([SlotState("s0", "h1", "a")], Policy(heartbeat_timeout=1e9))
    s.handle(req("1", "ann", now=0.0))
    s.handle(req("2", "bob", now=10.0))  # waits
    s.handle(Release("1", 82.0))  # bob's lease is granted at 82
    s.handle(Heartbeat("2", 105.0, last_activity=10.0))  # its session was last used at 10
    lease = s.lease("2")
    assert lease.granted_at == 82.0 and lease.last_activity == 82.0


def test_positions_follow_the_grant_order() -> None:
    s = Scheduler([SlotState("s0", "h1", "a")], Policy(heartbeat_timeout=1e9))
    s.handle(req("0", "x"))
    for i, user in enumerate(["u1", "u2", "u3", "u1", "u4"], start=1):
        s.handle(req(str(i), user, now=float(i)))
    context = GrantContext(now=5.0, aging_after=s.policy.aging)
    expected = [lease.id for lease in grant_order(s.waiting(), context)]
    assert [lease.id for lease in s.queue()] == expected
    assert [s.position(lease_id) for lease_id in expected] == [1, 2, 3, 4, 5]
    assert s.handle(Release("0", 6.0))[1] == Granted(expected[0], "s0")


def test_refusals_name_the_reason_for_the_user() -> None:
    s = Scheduler([SlotState("s0", "h1", "a")], Policy(max_queued_per_user=1))
    [refused] = s.handle(req("1", "ann", "gpu"))
    assert refused == Refused("1", refused.reason) and "no slot of kind 'gpu'" in refused.reason
