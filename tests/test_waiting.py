"""Why a queued request waits (``broker.core.waiting``): one case per reason a user can see in
the waiting cell, each built with the real scheduler, and the cell's line the provisioner makes
of it. Plain values, no clock."""

from __future__ import annotations

from broker.client import Lease as ClientLease
from broker.core.groups import ClassSession, GroupConfig
from broker.core.scheduler import (
    Heartbeat,
    Policy,
    Reconfigure,
    RequestLease,
    Scheduler,
    SetDrain,
    SlotState,
    Tick,
)
from broker.core.waiting import CODES, Waiting, why_waiting
from provisioner.lease_keeper import waiting_line

THURSDAY_10H = 10 * 3600.0  # 1970-01-01 was a Thursday
seen: set[str] = set()


def req(lease_id: str, user: str, kind: str = "a", now: float = 0.0) -> RequestLease:
    return RequestLease(lease_id, user, kind, f"k-{lease_id}", now)


def why(s: Scheduler, lease_id: str, now: float) -> Waiting:
    lease = s.lease(lease_id)
    assert lease is not None and lease.state == "queued"
    out = why_waiting(s, lease, now)
    seen.add(out.code)
    return out


def test_all_slots_busy_names_the_idle_rule_and_when_a_slot_frees() -> None:
    policy = Policy(heartbeat_timeout=1e9, idle_suspend_when_queued=30.0)
    s = Scheduler([SlotState("s0", "h1", "a"), SlotState("s1", "h2", "a")], policy)
    s.handle(req("1", "ann"))
    s.handle(req("2", "bob"))
    s.handle(req("3", "cy", now=5.0))
    s.handle(Heartbeat("1", 10.0, busy=False, last_activity=10.0))
    w = why(s, "3", 12.0)
    assert w.code == "busy"
    assert w.message.startswith("all 2 'a' GPU slots are in use")
    assert "idle for 30s while others wait is suspended" in w.message
    assert w.until == 30.0  # bob's kernel: idle since its grant at 0


def test_slots_held_by_running_cells_give_no_time() -> None:
    s = Scheduler([SlotState("s0", "h1", "a")], Policy(heartbeat_timeout=1e9))
    s.handle(req("1", "ann"))
    s.handle(Heartbeat("1", 1.0, busy=True))
    s.handle(req("2", "bob", now=2.0))
    w = why(s, "2", 3.0)
    assert w == Waiting("busy", "the one 'a' GPU slot is in use; each is running a cell", None)


def test_a_long_lease_near_its_end_is_named() -> None:
    s = Scheduler([SlotState("s0", "h1", "a")], Policy(heartbeat_timeout=1e9, max_lease=600.0))
    s.handle(req("1", "ann"))
    s.handle(Heartbeat("1", 1.0, busy=True))
    s.handle(req("2", "bob", now=2.0))
    w = why(s, "2", 100.0)
    assert w.code == "busy" and "longest one allowed (10m) in 8m20s" in w.message
    assert w.until == 600.0


def test_a_drained_pool_says_so_and_names_the_host() -> None:
    s = Scheduler([SlotState("s0", "gpu1", "a")], Policy(heartbeat_timeout=1e9))
    s.handle(SetDrain("gpu1", True, 0.0))
    s.handle(req("1", "ann", now=1.0))
    w = why(s, "1", 2.0)
    assert w.code == "drained" and "drained for maintenance (gpu1)" in w.message
    s.handle(SetDrain("gpu1", False, 3.0))
    assert s.lease("1").state == "granted"  # type: ignore[union-attr]


def test_a_host_that_stopped_answering_is_named() -> None:
    s = Scheduler([SlotState("s0", "gpu1", "a")], Policy(heartbeat_timeout=10.0))
    s.handle(req("1", "ann"))
    s.handle(Tick(20.0))  # no heartbeat: expired, the slot is fenced before a new grant
    s.handle(req("2", "bob", now=21.0))
    w = why(s, "2", 22.0)
    assert w.code == "unreachable" and "(gpu1)" in w.message


def test_a_user_at_their_limit_is_told_to_free_one_of_their_own() -> None:
    slots = [SlotState(f"s{i}", "h1", "a") for i in range(3)]
    s = Scheduler(slots, Policy(heartbeat_timeout=1e9, max_leases_per_user=2))
    s.handle(req("1", "ann"))
    s.handle(req("2", "ann"))
    s.handle(req("3", "ann"))
    w = why(s, "3", 1.0)
    assert w.code == "user_limit" and "you hold 2 GPU slots already" in w.message
    assert "%gpu suspend" in w.message  # a free slot exists: only the user can unblock it


