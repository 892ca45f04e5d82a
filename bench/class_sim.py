"""One class day on a virtual clock, played against the real scheduler core (``broker.core``).

``bench/class_day.py`` (the sweep, the table and the plot) and ``bench/class_rehearsal.py`` (to
set a rehearsal beside the model) call ``simulate``. The broker's side is the real
``Scheduler``: every request, heartbeat, release and tick goes through ``Scheduler.handle`` at
its virtual time, and its decisions (grants, suspend orders) drive the day. Around it, this
module plays what the rest of the system does, with the costs a rehearsal measured:

- the daemon ticks the scheduler every ``tick`` s;
- each kernel's provisioner heartbeats every ``heartbeat_interval`` from its grant; the broker
  learns that a cell started or ended with the next heartbeat, and an order it decided goes
  out with the next heartbeat reply; a kernel that is busy (or still waking) then refuses it;
- a suspend takes ``Costs.suspend`` from the order's arrival to the slot's release; a wake
  takes ``Costs.cold`` (a new kernel) or ``Costs.resume_same`` / ``resume_other`` (restore on
  the checkpoint's host / on another) from the grant to the cell's start; a cell asked for while
  its kernel saves waits for the save, then for a slot (as the session proxy holds it);
- a launch on a host where the student has no warm interpreter (the day starts with none; a
  launch leaves one, which ends ``warm`` s after its last launch) starts the kernel the cold
  way: its wake takes ``Costs.cold_no_warm`` / ``resume_no_warm``, and its suspend
  ``suspend_no_warm``;
- the culler (JupyterHub's idle culler) looks every half of its timeout and ends kernels idle
  that long: their state is lost, and the next cell starts a new kernel.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

from class_model import INF, Costs, Day, Plan, PolicySpec, Waits, blocked_cells, plan

from broker.core.events import Granted, Heartbeat, Release, RequestLease, SuspendIdle, Tick
from broker.core.policy import Policy
from broker.core.scheduler import Scheduler
from broker.core.slots import SlotState
from provisioner.settings import ProvisionerSettings

KIND = "gpu"
IDLE, QUEUED, WAKING, RUNNING, SAVING = "idle", "queued", "waking", "running", "saving"


def scheduler_policy(spec: PolicySpec) -> Policy:
    """The scheduler's ``Policy`` for ``spec`` (no expiry, no queue timeout: nobody dies)."""
    never = INF
    return Policy(
        heartbeat_timeout=never,
        queue_timeout=0.0,
        idle_suspend_after=spec.idle_suspend_after or never,
        idle_suspend_when_queued=spec.idle_suspend_when_queued or never,
        release_after_cell=spec.release_after_cell,
        suspend_retry=spec.suspend_retry,
        max_queued_per_user=3,
    )


@dataclass
class Student:
    index: int
    plan: Plan
    state: str = IDLE  # IDLE: no kernel holds a slot (new, suspended or culled)
    cell: int = 0  # the cell asked for or running
    asked_at: float = 0.0
    lease_id: str | None = None
    leases: int = 0
    beat0: float = 0.0  # heartbeats at beat0 + k * interval
    busy: bool = False
    last_activity: float = 0.0
    saved_host: str | None = None  # where its state is, while it holds no slot
    warm_until: dict[str, float] = field(default_factory=dict)  # host -> its warm one's end
    launched_cold: bool = False  # the kernel that holds (or held) the slot found no warm one
    has_state: bool = False  # a kernel ran cells whose state it would keep
    waiting_cell: bool = False  # a cell asked for while the kernel saved
    order_pending: bool = False
    beat_due: float | None = None
    suspends: int = 0
    resumes: int = 0
    lost: int = 0  # culled with state


@dataclass
class DayResult:
    """What one simulated day gives: waits, and counts per student."""

    policy: str
    slots: int
    students: int
    waits: Waits = field(default_factory=Waits)
    cells: int = 0
    suspends: int = 0
    resumes: int = 0
    lost: int = 0  # kernels ended with their state (culler)
    students_lost: int = 0  # notebooks whose state was lost at least once
    wake_kinds: dict[str, int] = field(default_factory=dict)


