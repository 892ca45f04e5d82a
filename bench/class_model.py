"""The class day that both capacity benches play, and what they report about it.

``bench/class_day.py`` plays it on a virtual clock against the real scheduler core;
``bench/class_rehearsal.py`` plays it with real kernels, compressed in time. Both take from here
the day (think times and GPU cells drawn from seeded log-normal distributions), the policies
compared, the suspend/resume costs (fitted from a rehearsal, saved as JSON), and the figures:
waits at a cell's start, their percentiles, and the capacity (the most students per slot whose
p95 wait stays within the limit).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

INF = math.inf
WAIT_LIMIT = 30.0  # s: the p95 wait at a cell's start that a class still accepts
MIN_HEARTBEAT = 0.1  # s: the shortest heartbeat a compressed day's broker asks for


@dataclass(frozen=True)
class Day:
    """A class day: each student opens the notebook within ``arrival`` s, then runs a GPU cell
    (log-normal, mean ``cell_mean``) after each think (log-normal, mean ``think_mean``) until
    ``length``. ``compress`` > 1 plays it faster (the rehearsal): every time divided by it."""

    length: float = 7200.0
    think_mean: float = 240.0
    think_sigma: float = 0.8
    cell_mean: float = 30.0
    cell_sigma: float = 0.5
    arrival: float = 300.0

    def compressed(self, factor: float) -> Day:
        return replace(
            self,
            length=self.length / factor,
            think_mean=self.think_mean / factor,
            cell_mean=self.cell_mean / factor,
            arrival=self.arrival / factor,
        )


def lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    """A log-normal draw with the given mean (not median) and shape ``sigma``."""
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


@dataclass(frozen=True)
class Plan:
    """One student's day as drawn: the first cell at ``arrival``; cell k runs ``cells[k]`` s and
    is followed by ``thinks[k]`` s of thinking before cell k+1."""

    arrival: float
    cells: tuple[float, ...]
    thinks: tuple[float, ...]


def plan(day: Day, seed: int, student: int) -> Plan:
    """Student ``student``'s day for ``seed``: the same draws whatever else runs."""
    rng = random.Random(f"class-day:{seed}:{student}")
    arrival = rng.uniform(0, day.arrival)
    cells: list[float] = []
    thinks: list[float] = []
    t = arrival
    while t < day.length:
        cells.append(lognormal(rng, day.cell_mean, day.cell_sigma))
        thinks.append(lognormal(rng, day.think_mean, day.think_sigma))
        t += cells[-1] + thinks[-1]
    return Plan(arrival, tuple(cells), tuple(thinks))


@dataclass(frozen=True)
class PolicySpec:
    """A way to share the pool, in real-day seconds (``None``: never). ``culler``: JupyterHub's
    idle culler: a kernel idle this long is ended (its state lost), checked every half of it."""

    name: str
    label: str
    idle_suspend_after: float | None = None
    idle_suspend_when_queued: float | None = None
    release_after_cell: float | None = None
    culler: float | None = None
    heartbeat_interval: float = 10.0

    suspend_retry: float = 300.0

    def compressed(self, factor: float) -> PolicySpec:
        """This policy for a day ``factor`` times shorter: every duration divided by it, but a
        heartbeat no more often than every ``MIN_HEARTBEAT`` s (a busier one costs the
        kernels' CPU more than it tells), and ``release_after_cell`` no shorter than it (the
        broker's config refuses that)."""
        if factor == 1.0:
            return self

        def div(seconds: float | None) -> float | None:
            return None if seconds is None else seconds / factor

        beat = max(MIN_HEARTBEAT, self.heartbeat_interval / factor)
        release = div(self.release_after_cell)
        return replace(
            self,
            idle_suspend_after=div(self.idle_suspend_after),
            idle_suspend_when_queued=div(self.idle_suspend_when_queued),
            release_after_cell=None if release is None else max(beat, release),
            culler=div(self.culler),
            heartbeat_interval=beat,
            suspend_retry=max(beat, self.suspend_retry / factor),
        )

    def broker_policy(self) -> dict[str, str]:
        """The ``[policy]`` keys of a broker config for this policy (a duration of ``None``
        becomes a day: never within the class)."""

        def text(seconds: float | None) -> str:
            return f"{(86400.0 if seconds is None else seconds) * 1000:.0f}ms"

        out = {
            "heartbeat_interval": text(self.heartbeat_interval),
            "idle_suspend_after": text(self.idle_suspend_after),
            "idle_suspend_when_queued": text(self.idle_suspend_when_queued),
            "suspend_retry": text(self.suspend_retry),
        }
        if self.release_after_cell is not None:
            out["release_after_cell"] = text(self.release_after_cell)
        return out


