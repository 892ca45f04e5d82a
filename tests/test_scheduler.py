"""The pure scheduler: plain functions, no event loop, no clock; plus a hypothesis state machine."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.scheduler import (
    Dropped,
    Expired,
    Granted,
    Heartbeat,
    Policy,
    Queued,
    Refused,
    Release,
    Released,
    RequestLease,
    Scheduler,
    SlotState,
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
    assert s.handle(Tick(18.5)) == [Expired("1", "s0"), Granted("2", "s0")]
    assert s.lease("1") is None


def test_queue_timeout_drops() -> None:
    s = make("a", queue_timeout=30)
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


class SchedulerMachine(RuleBasedStateMachine):
    """Random requests, releases, heartbeats and ticks; the invariants hold after every step."""

    @initialize(
        kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4),
        drained=st.lists(st.booleans(), min_size=4, max_size=4),
        limit=st.integers(1, 3),
    )
    def setup(self, kinds: list[str], drained: list[bool], limit: int) -> None:
        slots = [SlotState(f"s{i}", "h", k, drained=drained[i]) for i, k in enumerate(kinds)]
        policy = Policy(heartbeat_timeout=10, queue_timeout=50, max_leases_per_user=limit)
        self.s = Scheduler(slots, policy)
        self.now = 0.0
        self.count = 0
        self.ids: list[str] = []

    @rule(kind=st.sampled_from((*KINDS, "any")), user=st.sampled_from(USERS))
    def request(self, kind: str, user: str) -> None:
        self.count += 1
        lease_id = f"l{self.count}"
        decisions = self.s.handle(RequestLease(lease_id, user, kind, "k", self.now))
        if kind != "any" and kind not in self.s.kinds:
            assert decisions == [Refused(lease_id, decisions[0].reason)]
        else:
            self.ids.append(lease_id)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(self.ids))
        self.s.handle(Release(lease_id, self.now))

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), busy=st.booleans())
    def heartbeat(self, data: st.DataObject, busy: bool) -> None:
        lease_id = data.draw(st.sampled_from(self.ids))
        self.s.handle(Heartbeat(lease_id, self.now, busy, self.now))

    @rule(dt=st.floats(0, 30))
    def tick(self, dt: float) -> None:
        self.now += dt
        for decision in self.s.handle(Tick(self.now)):
            if isinstance(decision, Expired | Dropped):
                assert self.s.lease(decision.lease_id) is None

    @invariant()
    def one_lease_per_slot(self) -> None:
        holders = [lease.slot_id for lease in self.s.leases() if lease.state == "granted"]
        assert len(holders) == len(set(holders))
        for slot in self.s.slots():
            if slot.lease_id is not None:
                lease = self.s.lease(slot.lease_id)
                assert lease is not None and lease.slot_id == slot.id

    @invariant()
    def per_user_limit(self) -> None:
        for user in USERS:
            assert self.s.held_by(user) <= self.s.policy.max_leases_per_user

    @invariant()
    def nothing_waits_for_a_free_fitting_slot(self) -> None:
        for lease in self.s.queue():
            if self.s.held_by(lease.user) >= self.s.policy.max_leases_per_user:
                continue
            assert not any(fits(lease, slot) for slot in self.s.slots())

    @invariant()
    def positions_without_gaps(self) -> None:
        positions = sorted(self.s.positions().values())
        assert positions == list(range(1, len(positions) + 1))
        assert all(lease.state == "queued" for lease in self.s.queue())


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_scheduler_machine = SchedulerMachine.TestCase
