"""Scripted students for ``bench/class_rehearsal.py``: each one a real "Shared GPU" kernel driven
through jupyter_client, running the cells of its ``class_model.Plan`` and thinking in between.

A cell prints when it starts (the wait is measured from the moment the student asked), builds
and changes torch tensors and Python state, and sleeps for the cell's length (the GPU work).
``expected_state`` says what the kernel must hold after the cells a student ran; ``check`` asks
the kernel and compares. The rehearsal's culler ends kernels here too (``Student.cull``).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from class_model import Plan
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

log = logging.getLogger("class_rehearsal")

BIG = 1 << 20  # float32: 4 MiB allocated by the first cell, never changed again
SMALL = 1 << 14  # float32: 64 KiB changed in place by every cell, and one more made anew

CELL = """\
print("@start", __import__("time").time(), flush=True)
import time, torch
try:
    log
except NameError:
    torch.manual_seed({student})
    data = torch.randn({big})
    w = torch.zeros({small})
    log, notes = [], {{}}
w.add_({k} + 1)
torch.manual_seed(1000 * {student} + {k})
acts = torch.randn({small})
log.append({k})
notes["c{k}"] = len(log)
time.sleep({seconds:.3f})
"""

CHECK = """\
import json
print("@state", json.dumps({"log": log, "w": float(w.sum()), "data": float(data.sum()),
    "acts": float(acts.sum()), "notes": notes}))