class ClassDay:
    """The event loop of one day (see the module doc)."""

    def __init__(
        self,
        spec: PolicySpec,
        slots: int,
        students: int,
        day: Day,
        costs: Costs,
        seed: int = 1,
        slots_per_host: int = 4,
        tick: float = 1.0,
        compress: float = 1.0,
        cost_seed: int | None = None,
        warm: float = ProvisionerSettings.warm,
    ) -> None:
        spec = spec.compressed(compress)  # ``day`` is already: ``Day.compressed``
        self.spec, self.day, self.costs, self.tick = spec, day, costs, tick
        self.warm = warm  # a machine setting, like the costs: never compressed
        self.interval = spec.heartbeat_interval
        self.culler = spec.culler
        pool = [
            SlotState(
                f"h{i // slots_per_host}/{i % slots_per_host}", f"h{i // slots_per_host}", KIND
            )
            for i in range(slots)
        ]
        self.scheduler = Scheduler(pool, scheduler_policy(spec))
        self.host_of = {slot.id: slot.host for slot in pool}
        self.rng = random.Random(f"class-day-costs:{seed if cost_seed is None else cost_seed}")
        self.students = [Student(i, plan(day, seed, i)) for i in range(students)]
        self.by_lease: dict[str, Student] = {}
        self.result = DayResult(spec.name, slots, students)
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = 0

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> DayResult:
        for s in self.students:
            self._at(s.plan.arrival, "ask", s.index)
        self._at(0.0, "tick", -1)
        if self.culler:
            self._at(self.culler / 2, "cull", -1)
        handlers = {
            "ask": self._ask,
            "ready": self._ready,
            "cell_end": self._cell_end,
            "beat": self._beat,
            "saved": self._saved,
        }
        while self._heap:
            now, _, what, who = heapq.heappop(self._heap)
            if now >= self.day.length:
                break
            if what == "tick":
                self._decide(self.scheduler.handle(Tick(now)), now)
                self._at(now + self.tick, "tick", -1)
            elif what == "cull":
                self._cull(now)
                assert self.culler is not None
                self._at(now + self.culler / 2, "cull", -1)
            else:
                handlers[what](self.students[who], now)
        self._close_day()
        return self.result

    def _at(self, when: float, what: str, who: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, what, who))

    def _decide(self, decisions: list, now: float) -> None:
        for d in decisions:
            if isinstance(d, Granted):
                self._granted(self.by_lease[d.lease_id], d.slot_id, now)
            elif isinstance(d, SuspendIdle):
                s = self.by_lease.get(d.lease_id)
                if s is not None and s.lease_id == d.lease_id:
                    s.order_pending = True
                    self._beat_at(s, self._next_beat(s, now))

    # -- a student's cells ---------------------------------------------------------------------

    def _ask(self, s: Student, now: float) -> None:
        """The student runs cell ``s.cell``."""
        s.asked_at = now
        s.last_activity = now
        if s.state == RUNNING:
            self._start_cell(s, now)
        elif s.state == SAVING:
            s.waiting_cell = True
        else:
            self._request(s, now)

    def _request(self, s: Student, now: float) -> None:
        s.leases += 1
        lease_id = f"s{s.index}-{s.leases}"
        s.lease_id, s.state = lease_id, QUEUED
        self.by_lease[lease_id] = s
        event = RequestLease(lease_id, f"s{s.index}", KIND, f"k{s.index}", now, s.saved_host)
        self._decide(self.scheduler.handle(event), now)

    def _granted(self, s: Student, slot_id: str, now: float) -> None:
        s.state, s.beat0 = WAKING, now
        host = self.host_of[slot_id]
        s.launched_cold = now >= s.warm_until.get(host, -INF)
        s.warm_until[host] = now + self.warm
        if not s.has_state:
            kind = "cold"
        else:
            kind = "resume_same" if host == s.saved_host else "resume_other"
            s.resumes += 1
        if s.launched_cold:
            kind = "resume_no_warm" if s.has_state else "cold_no_warm"
        self.result.wake_kinds[kind] = self.result.wake_kinds.get(kind, 0) + 1
        s.saved_host = host
        self._at(now + self.costs.draw(kind, self.rng), "ready", s.index)

    def _ready(self, s: Student, now: float) -> None:
        s.state = RUNNING
        self._start_cell(s, now)

    def _start_cell(self, s: Student, now: float) -> None:
        self.result.waits.waits.append(now - s.asked_at)
        self.result.cells += 1
        s.busy, s.has_state = True, True
        s.last_activity = now
        self._beat_at(s, self._next_beat(s, now))
        self._at(now + s.plan.cells[s.cell], "cell_end", s.index)

    def _cell_end(self, s: Student, now: float) -> None:
        s.busy = False
        s.last_activity = now
        self._beat_at(s, self._next_beat(s, now))
        s.cell += 1
        if s.cell < len(s.plan.cells):
            self._at(now + s.plan.thinks[s.cell - 1], "ask", s.index)

    # -- the provisioner's heartbeats and the kernel's saves -----------------------------------

    def _next_beat(self, s: Student, now: float) -> float:
        k = math.ceil((now - s.beat0) / self.interval - 1e-9)
        return s.beat0 + max(0, k) * self.interval

    def _beat_at(self, s: Student, when: float) -> None:
        if s.beat_due is not None and s.beat_due <= when:
            return  # one already due first: it will say the latest
        s.beat_due = when
        self._at(when, "beat", s.index)

    def _beat(self, s: Student, now: float) -> None:
        if s.beat_due != now or s.lease_id is None or s.state in (IDLE, QUEUED):
            return
        s.beat_due = None
        beat = Heartbeat(s.lease_id, now, s.busy, s.last_activity)
        self._decide(self.scheduler.handle(beat), now)
        if s.order_pending:
            s.order_pending = False
            if s.state == RUNNING and not s.busy:  # a busy or waking kernel refuses
                s.state = SAVING
                step = "suspend_no_warm" if s.launched_cold else "suspend"
                self._at(now + self.costs.draw(step, self.rng), "saved", s.index)

    def _cull(self, now: float) -> None:
        assert self.culler is not None
        for s in self.students:
            if s.state == RUNNING and not s.busy and now - s.last_activity >= self.culler:
                s.state = SAVING
                s.has_state = False  # the culler ends the kernel: its state is gone
                s.lost += 1
                self._at(now + self.costs.draw("kill", self.rng), "saved", s.index)

    def _saved(self, s: Student, now: float) -> None:
        assert s.lease_id is not None
        reason = "suspended" if s.has_state else "released"
        if s.has_state:
            s.suspends += 1
        else:
            s.saved_host = None
        lease_id, s.lease_id, s.state, s.busy = s.lease_id, None, IDLE, False
        s.order_pending, s.beat_due = False, None
        self._decide(self.scheduler.handle(Release(lease_id, now, reason)), now)
        if s.waiting_cell:
            s.waiting_cell = False
            self._request(s, now)

    # -- the end of the day --------------------------------------------------------------------

    def _close_day(self) -> None:
        end = self.day.length
        r = self.result
        for s in self.students:
            if s.state in (QUEUED, WAKING) or s.waiting_cell:
                r.waits.waits.append(end - s.asked_at)  # still waiting: as long as it waited
                r.waits.blocked += blocked_cells(s.plan, s.cell, s.asked_at, end)
            r.suspends += s.suspends
            r.resumes += s.resumes
            r.lost += s.lost
            r.students_lost += s.lost > 0


def simulate(
    spec: PolicySpec,
    slots: int,
    students: int,
    costs: Costs,
    day: Day | None = None,
    seed: int = 1,
    **options: float,
) -> DayResult:
    """One day of ``students`` on ``slots`` under ``spec`` (see ``ClassDay`` for ``options``)."""
    return ClassDay(spec, slots, students, day or Day(), costs, seed, **options).run()  # type: ignore[arg-type]