POLICIES: dict[str, PolicySpec] = {
    spec.name: spec
    for spec in (
        PolicySpec("static", "static allocation"),
        PolicySpec("culler", "JupyterHub idle culler, 10 min (state lost)", culler=600.0),
        PolicySpec("idle15", "suspend after 15 min idle", 900.0, 900.0),
        PolicySpec("pressure30", "suspend after 30 s idle while others wait", 900.0, 30.0),
        PolicySpec(
            "per_cell",
            "per-cell binding: released 10 s after a cell while others wait",
            900.0,
            30.0,
            release_after_cell=10.0,
            heartbeat_interval=2.0,
        ),
    )
}


@dataclass
class Costs:
    """Seconds each step takes, as samples drawn from (the rehearsal's measurements):
    ``cold``: grant to the first cell's start, a new kernel; ``resume_same`` / ``resume_other``:
    grant to the cell's start when the kernel comes back on the host of its checkpoint / on
    another (copy included); ``suspend``: the order's arrival to the slot's release;
    ``kill``: a culled kernel's end to the slot's release. ``cold_no_warm`` /
    ``resume_no_warm`` / ``suspend_no_warm``: the same for a kernel launched where its user had
    no warm interpreter (``gpu_kernel.warm``: their first launch on that host), the cold way:
    its start or restore imports what a warm one had, and so does its save."""

    cold: list[float]
    resume_same: list[float]
    resume_other: list[float]
    suspend: list[float]
    kill: list[float]
    cold_no_warm: list[float] = field(default_factory=list)
    resume_no_warm: list[float] = field(default_factory=list)
    suspend_no_warm: list[float] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    STEPS = (
        "cold",
        "resume_same",
        "resume_other",
        "suspend",
        "kill",
        "cold_no_warm",
        "resume_no_warm",
        "suspend_no_warm",
    )
    # a step without samples takes this one's (costs measured before warm interpreters
    # were told apart; a rehearsal where every new kernel found none, or none found one)
    FALLBACK = {
        "cold_no_warm": "cold",
        "resume_no_warm": "resume_other",
        "suspend_no_warm": "suspend",
        "cold": "cold_no_warm",
        "resume_other": "resume_same",
        "resume_same": "resume_other",
        "kill": "suspend",
    }

    def draw(self, step: str, rng: random.Random) -> float:
        samples: list[float] = getattr(self, step)
        return samples[rng.randrange(len(samples))]

    def medians(self) -> dict[str, float]:
        return {step: percentile(getattr(self, step), 50) for step in self.STEPS}

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, **{s: getattr(self, s) for s in self.STEPS}}

    @classmethod
    def pooled(cls, samples: dict[str, list[float]], source: dict[str, Any]) -> Costs:
        """Costs from ``samples`` (step -> seconds), each step without any taking its
        ``FALLBACK``'s; ValueError naming the steps still without samples."""
        pooled = {step: list(samples.get(step, [])) for step in cls.STEPS}
        for step in cls.STEPS:
            if not pooled[step] and step in cls.FALLBACK:
                pooled[step] = list(pooled[cls.FALLBACK[step]])
        missing = [step for step in cls.STEPS if not pooled[step]]
        if missing:
            raise ValueError(f"no samples for {', '.join(missing)}")
        return cls(**pooled, source=source)

    @classmethod
    def load(cls, path: Path) -> Costs:
        data = json.loads(path.read_text())
        samples = {s: [float(x) for x in data.get(s) or []] for s in cls.STEPS}
        try:
            return cls.pooled(samples, data["source"])
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def fixed(cls, resume: float, suspend: float, cold: float) -> Costs:
        samples = {"cold": [cold], "resume_same": [resume], "resume_other": [resume]}
        samples.update(suspend=[suspend], kill=[min(suspend, 0.5)])
        return cls.pooled(samples, {"fixed": True})


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``inf`` entries count as the longest waits); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Waits:
    """The waits at cells' starts of one day. ``blocked``: cells a student could not even ask
    for because an earlier one still waited when the day ended (each counts as an endless wait,
    so a student locked out all day weighs as many cells as the others run)."""

    waits: list[float] = field(default_factory=list)
    blocked: int = 0

    def all(self) -> list[float]:
        return self.waits + [INF] * self.blocked

    def p(self, q: float) -> float:
        return percentile(self.all(), q)


def blocked_cells(plan: Plan, index: int, asked_at: float, day_end: float) -> int:
    """How many cells after cell ``index`` (asked for at ``asked_at``, never started) the
    student would have asked for before ``day_end`` had it started at once."""
    t, count = asked_at, 0
    for k in range(index, len(plan.cells) - 1):
        t += plan.cells[k] + plan.thinks[k]
        if t >= day_end:
            break
        count += 1
    return count


def capacity(points: Sequence[tuple[float, float]], limit: float = WAIT_LIMIT) -> float:
    """The most students per slot before the p95 wait first goes over ``limit``, from
    (students per slot, p95 wait) points in increasing order; 0 when even the first is over."""
    best = 0.0
    for ratio, p95 in points:
        if not p95 <= limit:
            break
        best = ratio
    return best