def test_a_student_at_their_class_limit_is_told_which_class() -> None:
    group = GroupConfig("ml-101", members=frozenset({"ann"}), max_slots_per_user=1)
    slots = [SlotState("s0", "h1", "a"), SlotState("s1", "h1", "a")]
    s = Scheduler(slots, Policy(heartbeat_timeout=1e9), groups=[group])
    s.handle(req("1", "ann"))
    s.handle(req("2", "ann"))
    w = why(s, "2", 1.0)
    assert w.code == "class_limit" and "1 GPU slot your class allows per student (ml-101)" in (
        w.message
    )


def test_slots_kept_for_a_class_in_session_say_until_when() -> None:
    session = ClassSession(frozenset({3}), 9 * 60, 11 * 60, reserved_slots=1)
    group = GroupConfig("ml-101", members=frozenset({"stu"}), sessions=(session,))
    s = Scheduler(
        [SlotState("s0", "h1", "a"), SlotState("s1", "h1", "a")],
        Policy(heartbeat_timeout=1e9),
        groups=[group],
    )
    now = THURSDAY_10H
    s.handle(req("1", "ann", now=now))  # one free slot left, kept for the class
    s.handle(req("2", "bob", now=now))
    w = why(s, "2", now + 1)
    assert w == Waiting(
        "reserved",
        "the free 'a' GPU slots are kept for class ml-101 while it is in session, until 11:00 UTC",
        11 * 3600.0,
    )
    s.handle(Tick(11 * 3600.0))  # the class ends: bob gets the slot
    assert s.lease("2").state == "granted"  # type: ignore[union-attr]


def test_a_request_behind_others_for_a_free_slot_counts_them() -> None:
    # A free slot and a queue happen together only between events (the next one grants it):
    # built here by hand, the scheduler's state as a reader may catch it.
    s = Scheduler([SlotState("s0", "h1", "a")], Policy(heartbeat_timeout=1e9))
    s.handle(req("1", "ann"))
    s.handle(req("2", "bob", now=1.0))
    s.handle(req("3", "cy", now=2.0))
    holder = s.lease("1")
    assert holder is not None
    s._end(holder, 3.0)  # the slot is free; the grant comes with the next event
    assert why(s, "2", 3.0) == Waiting(
        "ahead", "a 'a' GPU slot is free: it is being granted to you"
    )
    w = why(s, "3", 3.0)
    assert w.code == "ahead" and "1 request before yours" in w.message


def test_a_kind_retired_by_a_reload_is_gone() -> None:
    policy = Policy(heartbeat_timeout=1e9)
    s = Scheduler([SlotState("s0", "h1", "a"), SlotState("s1", "h1", "b")], policy)
    s.handle(req("1", "ann", "b"))
    s.handle(req("2", "bob", "b", now=1.0))
    s.handle(Reconfigure((SlotState("s0", "h1", "a"),), policy, (), 2.0))  # no more "b"
    w = why(s, "2", 3.0)
    assert w.code == "gone" and "no 'b' GPU slot is left in the pool" in w.message


def test_every_reason_has_a_case() -> None:
    """Each code of ``CODES`` is reached by one of the cases above (run them all again here, so
    that this holds whatever ``-k`` selects)."""
    seen.clear()
    cases = [
        f for name, f in globals().items() if name.startswith("test_") and "reason" not in name
    ]
    for case in cases:
        if case.__code__.co_argcount == 0 and "cell" not in case.__name__:
            case()
    missing = set(CODES) - seen
    assert not missing, f"reasons with no test above: {sorted(missing)}"


def test_the_waiting_cell_shows_the_reason_and_the_expected_time() -> None:
    lease = ClientLease(
        id="l",
        user="bob",
        kind="any",
        kernel_id="k",
        state="queued",
        position=2,
        queue_length=3,
        waiting={"code": "busy", "message": "all 2 GPU slots are in use", "until": 142.0},
    )
    assert waiting_line(lease, "GPU slot", 100.0) == (
        "Waiting for a free GPU slot: position 2 of 3 in the queue (all 2 GPU slots are in use; "
        "a slot is expected in about 40 s)"
    )
    plain = ClientLease(id="l", user="b", kind="any", kernel_id="k", state="queued", position=1,
                        queue_length=1)  # fmt: skip
    assert waiting_line(plain, "GPU slot", 0.0) == (
        "Waiting for a free GPU slot: position 1 of 1 in the queue"
    )
