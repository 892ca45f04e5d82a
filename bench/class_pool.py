"""A class on a real pool, for ``bench/class_rehearsal.py`` and tests/test_class_rehearsal.py: a
real broker (``gpu-broker serve``), real sshd test hosts, and scripted students
(``class_students``) with real "Shared GPU" kernels, each with its own broker user, playing a
compressed class day under one policy; then every student's state is checked, and the broker's
database says what happened (grants, orders, releases) and what each step cost.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from class_model import INF, Day, PolicySpec, Waits, blocked_cells, plan  # noqa: E402
from class_students import Student  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

from broker.client import BrokerClient  # noqa: E402
from broker.config.loader import load_config  # noqa: E402
from broker.http.auth import create_token  # noqa: E402
from broker.store.sqlite import Store  # noqa: E402
from provisioner.install import main as install_kernelspec  # noqa: E402
from provisioner.settings import ProvisionerSettings  # noqa: E402
from tests.pool import host_table  # noqa: E402
from tests.sshd import ClientKeys, TestHost, free_port  # noqa: E402

BIN = Path(sys.executable).parent
log = logging.getLogger("class_rehearsal")


def broker_tick(compress: float) -> float:
    """The broker's tick for a day compressed ``compress`` times: its 1 s, compressed too, but
    not below 50 ms (a busier loop would cost the kernels' CPU more than it tells)."""
    return max(0.05, 1.0 / compress)


@dataclass
class Outcome:
    """One rehearsal: a policy, a class size, what the students saw, what the broker did."""

    policy: str
    slots: int
    students: int
    compress: float
    waits: Waits
    served: int  # students who ran at least one cell
    cells: int
    failed_cells: int
    suspends: int
    resumes: int
    culled: int  # kernels the culler ended (their state lost, by design)
    students_culled: int
    bytes_written: int
    bytes_copied: int
    lost: list[str]  # students whose state did not match their cells (must stay empty)
    samples: dict[str, list[float]] = field(default_factory=dict)  # cost samples (s)
    # every cell: [student, k, asked (s into the day), wait (s; None: never started), status]
    cell_log: list[list] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds of each phase

    def scaled(self, q: float) -> float:
        return self.waits.p(q) * self.compress


def broker_toml(
    port: int, hosts: list[TestHost], keys: ClientKeys, slots: int, policy: dict
) -> str:
    lines = ["[server]", f'listen = "127.0.0.1:{port}"', 'database = "broker.sqlite"', ""]
    lines += ["[policy]", *(f'{key} = "{value}"' for key, value in policy.items()), ""]
    for index, host in enumerate(hosts):
        count = slots // len(hosts) + (index < slots % len(hosts))
        if not count:
            continue
        lines += [*host_table(host, keys), "  simulated = true", f"  count = {count}", ""]
    return "\n".join(lines)


class Rehearsal:
    """One policy, one class size, on a fresh broker over ``hosts``."""

    def __init__(
        self,
        base: Path,
        hosts: list[TestHost],
        keys: ClientKeys,
        spec: PolicySpec,
        slots: int,
        students: int,
        compress: float,
        seed: int = 1,
        grace: float = 0.0,
    ) -> None:
        self.grace = grace
        self.base, self.hosts, self.keys, self.spec = base, hosts, keys, spec
        self.slots, self.n, self.compress, self.seed = slots, students, compress, seed
        self.day = Day().compressed(compress)
        self.tick = broker_tick(compress)
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.played = spec.compressed(compress)  # the policy as the broker plays it
        policy = {**self.played.broker_policy(), "heartbeat_timeout": "30s", "queue_timeout": "1d"}
        self.config = base / "broker.toml"
        self.config.write_text(broker_toml(self.port, hosts, keys, slots, policy))
        self.kernels = base / "jupyter"
        self.proc: subprocess.Popen | None = None
        self.students: list[Student] = []
        self.kill_samples: list[float] = []

    # -- set-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        store = Store(load_config(self.config).server.database)
        try:
            self.admin = create_token(store, "teacher", "admin")[0]
            tokens = [create_token(store, f"s{i:02d}")[0] for i in range(self.n)]
        finally:
            store.close()
        log = open(self.base / "broker.log", "ab")  # noqa: SIM115 - lives with the process
        argv = [str(BIN / "gpu-broker"), "serve", "--config", str(self.config)]
        self.proc = subprocess.Popen([*argv, "--tick", str(self.tick)], stdout=log, stderr=log)
        client = BrokerClient(self.url, self.admin)
        deadline = time.time() + 20
        while True:
            try:
                client.whoami()
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError((self.base / "broker.log").read_text()) from None
                time.sleep(0.1)
        client.close()
        lease_timeout = f"{int(self.day.length) + 600}s"
        for i, token in enumerate(tokens):
            os.environ[f"SHARED_GPU_TOKEN_S{i:02d}"] = token
            args = ["install", "--prefix", str(self.kernels), "--name", f"student{i:02d}"]
            args += ["--broker-url", self.url, "--token-env", f"SHARED_GPU_TOKEN_S{i:02d}"]
            assert install_kernelspec([*args, "--lease-timeout", lease_timeout]) == 0
        for i in range(self.n):
            km, kc = self.kernel(i)
            student = Student(i, plan(self.day, self.seed, i), km, kc)
            student.kernel_ids.append(student.kernel_id)
            self.students.append(student)

    def kernel(self, i: int):
        """A new (lazy: no GPU yet) Shared GPU kernel for student ``i``, and a ready client."""
        ksm = KernelSpecManager(kernel_dirs=[str(self.kernels / "share" / "jupyter" / "kernels")])
        km = KernelManager(kernel_name=f"student{i:02d}", kernel_spec_manager=ksm)
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        return km, kc

    # -- the day --------------------------------------------------------------------------------

    def play(self) -> None:
        self.t0 = time.time() + 1.0
        self.end = self.t0 + self.day.length
        threads = [
            threading.Thread(
                target=s.play, args=(self.t0, self.end, self.grace), name=f"student{s.index}"
            )
            for s in self.students
        ]
        if self.spec.culler:
            threads.append(threading.Thread(target=self._culler, name="culler", daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _culler(self) -> None:
        """JupyterHub's idle culler: every half timeout, end kernels idle a timeout that hold
        a slot (their state is lost; the student's next cell starts a new kernel)."""
        assert self.played.culler is not None
        timeout = self.played.culler
        client = BrokerClient(self.url, self.admin)
        while time.time() + timeout / 2 < self.end:
            time.sleep(timeout / 2)
            granted = {
                lease["kernel_id"]
                for lease in client.status()["leases"]
                if lease["state"] == "granted"
            }
            for s in self.students:
                idle = s.last_end and time.time() - s.last_end >= timeout
                if idle and s.kernel_id in granted and s.lock.acquire(blocking=False):
                    try:
                        self.kill_samples.append(s.cull(self.kernel))
                    finally:
                        s.lock.release()
        client.close()

    # -- the end --------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Every student's state against their cells (in parallel: kernels resume in turn)."""
        results: dict[int, tuple[bool, str]] = {}

        def one(s: Student) -> None:
            results[s.index] = s.check()

        threads = [threading.Thread(target=one, args=(s,)) for s in self.students]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        lost = [f"s{i:02d}: {why}" for i, (ok, why) in sorted(results.items()) if not ok]
        if lost:  # what the broker says, for whoever reads the log
            client = BrokerClient(self.url, self.admin)
            log.error("state check failed: %s; pool: %s", lost, json.dumps(client.status()))
            client.close()
        return lost

    def close(self) -> None:
        sessions = []
        for s in self.students:
            sessions.append(getattr(s.km.provisioner, "session", None))
            s.kc.stop_channels()
            if s.km.has_kernel:
                s.km.shutdown_kernel(now=True)
        for session in sessions:
            if session is not None:
                session.closed.wait(30)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def outcome(self, lost: list[str]) -> Outcome:
        waits = Waits()
        cells = failed = 0
        cell_log = []
        for s in self.students:
            for c in s.cells:
                wait = None if c.started is None else round(max(0.0, c.started - c.asked), 3)
                cell_log.append([s.index, c.k, round(c.asked - self.t0, 3), wait, c.status])
                if c.started is None and c.status != "waited":
                    failed += 1  # its kernel could not be brought back: the run fails
                    waits.waits.append(INF)
                elif c.started is None:
                    waits.waits.append(self.end - c.asked)
                    waits.blocked += blocked_cells(s.plan, c.k, c.asked, self.end)
                else:
                    waits.waits.append(max(0.0, c.started - c.asked))
                    cells += 1
                    failed += c.status != "ok"
        events = broker_events(self.base / "broker.sqlite")
        counts, samples = wake_and_save(self, events)
        samples["kill"] = list(self.kill_samples)
        return Outcome(
            policy=self.spec.name,
            slots=self.slots,
            students=self.n,
            compress=self.compress,
            waits=waits,
            served=sum(1 for s in self.students if any(c.started for c in s.cells)),
            cells=cells,
            failed_cells=failed,
            suspends=counts["suspends"],
            resumes=counts["resumes"],
            culled=sum(len(s.culls) for s in self.students),
            students_culled=sum(1 for s in self.students if s.culls),
            bytes_written=sum(s.bytes_written for s in self.students),
            bytes_copied=sum(s.bytes_copied for s in self.students),
            lost=lost,
            samples=samples,
            cell_log=cell_log,
        )


def broker_events(database: Path) -> dict[str, list]:
    """The broker's leases and audit events (read-only)."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        leases = db.execute(
            "SELECT id, user, kernel_id, slot_id, created_at, granted_at, ended_at, end_reason "
            "FROM leases ORDER BY seq"
        ).fetchall()
        events = db.execute("SELECT at, kind, lease_id FROM events ORDER BY seq").fetchall()
    finally:
        db.close()
    return {"leases": leases, "events": events}


def wake_and_save(r: Rehearsal, data: dict[str, list]) -> tuple[dict[str, int], dict[str, list]]:
    """Suspends and resumes within the day, and the cost samples: grant to the cell's start for
    each wake (cold: a kernel's first lease; a resume on its last host or another; ``_no_warm``
    when its user had no warm interpreter on that host: none launched there within
    ``ProvisionerSettings.warm`` s, counted from the day's start, which had none), and order to
    release for each suspend (less half a heartbeat: the order waits for one; ``_no_warm`` for a
    kernel launched so)."""
    samples: dict[str, list[float]] = {
        k: [] for k in ("cold", "resume_same", "resume_other", "suspend")
    }
    samples.update({f"{k}_no_warm": [] for k in ("cold", "resume", "suspend")})
    starts = {}
    for s in r.students:
        for c in s.cells:
            if c.started is not None:
                starts.setdefault(s.kernel_ids[c.kernel], []).append(c.started)
    last_host: dict[str, str] = {}
    warm_until: dict[tuple[str, str], float] = {}  # (user, host) -> its warm interpreter's end
    ordered: dict[str, float] = {}
    for at, kind, lease_id in data["events"]:
        if kind == "suspend_ordered":
            ordered[lease_id] = at
    half_beat = r.played.heartbeat_interval / 2
    resumes = suspends = 0
    for lease_id, user, kernel_id, slot_id, _created, granted, ended, reason in data["leases"]:
        if granted is None or granted > r.end:
            continue
        host = (slot_id or "").split("/")[0]
        first = kernel_id not in last_host
        if not first:
            resumes += 1
        step = (
            "cold" if first else ("resume_same" if host == last_host[kernel_id] else "resume_other")
        )
        last_host[kernel_id] = host
        no_warm = "" if granted < warm_until.get((user, host), granted) else "_no_warm"
        warm_until[(user, host)] = granted + ProvisionerSettings.warm
        if no_warm:
            step = "cold_no_warm" if first else "resume_no_warm"
        later = [t for t in starts.get(kernel_id, []) if t >= granted]
        if later:
            samples[step].append(min(later) - granted)
        if reason == "suspended" and ended is not None and ended <= r.end:
            suspends += 1
            if lease_id in ordered:
                saved = max(0.01, ended - ordered[lease_id] - half_beat)
                samples["suspend" + no_warm].append(saved)
    return {"resumes": resumes, "suspends": suspends}, samples


def rehearse(
    base: Path,
    hosts: list[TestHost],
    keys: ClientKeys,
    spec: PolicySpec,
    slots: int,
    students: int,
    minutes: float,
    seed: int = 1,
    grace: float = 0.0,
) -> Outcome:
    """Play one compressed class day; the outcome (its ``lost`` must be empty). ``grace``: how
    long a cell that waits for a slot when the day ends may still take to start (0: the day
    ends for it too, as in the model; a test that wants every student served gives more)."""
    compress = Day().length / (minutes * 60)
    r = Rehearsal(base, hosts, keys, spec, slots, students, compress, seed, grace)
    phases = [time.time()]
    try:
        r.start()
        phases.append(time.time())
        r.play()
        phases.append(time.time())
        lost = r.check()
        phases.append(time.time())
        outcome = r.outcome(lost)
    finally:
        r.close()
    phases.append(time.time())
    names = ("start", "day", "check", "close")
    spans = zip(names, phases, phases[1:], strict=False)
    outcome.phases = {name: round(b - a, 1) for name, a, b in spans}
    return outcome
