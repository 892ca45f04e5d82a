"""Helpers for the fault-injection tests (``test_faults_*.py``): a watch over the hosts' kernel
processes that fails a test when one slot ever has two live kernels, and small cell helpers.

``SlotChecker`` samples every kernel process of this machine (the test hosts, network
namespaces included, all run here) a few times a second and records each moment where two live
kernels carry the same ``SHARED_GPU_SLOT``: the one thing a pool must never do.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

import psutil
from jupyter_client.blocking import BlockingKernelClient


def kernel_slots(roots: list[str]) -> Counter[str]:
    """How many live kernel processes under the runtime ``roots`` run on each slot now."""
    slots: Counter[str] = Counter()
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "gpu_kernel" not in cmdline or "kernel" not in cmdline or "-f" not in cmdline:
                continue
            connection_file = cmdline[cmdline.index("-f") + 1]
            if not connection_file.startswith(tuple(roots)):
                continue  # another pool's (another test's) kernel
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            slot = proc.environ().get("SHARED_GPU_SLOT")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if slot:
            slots[slot] += 1
    return slots


class SlotChecker:
    """Samples ``kernel_slots`` in a thread; ``violations`` lists every double booking seen.
    ``roots``: the runtime roots of the hosts to watch (``TestHost.runtime_root``)."""

    def __init__(self, roots: list[object], interval: float = 0.2) -> None:
        self.roots = [str(root) for root in roots]
        self.interval = interval
        self.violations: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slot-checker", daemon=True)

    def __enter__(self) -> SlotChecker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            slots = kernel_slots(self.roots)
            self.samples += 1
            for slot, count in slots.items():
                if count > 1:
                    self.violations.append(f"{time.strftime('%X')}: {count} kernels on {slot}")


def run(kc: BlockingKernelClient, code: str, timeout: float = 60) -> tuple[dict, str, str]:
    """Execute; the reply content, what the cell printed on stdout, and on stderr."""
    out: list[str] = []
    err: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            (out if msg["content"]["name"] == "stdout" else err).append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out), "".join(err)


def slow_save(seconds: float) -> str:
    """A cell defining ``slow``, whose pickling takes ``seconds``."""
    return SLOW_SAVE.replace("SECONDS", repr(seconds))


def slow_load(seconds: float) -> str:
    """A cell defining ``slow_load``, whose unpickling takes ``seconds``."""
    return SLOW_LOAD.replace("SECONDS", repr(seconds))


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


# A variable whose pickling takes SECONDS s (the kernel saves it by value: the class is the
# cell's own): a save longer than the lease's heartbeat timeout, or one to cut the link in.
SLOW_SAVE = """
import time
class SlowToSave:
    def __init__(self, seconds): self.seconds = seconds
    def __getstate__(self):
        time.sleep(self.seconds)
        return {"seconds": self.seconds}
    def __setstate__(self, state): self.seconds = state["seconds"]
slow = SlowToSave(SECONDS)
"""

# A variable whose unpickling takes SECONDS s: a restore long enough to cut the link in.
SLOW_LOAD = """
import time
class SlowToLoad:
    def __init__(self, seconds): self.seconds = seconds
    def __getstate__(self): return {"seconds": self.seconds}
    def __setstate__(self, state):
        time.sleep(state["seconds"])
        self.seconds = state["seconds"]
slow_load = SlowToLoad(SECONDS)
"""


def report(scenario: str, outcome: str, recovered_s: float | None = None) -> None:
    """Note a scenario's outcome and time to recover in ``$SHARED_GPU_FAULT_REPORT`` (JSON
    lines; ``bench/fault_table.py`` prints them as the table of the closing note); no-op
    without the variable. The checker's verdict (double grants) is the test's own."""
    path = os.environ.get("SHARED_GPU_FAULT_REPORT")
    if not path:
        return
    line = {"scenario": scenario, "outcome": outcome, "recovered_s": recovered_s}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