"""


@dataclass
class CellRecord:
    """One cell: asked at ``asked`` (unix s), started at ``started`` (None: never), replied at
    ``ended``; ``status`` of its reply, or "waited" (the day ended while it waited for its
    kernel) or "never ran: <error>" (its kernel could not be brought back)."""

    k: int
    asked: float
    started: float | None
    ended: float | None
    status: str
    kernel: int  # which of the student's kernels ran it (a culled one is replaced)


@dataclass
class Student:
    """One student: their kernel (and client), plan, and what they did."""

    index: int
    plan: Plan
    km: KernelManager
    kc: BlockingKernelClient
    cells: list[CellRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while a cell runs
    kernel_ids: list[str] = field(default_factory=list)
    culls: list[float] = field(default_factory=list)  # when the culler started ending a kernel
    last_end: float = 0.0
    bytes_written: int = 0
    bytes_copied: int = 0
    _saved_since: float | None = None
    _saved: Any = None

    @property
    def kernel_id(self) -> str:
        return self.km.kernel_id or ""

    def ran(self) -> list[int]:
        """The cells that ran in the current kernel (a cull starts it anew), in order."""
        current = len(self.kernel_ids) - 1
        return [c.k for c in self.cells if c.kernel == current and c.status == "ok"]

    def play(self, t0: float, day_end: float, grace: float = 0.0) -> None:
        """Run the plan from unix time ``t0`` until ``day_end``: think, ask, wait. A cell
        still waiting for its kernel at ``day_end`` gets ``grace`` more seconds to start, then
        is interrupted (its request for a slot withdrawn)."""
        at = t0 + self.plan.arrival
        for k, seconds in enumerate(self.plan.cells):
            delay = at - time.time()
            if delay > 0:
                time.sleep(delay)
            if time.time() >= day_end:
                return
            with self.lock:
                self._note_saved()
                record = self._run_cell(k, seconds, day_end + grace)
                self._note_moved()
            self.cells.append(record)
            if record.started is None and record.status == "waited":
                return  # the day ended while it waited
            self.last_end = record.ended or time.time()
            at = self.last_end + self.plan.thinks[k]

    def _run_cell(self, k: int, seconds: float, deadline: float) -> CellRecord:
        code = CELL.format(student=self.index, big=BIG, small=SMALL, k=k, seconds=seconds)
        asked = time.time()
        msg_id = self.kc.execute(code)
        started, error = self._wait_start(msg_id, deadline)
        if started is None and error is None:
            self.km.interrupt_kernel()  # withdraws the queued request: the day is over
        reply = self._reply(msg_id, timeout=120)
        status = reply["content"]["status"] if reply else "no reply"
        if started is None:
            status = "waited" if error is None else f"never ran: {error}"
            if error is not None:
                log.error("student %d, cell %d never ran: %s", self.index, k, error)
        kernel = len(self.kernel_ids) - 1
        return CellRecord(k, asked, started, time.time(), status, kernel)

    def _wait_start(self, msg_id: str, deadline: float) -> tuple[float | None, str | None]:
        """(the kernel's time at the cell's first line, None), or (None, the error) when the
        cell failed before it started (its kernel could not be brought back), or (None, None)
        when ``deadline`` passed first. The cell's output is read as one text: the kernel may
        send its first line in pieces (its output thread flushes when it likes)."""
        text = ""
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.05, min(1.0, deadline - time.time())))
            except queue.Empty:
                if time.time() >= deadline:
                    return None, None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                return None, f"{msg['content']['ename']}: {msg['content']['evalue']}"
            if msg["msg_type"] != "stream":
                continue
            text += msg["content"]["text"]
            for line in text.splitlines(keepends=True):
                if line.startswith("@start ") and line.endswith("\n"):
                    return float(line.split()[1]), None

    def _reply(self, msg_id: str, timeout: float) -> dict | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.kc.get_shell_msg(timeout=1.0)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg
        return None

    def _note_saved(self) -> None:
        """Before a cell: a checkpoint written since the last one counts as written."""
        session = getattr(self.km.provisioner, "session", None)
        saved = getattr(session, "saved", None)
        if saved is not None and saved.since != self._saved_since:
            self._saved_since = saved.since
            self.bytes_written += saved.bytes
            self._saved = saved

    def _note_moved(self) -> None:
        """After a cell: a kernel resumed on another host than its checkpoint's copied it."""
        session = getattr(self.km.provisioner, "session", None)
        lease = session.keeper.lease if session is not None else None
        if self._saved is not None and lease is not None and lease.host is not None:
            if lease.host.name != self._saved.host.name:
                self.bytes_copied += self._saved.bytes
            self._saved = None

    def check(self, timeout: float = 180) -> tuple[bool, str]:
        """Ask the kernel for its state and compare it with what the cells built."""
        ran = self.ran()
        if not ran:
            return True, "no cell ran in this kernel"
        msg_id = self.kc.execute(CHECK)
        deadline = time.time() + timeout
        text, error = "", None
        while time.time() < deadline and "\n" not in text.partition("@state ")[2]:
            try:
                msg = self.kc.get_iopub_msg(timeout=1.0)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                error = f"{msg['content']['ename']}: {msg['content']['evalue']}"
                break
        self._reply(msg_id, timeout=30)
        line = text.partition("@state ")[2].partition("\n")[0]
        if error or not line:
            return False, error or f"no answer to the check within {timeout:g} s: {text!r}"
        state = json.loads(line)
        want = expected_state(self.index, ran)
        wrong = [key for key in want if not _same(state.get(key), want[key])]
        return (not wrong), ("ok" if not wrong else f"differs in {', '.join(wrong)}")

    def cull(self, make_kernel) -> float:
        """End this student's kernel as JupyterHub's culler would (its state is lost) and give
        them a new one for their next cell; the seconds the shutdown took."""
        started = time.time()
        self.culls.append(started)
        session = getattr(self.km.provisioner, "session", None)
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
        if session is not None:
            session.closed.wait(30)
        self.km, self.kc = make_kernel(self.index)
        self.kernel_ids.append(self.kernel_id)
        return time.time() - started


def expected_state(student: int, ran: list[int]) -> dict[str, Any]:
    """What a kernel holds after cells ``ran`` of ``student`` (see ``CELL``)."""
    # generators of our own: the global one is shared by the threads that check in parallel
    data = float(torch.randn(BIG, generator=torch.Generator().manual_seed(student)).sum())
    seed = 1000 * student + ran[-1]
    acts = float(torch.randn(SMALL, generator=torch.Generator().manual_seed(seed)).sum())
    return {
        "log": ran,
        "w": float(SMALL * sum(k + 1 for k in ran)),
        "data": data,
        "acts": acts,
        "notes": {f"c{k}": i + 1 for i, k in enumerate(ran)},
    }


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float):
        return isinstance(got, int | float) and math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-2)
    return got == want
