"""The shared-GPU state a kernel keeps, and the contents of its control replies.

``KernelActivity`` is shared by the shell (main) thread, which runs cells, and ipykernel's control
thread, which answers ``suspend_request`` / ``restore_request``: its lock makes "start a cell" and
"start a suspend" exclusive, so a checkpoint never sees a namespace in the middle of a cell.
The reply builders are pure (docs/internals.md, "Kernel control messages", has the formats).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gpu_kernel.protocol import RESTORE_PENDING_ENV

ORPHAN_GRACE_ENV = "SHARED_GPU_ORPHAN_GRACE"
DEFAULT_ORPHAN_GRACE = 120.0


class KernelBusy(Exception):
    """A suspend or restore was asked for while a cell runs (or another one is under way)."""


class RestorePending(Exception):
    """A save was asked of a kernel whose saved state is not restored yet: saving its empty
    namespace would replace the user's checkpoint (it exits without saving instead)."""


def orphan_grace(environ: dict[str, str] | None = None) -> float:
    """Seconds without a control message before the kernel suspends itself; 0 disables."""
    raw = (environ if environ is not None else os.environ).get(ORPHAN_GRACE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_ORPHAN_GRACE
    except ValueError:
        value = DEFAULT_ORPHAN_GRACE
    return max(value, 0.0)


@dataclass
class KernelActivity:
    """Busy/idle, last activity and the suspend state; every field under ``lock``."""

    host: str = field(default_factory=lambda: os.environ.get("SHARED_GPU_HOST", ""))
    slot: str = field(default_factory=lambda: os.environ.get("SHARED_GPU_SLOT", ""))
    device: str = field(default_factory=lambda: os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    started_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.time)
    executing: int = 0
    suspending: bool = False  # set once a checkpoint starts; the process exits after it
    restoring: bool = False
    restore_pending: bool = field(
        default_factory=lambda: os.environ.get(RESTORE_PENDING_ENV) == "1"
    )  # launched to resume, and not restored yet: no save
    info: dict[str, Any] = field(default_factory=dict)  # the last shared_gpu_info content
    info_at: float | None = None
    last_control: float = field(default_factory=time.monotonic)
    # The watchdog runs once the launcher set SHARED_GPU_ORPHAN_GRACE (a proxy that keeps the
    # kernel alive started it) or the first shared_gpu_info came: a client that never speaks
    # the keepalive (a plain jupyter_client) is not taken for a dead proxy.
    watchdog_armed: bool = field(default_factory=lambda: ORPHAN_GRACE_ENV in os.environ)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cell_started(self) -> bool:
        """Count a cell in; False while a suspend is under way (the cell must not run)."""
        with self.lock:
            if self.suspending:
                return False
            self.executing += 1
            self.last_activity = time.time()
            return True

    def cell_finished(self) -> None:
        with self.lock:
            self.executing = max(0, self.executing - 1)
            self.last_activity = time.time()

    def begin_suspend(self, *, from_cell: bool = False) -> None:
        """Claim the namespace for a checkpoint; KernelBusy while a cell (other than the one
        asking, for ``from_cell``) runs or a suspend or restore is under way."""
        with self.lock:
            if self.restore_pending:
                raise RestorePending(
                    "this kernel was started to resume saved state that is not restored yet: "
                    "saving now would replace that state with an empty namespace"
                )
            allowed = 1 if from_cell else 0
            if self.executing > allowed:
                raise KernelBusy("a cell is running: suspend when the kernel is idle")
            if self.suspending or self.restoring:
                raise KernelBusy("a suspend or restore is already under way")
            self.suspending = True

    def abort_suspend(self) -> None:
        with self.lock:
            self.suspending = False

    def begin_restore(self) -> None:
        with self.lock:
            if self.executing or self.suspending or self.restoring:
                raise KernelBusy("the kernel is busy: restore into an idle kernel")
            self.restoring = True

    def end_restore(self, restored: bool = True) -> None:
        """The restore is over; ``restored``: the namespace now holds the saved state (from
        then on a save keeps the user's work)."""
        with self.lock:
            self.restoring = False
            if restored:
                self.restore_pending = False
            self.last_activity = time.time()

    def control_seen(self) -> None:
        """A control message arrived: the proxy is there (resets the orphan watchdog)."""
        with self.lock:
            self.last_control = time.monotonic()

    def set_info(self, info: dict[str, Any]) -> None:
        with self.lock:
            self.info, self.info_at = dict(info), time.time()
            self.watchdog_armed = True

    def orphaned(self, grace: float) -> bool:
        """No control message for ``grace`` s, and idle (so the kernel may suspend itself)."""
        with self.lock:
            if grace <= 0 or not self.watchdog_armed:
                return False
            if self.suspending or self.restoring or self.executing:
                return False
            return time.monotonic() - self.last_control >= grace

    def shared_gpu(self) -> dict[str, Any]:
        """The ``shared_gpu`` part of ``usage_reply``."""
        with self.lock:
            return {
                "host": self.host,
                "slot": self.slot,
                "busy": self.executing > 0,
                "last_activity": self.last_activity,
            }


def dropped_list(manifest: Any) -> list[dict[str, str]]:
    """``[{"name", "type", "reason"}]`` from a Manifest's ``dropped``."""
    return [
        {"name": d.name, "type": d.type_name, "reason": d.reason}
        for d in getattr(manifest, "dropped", ())
    ]


def variable_names(manifest: Any) -> list[str]:
    """Names of the saved variables of a Manifest (its entries are objects or names)."""
    names = []
    for v in getattr(manifest, "variables", ()):
        names.append(v if isinstance(v, str) else getattr(v, "name", str(v)))
    return names


def suspend_reply(path: str, manifest: Any, seconds: float) -> dict[str, Any]:
    """Content of ``suspend_reply`` (status ok)."""
    return {
        "status": "ok",
        "checkpoint": path,
        "bytes": int(manifest.total_bytes),
        "saved": variable_names(manifest),
        "dropped": dropped_list(manifest),
        "seconds": round(seconds, 3),
    }


def restore_reply(names: list[str], manifest: Any, seconds: float) -> dict[str, Any]:
    """Content of ``restore_reply`` (status ok)."""
    return {
        "status": "ok",
        "restored": names,
        "bytes": int(manifest.total_bytes),
        "seconds": round(seconds, 3),
        "dropped": dropped_list(manifest),
        "execution_count": int(manifest.execution_count),
    }


def error_reply(e: BaseException) -> dict[str, Any]:
    """``{"status": "error", "ename", "evalue", "traceback": []}`` with the user's message."""
    return {"status": "error", "ename": type(e).__name__, "evalue": str(e), "traceback": []}
