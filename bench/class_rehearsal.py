"""Benchmark (not a test; its short form runs in tests/test_class_rehearsal.py): a class
rehearsal with real kernels, for each way of sharing the pool, set beside the class-day model.

    .venv/bin/python bench/class_rehearsal.py [--policies per_cell,pressure30,...]
        [--students 4,8,12] [--slots 4] [--minutes 10] [--seed 1] [--keep-going]
        [--out bench/results]

A real broker (``gpu-broker serve``), real sshd test hosts on loopback (two, each with half of
``--slots`` simulated slots), and N scripted students (``class_students``): real "Shared GPU"
kernels through jupyter_client's KernelManager, each with its own broker user, running the cells
of a class day drawn from ``class_model`` (think ~240 s, GPU cells ~30 s, two hours) compressed
into ``--minutes``. Every time in the day and in the broker's policy is divided by the same
factor; the costs of the machinery (start, save, restore, copy) are not, which is what the
rehearsal measures. Waits are reported scaled back to the real day (times the factor). Each
class starts with no warm interpreter on the hosts (``gpu_kernel.warm``), as a class day does:
those an earlier class left would make its students' first launches on a host warm.

For each policy and class size it reports the waits at a cell's start (p50/p95/max), suspends
and resumes per student, checkpoint bytes written and copied, the notebooks the culler cost their
state, and checks every student's state at the end against what their cells built: a state lost
(or a cell that failed) fails the run. From all runs it fits the class-day model's costs (grant to
cell start for a new kernel and a resume on the same or another host; order to release for a
suspend; each apart for a kernel launched where its user had no warm interpreter yet; shutdown
for a cull), writes them to ``OUT/class_costs.json`` for ``bench/class_day.py``,
and sets the model's waits for the same runs beside the rehearsal's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from class_model import POLICIES, WAIT_LIMIT, Costs, Day, Waits, capacity  # noqa: E402
from class_pool import Outcome, broker_tick, rehearse  # noqa: E402
from class_sim import simulate  # noqa: E402

from tests.sshd import ClientKeys, end_warm_interpreters, start_hosts  # noqa: E402

# -- from the outcomes: the fitted costs, the model beside the rehearsal, the tables --------------


def fit_costs(outcomes: list[Outcome], source: dict) -> Costs:
    """The class-day model's costs: every sample of every rehearsal (a step no rehearsal saw
    takes the closest one's, ``Costs.FALLBACK``: another host's resume is a same host's when
    none moved)."""
    pooled: dict[str, list[float]] = {step: [] for step in Costs.STEPS}
    for outcome in outcomes:
        for step, values in outcome.samples.items():
            pooled[step] += [round(v, 4) for v in values]
    try:
        return Costs.pooled(pooled, source)
    except ValueError as exc:
        raise SystemExit(f"{exc}: rehearse a policy that suspends") from None


def model_beside(outcome: Outcome, costs: Costs, seed: int, draws: int = 5) -> Waits:
    """The class-day model's waits for the same class, day, compression and seed (students
    draw the same plans), pooled over ``draws`` draws of the costs."""
    waits = Waits()
    day = Day().compressed(outcome.compress)
    for draw in range(draws):
        result = simulate(
            POLICIES[outcome.policy],
            outcome.slots,
            outcome.students,
            costs,
            day=day,
            seed=seed,
            slots_per_host=max(1, outcome.slots // 2),
            tick=broker_tick(outcome.compress),
            compress=outcome.compress,
            cost_seed=1000 + draw,
        )
        waits.waits += result.waits.waits
        waits.blocked += result.waits.blocked
    return waits


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def print_tables(outcomes: list[Outcome], models: list[Waits], costs: Costs) -> None:
    c = outcomes[0].compress
    print(
        f"\nClass rehearsal: {outcomes[0].slots} slots, day compressed {c:g}x; waits scaled "
        f"back to the real day (x{c:g}); capacity: students/slot with p95 <= {WAIT_LIMIT:g} s"
    )
    head = (
        f"{'policy':<11}{'stud/slot':>10}{'p50':>8}{'p95':>8}{'max':>8}{'susp/st':>9}"
        f"{'res/st':>8}{'MiB wr':>8}{'MiB cp':>8}{'culled':>7}{'lost':>5}"
        f"{'served':>8}{'model p95':>10}{'diff':>7}"
    )
    print(head)
    for o, m in zip(outcomes, models, strict=True):
        model_p95 = m.p(95) * c
        diff = (model_p95 - o.scaled(95)) / o.scaled(95) if o.scaled(95) > 0 else float("nan")
        print(
            f"{o.policy:<11}{o.students / o.slots:>10.2f}{o.scaled(50):>8.1f}{o.scaled(95):>8.1f}"
            f"{max(o.waits.all()) * c:>8.1f}{o.suspends / o.students:>9.2f}"
            f"{o.resumes / o.students:>8.2f}{mib(o.bytes_written):>8}{mib(o.bytes_copied):>8}"
            f"{o.students_culled:>7}{len(o.lost):>5}{o.served:>5}/{o.students:<2}"
            f"{model_p95:>10.1f}{diff:>+7.0%}"
        )
    print(f"\n{'policy':<11}{'rehearsal capacity':>20}{'model capacity':>16}")
    for name in dict.fromkeys(o.policy for o in outcomes):
        rows = [(o, m) for o, m in zip(outcomes, models, strict=True) if o.policy == name]
        real = capacity([(o.students / o.slots, o.scaled(95)) for o, _ in rows])
        model = capacity([(o.students / o.slots, m.p(95) * c) for o, m in rows])
        print(f"{name:<11}{real:>20.2f}{model:>16.2f}")
    med = costs.medians()
    print(
        "\nFitted costs (s, median of samples; n): "
        + ", ".join(
            f"{step} {med[step]:.2f} (n={len(getattr(costs, step))})" for step in Costs.STEPS
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--students", default="4,6,8,12,16,20", help="class sizes to try")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=10.0, help="the compressed day")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--grace", type=float, default=0.0, help="s a cell waiting at the day's end may still take"
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="play every class size (by default a size whose p95 is over the limit is the last)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=str(args.out / "class_rehearsal.log"),
        level=logging.INFO,
        format="%(asctime)s %(threadName)s %(name)s %(message)s",
    )
    policies = [POLICIES[name] for name in args.policies.split(",")]
    sizes = sorted(int(n) for n in args.students.split(","))
    base = Path(tempfile.mkdtemp(prefix="class-rehearsal-"))
    (base / "keys").mkdir()
    keys = ClientKeys(base / "keys")
    hosts = start_hosts(base, keys, ["hostA", "hostB"])
    os.environ["SHARED_GPU_RUNTIME_ROOT"] = str(base / "local-kernels")
    outcomes: list[Outcome] = []
    try:
        for spec in policies:
            for n in sizes:
                end_warm_interpreters(base)  # a class day starts with none (the model's too)
                started = time.time()
                o = rehearse(
                    base / f"{spec.name}-{n}",
                    hosts,
                    keys,
                    spec,
                    args.slots,
                    n,
                    args.minutes,
                    args.seed,
                    args.grace,
                )
                outcomes.append(o)
                print(
                    f"{spec.name} {n} students: p95 {o.scaled(95):.1f} s (scaled), "
                    f"{o.cells} cells, lost {o.lost}, {time.time() - started:.0f} s {o.phases}",
                    flush=True,
                )
                if not o.scaled(95) <= WAIT_LIMIT and not args.keep_going:
                    break  # larger classes only wait longer
    finally:
        for host in hosts:
            host.stop()
        end_warm_interpreters(base)  # the students' kernels left one per user and host
    commit = subprocess.run(
        ["git", "-C", str(HERE), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()
    source = {
        "bench": "bench/class_rehearsal.py",
        "argv": sys.argv[1:],
        "commit": commit,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "compress": outcomes[0].compress,
    }
    costs = fit_costs(outcomes, source)
    models = [model_beside(o, costs, args.seed) for o in outcomes]
    print_tables(outcomes, models, costs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "class_costs.json").write_text(json.dumps(costs.to_json(), indent=1) + "\n")
    rows = [
        {
            "policy": o.policy,
            "slots": o.slots,
            "students": o.students,
            "compress": o.compress,
            "p50": o.scaled(50),
            "p95": o.scaled(95),
            "model_p95": m.p(95) * o.compress,
            "suspends": o.suspends,
            "resumes": o.resumes,
            "bytes_written": o.bytes_written,
            "bytes_copied": o.bytes_copied,
            "culled": o.students_culled,
            "lost": o.lost,
            "served": o.served,
            "cells": o.cells,
            "failed_cells": o.failed_cells,
            "cell_log": o.cell_log,
        }
        for o, m in zip(outcomes, models, strict=True)
    ]
    (args.out / "class_rehearsal.json").write_text(
        json.dumps({"source": source, "runs": rows}, indent=1, default=str) + "\n"
    )
    bad = [o for o in outcomes if o.lost or o.failed_cells]
    for o in bad:
        print(f"FAILED: {o.policy} {o.students}: lost {o.lost}, {o.failed_cells} cells failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
