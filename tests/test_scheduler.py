"""The pure scheduler: plain functions, no event loop, no clock; plus a hypothesis state machine."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.core.groups import ClassSession, GroupConfig
from broker.core.scheduler import (
    Dropped,
    Expired,
    Fenced,
    FenceNeeded,
    Granted,
    Heartbeat,
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
    fits,
)


def pool(*kinds: str, drained: tuple[str, ...] = ()) -> list[SlotState]:
    return [
        SlotState(f"s{i}", "h1", kind, drained=f"s{i}" in drained) for i, kind in enumerate(kinds)
    ]


def make(*kinds: str, **policy: float) -> Scheduler:
    return Scheduler(pool(*kinds), Policy(**policy))


def req(lease_id: str, kind: str = "any", user: str = "u", now: float = 0.0) -> RequestLease:
    return RequestLease(lease_id, user, kind, f"k-{lease_id}", now)


def test_grant_first_free_slot_of_kind() -> None:
    s = make("a100", "mig", "a100")
    assert s.handle(req("1", "a100")) == [Granted("1", "s0")]
    assert s.handle(req("2", "a100")) == [Granted("2", "s2")]
    assert s.handle(req("3", "any")) == [Granted("3", "s1")]
    lease = s.lease("1")
    assert lease is not None and lease.state == "granted" and lease.granted_at == 0.0
    assert s.free_slots() == []


def test_queue_fifo_with_positions() -> None:
    s = make("a100")
    s.handle(req("1"))
    assert s.handle(req("2", user="v")) == [Queued("2", 1)]
    assert s.handle(req("3", user="w")) == [Queued("3", 2)]
    assert s.positions() == {"2": 1, "3": 2}
    assert s.handle(Release("1", 5.0)) == [Released("1", "s0"), Granted("2", "s0")]
    assert s.positions() == {"3": 1}


def test_later_request_that_fits_goes_ahead() -> None:
    s = make("a100", "mig")
    s.handle(req("1", "a100"))
    s.handle(req("2", "mig"))
    assert s.handle(req("3", "a100")) == [Queued("3", 1)]
    assert s.handle(req("4", "mig")) == [Queued("4", 2)]
    # The mig slot frees: the later mig request goes ahead of the earlier a100 one.
    assert s.handle(Release("2", 1.0)) == [Released("2", "s1"), Granted("4", "s1")]
    assert s.positions() == {"3": 1}


def test_unknown_kind_refused_with_kinds_listed() -> None:
    s = make("a100", "mig-1g")
    [decision] = s.handle(req("1", "h100"))
    assert isinstance(decision, Refused)
    assert "'h100'" in decision.reason and "'a100', 'mig-1g'" in decision.reason
    assert s.lease("1") is None and s.queue() == []


def test_drained_slot_not_granted() -> None:
    s = Scheduler(pool("a100", "a100", drained=("s0",)))
    assert s.handle(req("1")) == [Granted("1", "s1")]
    assert s.handle(req("2")) == [Queued("2", 1)]


def test_per_user_limit_queues_until_release() -> None:
    s = make("a", "a", "a", max_leases_per_user=2)
    assert s.handle(req("1")) == [Granted("1", "s0")]
    assert s.handle(req("2")) == [Granted("2", "s1")]
    assert s.handle(req("3")) == [Queued("3", 1)]
    # Another user takes the free slot although alice's request is older.
    assert s.handle(req("4", user="bob")) == [Granted("4", "s2")]
    assert s.handle(Release("4", 1)) == [Released("4", "s2")]
    assert s.positions() == {"3": 1}
    assert s.handle(Release("1", 2)) == [Released("1", "s0"), Granted("3", "s0")]


def test_heartbeat_keeps_lease_and_timeout_expires_it() -> None:
    s = make("a", heartbeat_timeout=10)
    s.handle(req("1", now=0))
    s.handle(req("2", user="v", now=1))
    assert s.handle(Heartbeat("1", 8, busy=True, last_activity=7.5)) == []
    assert s.handle(Tick(15)) == []
    lease = s.lease("1")
    assert lease is not None and lease.busy and lease.last_activity == 7.5
    # Expiry fences the slot: it is granted again only once the kernel is surely gone.
    assert s.handle(Tick(18.5)) == [Expired("1", "s0"), FenceNeeded("s0", "1", "h1", "k-1")]
    assert s.lease("1") is None and s.slot_state("s0") == "fencing"
    assert s.handle(Fenced("s0", True, 19)) == [Granted("2", "s0")]


def test_queue_timeout_drops() -> None:
    s = make("a", queue_timeout=30, idle_suspend_when_queued=900)
    s.handle(Heartbeat("nope", 0))  # unknown lease: nothing happens
    s.handle(req("1", now=0))
    s.handle(req("2", now=10))
    s.handle(req("3", now=20))
    assert s.handle(Tick(45)) == [Dropped("2", "queue_timeout")]
    assert s.positions() == {"3": 1}


def test_release_of_queued_and_unknown() -> None:
    s = make("a")
    s.handle(req("1"))
    s.handle(req("2"))
    assert s.handle(Release("2", 1)) == [Released("2", None)]
    assert s.handle(Release("2", 2)) == []
    assert s.queue() == []


def test_restore_keeps_slots_and_order() -> None:
    s = make("a", "b")
    s.handle(req("1", "a"))
    s.handle(req("2", "a", user="v"))
    s.handle(req("3", "b", user="w"))
    s.handle(req("4", "a", user="x"))
    saved = s.leases()
    t = make("a", "b", heartbeat_timeout=5)
    assert t.restore(saved, now=100) == []
    assert [lease.id for lease in t.queue()] == ["2", "4"]
    assert t.lease("1").last_heartbeat == 100  # fresh deadline after a restart
    assert t.handle(req("5", "a")).pop() == Queued("5", 3)
    # A slot gone from the config: its lease goes back to the queue, in seq order.
    u = make("a")
    u.restore(saved, now=100)
    assert [lease.id for lease in u.queue()] == ["2", "3", "4"]


def test_fits() -> None:
    s = make("a100")
    s.handle(req("q", "a100"))
    queued = s.lease("q")
    assert queued is not None and fits(queued, SlotState("y", "h", "a100"))
    assert not fits(queued, SlotState("y", "h", "mig"))
    assert not fits(queued, SlotState("y", "h", "a100", drained=True))
    assert not fits(queued, SlotState("y", "h", "a100", lease_id="z"))


# -- the state machine -----------------------------------------------------------------------

KINDS = ("a100", "mig")
USERS = ("ann", "bob", "cy")
HOSTS = ("h0", "h1")


class SchedulerMachine(RuleBasedStateMachine):
    """Random requests, releases, heartbeats, ticks, drains, reloads, fencing answers and resets,
    with users in a class; the invariants hold after every step."""

    @initialize(
        kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=5),
        drained=st.lists(st.booleans(), min_size=5, max_size=5),
        limit=st.integers(1, 3),
        grouped=st.booleans(),
        group_kinds=st.sampled_from(((), ("mig",), ("a100", "mig"))),
        per_user=st.integers(1, 2),
        hours=st.sampled_from((None, 0.01, 0.05)),
        session_end=st.integers(0, 20),
        reserved=st.integers(0, 3),
    )
    def setup(
        self,
        kinds: list[str],
        drained: list[bool],
        limit: int,
        grouped: bool,
        group_kinds: tuple[str, ...],
        per_user: int,
        hours: float | None,
        session_end: int,
        reserved: int,
    ) -> None:
        self.config_slots = [
            SlotState(f"s{i}", HOSTS[i % 2], k, drained=drained[i]) for i, k in enumerate(kinds)
        ]
        groups: tuple[GroupConfig, ...] = ()
        if grouped:  # time starts on a Thursday at 00:00 UTC: the class is in session at first
            session = ClassSession(frozenset(range(7)), 0, session_end, reserved)
            groups = (
                GroupConfig(
                    "cls",
                    members=frozenset({"ann", "bob"}),
                    kinds=group_kinds,
                    max_slots_per_user=per_user,
                    gpu_hours_per_day=hours,
                    priority=1,
                    sessions=(session,) if session_end else (),
                ),
            )
        self.policy = Policy(
            heartbeat_timeout=10,
            queue_timeout=200,
            max_leases_per_user=limit,
            idle_suspend_after=100,
            idle_suspend_when_queued=20,
            max_lease=300,
            max_queued_per_user=2,
        )
        self.groups = groups
        self.s = Scheduler(self.config_slots, self.policy, groups=groups)
        self.now = 0.0
        self.count = 0
        self.ids: list[str] = []
        self.added = 0

    def apply(self, event: object) -> list:
        """Handle ``event``; check each grant against the slot states seen before it."""
        before = {slot.id: self.s.slot_state(slot.id) for slot in self.s.slots()}
        holder = {slot.id: slot.lease_id for slot in self.s.slots()}
        decisions = self.s.handle(event)  # type: ignore[arg-type]
        for decision in decisions:
            if not isinstance(decision, Granted):
                continue
            lease = self.s.lease(decision.lease_id)
            slot = self.s.slot(decision.slot_id)
            assert lease is not None and slot is not None
            assert not slot.drained and not slot.retired
            was = before.get(slot.id, "free")
            if was == "busy":  # freed by this very event
                assert isinstance(event, Release) and holder[slot.id] == event.lease_id
            elif was in ("fencing", "unreachable"):
                assert isinstance(event, Fenced | ResetSlot) and event.slot_id == slot.id
            elif was == "drained":
                assert isinstance(event, SetDrain | Reconfigure)
            quota = self.s.quota_seconds(lease.user)
            assert quota is None or self.s.usage_today(lease.user, self.now) < quota
            for group in self.groups:  # a non-member's grant left the class its reserved slots
                if lease.user not in group.members and group.allows(slot.kind):
                    need, free = self.reservation(group)
                    assert free >= need, (group, need, free)
        return decisions

    def reservation(self, group: GroupConfig) -> tuple[int, int]:
        """(slots the class in session still needs, free slots of its kinds), from the spec."""
        session = group.in_session(self.now)
        if session is None:
            return 0, 0
        served = [
            other.user
            for other in self.s.leases()
            if other.slot_id is not None
            and other.user in group.members
            and group.allows(self.s.slot(other.slot_id).kind)  # type: ignore[union-attr]
        ]
        need = min(session.reserved_slots - len(served), len(group.members) - len(set(served)))
        free = sum(
            1
            for slot in self.s.slots()
            if self.s.slot_state(slot.id) == "free" and not slot.retired and group.allows(slot.kind)
        )
        return need, free

    @rule(kind=st.sampled_from((*KINDS, "any")), user=st.sampled_from(USERS))
    def request(self, kind: str, user: str) -> None:
        self.count += 1
        lease_id = f"l{self.count}"
        waiting = self.s.queued_by(user)
        decisions = self.apply(RequestLease(lease_id, user, kind, "k", self.now))
        queue_full = [d for d in decisions if isinstance(d, Refused) and d.code == "queue_full"]
        if decisions and isinstance(decisions[0], Refused) and not queue_full:
            assert decisions == [Refused(lease_id, decisions[0].reason)]
            assert self.s.lease(lease_id) is None
        elif queue_full:  # it would have had to wait, and the user has enough waiting
            assert decisions[-1] == queue_full[0] and queue_full[0].lease_id == lease_id
            assert waiting >= self.policy.max_queued_per_user
            assert self.s.lease(lease_id) is None
            assert all(getattr(d, "lease_id", None) != lease_id for d in decisions[:-1])
        else:
            assert kind == "any" or kind in self.s.kinds
            self.ids.append(lease_id)

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), reason=st.sampled_from(("released", "suspended")))
    def release(self, data: st.DataObject, reason: str) -> None:
        lease_id = data.draw(st.sampled_from(self.ids))
        lease = self.s.lease(lease_id)
        decisions = self.apply(Release(lease_id, self.now, reason))
        if lease is not None and lease.slot_id is not None:
            assert decisions[0] == Released(lease_id, lease.slot_id, reason)
            assert (
                self.s.slot_state(lease.slot_id) != "fencing"
                if self.s.slot(lease.slot_id)
                else True
            )

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), busy=st.booleans())
    def heartbeat(self, data: st.DataObject, busy: bool) -> None:
        lease_id = data.draw(st.sampled_from(self.ids))
        self.apply(Heartbeat(lease_id, self.now, busy, self.now))

    @rule(dt=st.floats(0, 40))
    def tick(self, dt: float) -> None:
        self.now += dt
        for decision in self.apply(Tick(self.now)):
            if isinstance(decision, Expired | Dropped):
                assert self.s.lease(decision.lease_id) is None
            if isinstance(decision, FenceNeeded):
                assert self.s.slot_state(decision.slot_id) in ("fencing", "unreachable")
            if isinstance(decision, SuspendIdle):
                lease = self.s.lease(decision.lease_id)
                assert lease is not None and lease.state == "granted"
                if decision.reason in ("idle", "idle_while_queued"):
                    assert not lease.busy

    @rule(host=st.sampled_from(HOSTS), drained=st.booleans())
    def drain(self, host: str, drained: bool) -> None:
        self.apply(SetDrain(host, drained, self.now))
        for slot in self.s.slots():
            if slot.host == host:
                assert slot.drained == drained

    @rule(data=st.data())
    def fenced(self, data: st.DataObject) -> None:
        fences = self.s.fences()
        if not fences:
            return
        fence = data.draw(st.sampled_from(fences))
        ok = data.draw(st.booleans())
        self.apply(Fenced(fence.slot_id, ok, self.now))
        if not ok:
            assert self.s.slot_state(fence.slot_id) == "unreachable"

    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        fences = self.s.fences()
        if fences:
            self.apply(ResetSlot(data.draw(st.sampled_from(fences)).slot_id, self.now))

    @rule(remove=st.booleans(), kind=st.sampled_from(KINDS), data=st.data())
    def reconfigure(self, remove: bool, kind: str, data: st.DataObject) -> None:
        if remove and len(self.config_slots) > 1:
            gone = data.draw(st.sampled_from(self.config_slots))
            self.config_slots = [slot for slot in self.config_slots if slot != gone]
        else:
            self.added += 1
            self.config_slots.append(SlotState(f"n{self.added}", HOSTS[self.added % 2], kind))
        granted = {lease.id: lease.slot_id for lease in self.s.leases() if lease.slot_id}
        self.apply(Reconfigure(tuple(self.config_slots), self.policy, self.groups, self.now))
        for lease_id, slot_id in granted.items():  # nothing dropped, nobody moved
            lease = self.s.lease(lease_id)
            assert lease is not None and lease.slot_id == slot_id

    @invariant()
    def one_lease_per_slot(self) -> None:
        holders = [lease.slot_id for lease in self.s.leases() if lease.state == "granted"]
        assert len(holders) == len(set(holders))
        for slot in self.s.slots():
            if slot.lease_id is not None:
                lease = self.s.lease(slot.lease_id)
                assert lease is not None and lease.slot_id == slot.id
        for lease in self.s.leases():
            if lease.slot_id is not None:
                slot = self.s.slot(lease.slot_id)
                assert slot is not None and slot.lease_id == lease.id

    @invariant()
    def limits(self) -> None:
        for user in USERS:
            assert self.s.held_by(user) <= self.s.policy.max_leases_per_user
            for group in self.s.groups_of(user):
                held = self.s.held_in_group(user, group.name)
                assert held <= group.max_slots_per_user
                charged = [
                    lease
                    for lease in self.s.leases()
                    if lease.user == user and lease.group == group.name
                ]
                assert held == len(charged)
            for lease in self.s.leases():
                if lease.user == user and lease.slot_id is not None and self.s.groups_of(user):
                    slot = self.s.slot(lease.slot_id)
                    assert slot is not None
                    assert any(group.allows(slot.kind) for group in self.s.groups_of(user))

    @invariant()
    def nothing_waits_for_a_free_fitting_slot(self) -> None:
        free = [
            slot
            for slot in self.s.slots()
            if self.s.slot_state(slot.id) == "free" and not slot.retired
        ]
        for lease in self.s.queue():
            if self.s.held_by(lease.user) >= self.s.policy.max_leases_per_user:
                continue
            quota = self.s.quota_seconds(lease.user)
            if quota is not None and self.s.usage_today(lease.user, self.now) >= quota:
                assert not free  # it would have been dropped when a slot was on offer
                continue
            for slot in free:
                assert not self.could_take(lease, slot, free), (lease, slot)

    def could_take(self, lease: object, slot: SlotState, free: list[SlotState]) -> bool:
        """The rules, written again from the spec: may ``lease`` take the free ``slot``?"""
        user, kind = lease.user, lease.kind  # type: ignore[attr-defined]
        if kind not in ("any", slot.kind):
            return False
        mine = self.s.groups_of(user)
        if mine and not any(
            g.allows(slot.kind) and self.s.held_in_group(user, g.name) < g.max_slots_per_user
            for g in mine
        ):
            return False
        for group in self.groups:
            if user in group.members or not group.allows(slot.kind):
                continue
            need, available = self.reservation(group)
            if available - 1 < need:
                return False
        return True

    @invariant()
    def queued_per_user_capped(self) -> None:
        for user in USERS:
            waiting = [lease for lease in self.s.queue() if lease.user == user]
            assert len(waiting) == self.s.queued_by(user) <= self.policy.max_queued_per_user

    @invariant()
    def positions_without_gaps(self) -> None:
        positions = sorted(self.s.positions().values())
        assert positions == list(range(1, len(positions) + 1))
        assert all(lease.state == "queued" for lease in self.s.queue())


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_scheduler_machine = SchedulerMachine.TestCase


def test_a_resumed_kernel_gets_a_free_slot_on_its_checkpoints_host() -> None:
    s = Scheduler(
        [
            SlotState("h1/0", "h1", "a100"),
            SlotState("h2/0", "h2", "a100"),
            SlotState("h2/1", "h2", "mig"),
        ],
        Policy(max_leases_per_user=9),
    )

    def resume(lease_id: str, kind: str) -> list:
        return s.handle(RequestLease(lease_id, "u", kind, f"k{lease_id}", 0.0, prefer_host="h2"))

    assert resume("1", "a100") == [Granted("1", "h2/0")]  # ahead of h1/0 in pool order
    assert resume("2", "any") == [Granted("2", "h2/1")]
    assert resume("3", "a100") == [Granted("3", "h1/0")]  # none free there: pool order
    assert resume("4", "a100") == [Queued("4", 1)]
    assert s.handle(Release("1", 1.0)) == [Released("1", "h2/0", "released"), Granted("4", "h2/0")]
