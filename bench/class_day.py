"""Benchmark (not a test): how many students one GPU slot serves, by the way the pool is shared.

    .venv/bin/python bench/class_day.py [--costs bench/results/class_costs.json]
        [--slots 8,16,32,64] [--max-ratio 10] [--policies static,culler,...] [--jobs 2]
        [--plot bench/results/class_day.png]

A class day (``class_model.Day``: ~240 s of thinking between ~30 s GPU cells, two hours, drawn
from seeded log-normal distributions) played on a virtual clock against the real scheduler core
(``class_sim``: ``broker.core``'s ``Scheduler``, no copy of it), for pools of ``--slots`` slots
and 1 to ``--max-ratio`` students per slot, under each policy of ``class_model.POLICIES``:
static allocation, JupyterHub's idle culler (10 min; the notebooks whose state it lost are
counted), suspend after 15 min idle, a 30 s idle limit while others wait, and per-cell binding.
Suspend and resume take what ``bench/class_rehearsal.py`` measured (``--costs``, its
``class_costs.json``), or ``--fixed-costs RESUME,SUSPEND,COLD`` seconds.

It prints, per pool size, the p95 wait at a cell's start for each policy and class size, and
the capacity: the most students per slot whose p95 wait stays within 30 s; and draws the p95
wait against students per slot (PNG, ``--plot``). Small pools are played with more seeds (their
percentiles rest on fewer cells): 32 / slots days per point, at least one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from class_model import POLICIES, WAIT_LIMIT, Costs, Waits, capacity  # noqa: E402
from class_sim import simulate  # noqa: E402

STEP = 0.5  # students per slot between points
GIVE_UP = 10 * WAIT_LIMIT  # a policy whose p95 is past this twice running is not tried further


@dataclass
class Point:
    """One policy, pool size and class size: the p95 wait over ``days`` seeds, and more."""

    policy: str
    slots: int
    ratio: float
    p50: float
    p95: float
    suspends_per_student: float
    lost_share: float  # students whose state the culler lost at least once


def play(policy: str, slots: int, ratio: float, costs: Costs) -> Point:
    students = round(ratio * slots)
    days = max(1, round(32 / slots))
    waits, suspends, lost = Waits(), 0, 0
    for seed in range(1, days + 1):
        result = simulate(POLICIES[policy], slots, students, costs, seed=seed)
        waits.waits += result.waits.waits
        waits.blocked += result.waits.blocked
        suspends += result.suspends
        lost += result.students_lost
    total = students * days
    return Point(policy, slots, ratio, waits.p(50), waits.p(95), suspends / total, lost / total)


def sweep(policy: str, slots: int, max_ratio: float, costs: Costs) -> list[Point]:
    """From 1 student per slot up by ``STEP`` (a quarter step past the capacity, to pin it),
    until ``max_ratio`` or the waits are far past any use."""
    points: list[Point] = []
    ratio, over = 1.0, 0
    while ratio <= max_ratio + 1e-9 and over < 2:
        point = play(policy, slots, ratio, costs)
        points.append(point)
        over = over + 1 if not point.p95 <= GIVE_UP else 0
        ratio += STEP
    fit = capacity([(p.ratio, p.p95) for p in points])
    if fit and fit + STEP <= max_ratio and any(p.ratio > fit for p in points):
        points.append(play(policy, slots, fit + STEP / 2, costs))
        points.sort(key=lambda p: p.ratio)
    return points


def wait_text(seconds: float) -> str:
    if math.isinf(seconds):
        return "never"
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"


def print_tables(results: dict[tuple[str, int], list[Point]], policies: list[str]) -> None:
    sizes = sorted({slots for _, slots in results})
    for slots in sizes:
        print(f"\n{slots} slots: p95 wait at a cell's start (s) by students per slot")
        ratios = sorted({p.ratio for (_, s), pts in results.items() if s == slots for p in pts})
        print(f"{'stud/slot':>10}" + "".join(f"{name:>12}" for name in policies) + "  culler lost")
        for ratio in ratios:
            row = f"{ratio:>10.2f}"
            lost = ""
            for name in policies:
                point = next((p for p in results[name, slots] if p.ratio == ratio), None)
                row += f"{(wait_text(point.p95) if point else '-'):>12}"
                if name == "culler" and point is not None:
                    lost = f"{point.lost_share:.0%}"
            print(row + f"{lost:>13}")
    print(f"\nCapacity: students per slot with p95 wait <= {WAIT_LIMIT:g} s")
    print(f"{'policy':<12}" + "".join(f"{f'{s} slots':>10}" for s in sizes))
    for name in policies:
        caps = [capacity([(p.ratio, p.p95) for p in results[name, s]]) for s in sizes]
        print(f"{name:<12}" + "".join(f"{c:>10.2f}" for c in caps))


def plot(results: dict[tuple[str, int], list[Point]], policies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({slots for _, slots in results})
    cols = 2 if len(sizes) > 1 else 1
    rows = math.ceil(len(sizes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    top = 3600.0
    for ax, slots in zip(axes.flat, sizes, strict=False):
        for name in policies:
            pts = results[name, slots]
            ys = [min(p.p95, top) if not math.isinf(p.p95) else top for p in pts]
            ax.plot([p.ratio for p in pts], [max(y, 0.1) for y in ys], marker="o", ms=3, label=name)
        ax.axhline(WAIT_LIMIT, color="grey", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(0.1, top * 1.5)
        ax.set_title(f"{slots} slots")
        ax.set_xlabel("students per slot")
        ax.set_ylabel("p95 wait at a cell's start (s)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(sizes) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Class day: 240 s thinking, 30 s GPU cells, 2 h (dashed: 30 s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def load_costs(args: argparse.Namespace) -> Costs:
    if args.fixed_costs:
        resume, suspend, cold = (float(x) for x in args.fixed_costs.split(","))
        return Costs.fixed(resume, suspend, cold)
    if not args.costs.exists():
        raise SystemExit(
            f"no costs at {args.costs}: run bench/class_rehearsal.py first (it writes them), "
            "or give --fixed-costs RESUME,SUSPEND,COLD in seconds"
        )
    return Costs.load(args.costs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--costs", type=Path, default=HERE / "results" / "class_costs.json")
    parser.add_argument("--fixed-costs", help="RESUME,SUSPEND,COLD seconds instead of --costs")
    parser.add_argument("--slots", default="8,16,32,64")
    parser.add_argument("--max-ratio", type=float, default=10.0)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--jobs", type=int, default=1, help="processes (the machine is shared)")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "class_day.png")
    parser.add_argument("--json", type=Path, help="also write the points here")
    args = parser.parse_args(argv)
    costs = load_costs(args)
    policies = args.policies.split(",")
    unknown = [name for name in policies if name not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policy {unknown[0]!r}; policies: {', '.join(POLICIES)}")
    sizes = [int(s) for s in args.slots.split(",")]
    med = costs.medians()
    print(
        "Costs (s, medians): "
        + ", ".join(f"{step} {med[step]:.2f}" for step in Costs.STEPS)
        + f"; from {json.dumps(costs.source)}"
    )
    started = time.time()
    tasks = [(name, slots) for slots in sizes for name in policies]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {
            task: pool.submit(sweep, task[0], task[1], args.max_ratio, costs) for task in tasks
        }
        results = {task: future.result() for task, future in futures.items()}
    print_tables(results, policies)
    if args.json:
        rows = [p.__dict__ for pts in results.values() for p in pts]
        args.json.write_text(json.dumps({"costs": costs.source, "points": rows}, default=str))
    try:
        plot(results, policies, args.plot)
    except ImportError as exc:  # the tables above stand without it
        print(f"\nno plot: {exc} (pip install matplotlib, or scripts/setup-env lab,test)")
        return 1
    print(f"\nplot: {args.plot}; {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
