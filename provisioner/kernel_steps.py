"""The steps ``KernelSession`` takes with a kernel on its host, each with what it needs passed in:
build the launch request, restore saved state into a new kernel, ask a kernel to save and exit,
stop a running cell before a forced suspend, end a kernel. They decide nothing about the
session's phase; they report what happened (or raise a ``SharedGPUError`` that says it).
"""

from __future__ import annotations

import logging
import signal as _signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.client import Lease
from gpu_kernel.cancel import Cancelled, CancelToken
from gpu_kernel.checkpoint import format_bytes
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.protocol import PROTOCOL_VERSION, SUSPENDED_EXIT_CODE, LaunchRequest
from provisioner.host_link import HostLink, KernelOnHost
from provisioner.kernel_control import KernelControl, KernelControlError

log = logging.getLogger(__name__)

SUSPEND_TIMEOUT = 600.0  # writing 1 GiB of tensors takes seconds; a stuck kernel gets this long
RESTORE_TIMEOUT = 600.0
EXIT_TIMEOUT = 30.0  # from suspend_reply to the process being gone
CLEANUP_STEP = 5.0  # s one clean-up step on a host may take (a dead link must not hang it)
STOP_CELL_WAIT = 10.0  # s a cell may take to end after its interrupt, before the suspend


class ResumeError(SharedGPUError):
    """The kernel's saved state could not be brought back."""


def deadline(seconds: float) -> CancelToken:
    """A token that cancels itself after ``seconds`` (bounds one clean-up step)."""
    token = CancelToken()
    timer = threading.Timer(seconds, token.cancel, args=(f"took longer than {seconds:g} s",))
    timer.daemon = True
    timer.start()
    return token


def exit_text(code: int | None) -> str:
    """How a kernel process ended, for a user: "killed by SIGSEGV", "with exit code 1"."""
    if code is None:
        return "with no exit code"
    if code > 128:
        try:
            return f"killed by {_signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"with exit code {code}"


def launch_request(
    kernel_id: str,
    lease: Lease,
    key: bytes,
    scheme: str,
    env: dict[str, str],
    warm: float = 0.0,
    warm_preload: tuple[str, ...] = (),
) -> LaunchRequest:
    """What the launcher on the lease's host is asked to start."""
    assert lease.host is not None and lease.slot is not None
    return LaunchRequest(
        warm=warm,
        warm_preload=warm_preload,
        protocol=PROTOCOL_VERSION,
        kernel_id=kernel_id,
        key=key.decode("ascii"),
        signature_scheme=scheme,
        cuda_visible_devices=lease.slot.device or "",
        host_name=lease.host.name,
        slot_id=lease.slot.id,
        owner=lease.user,
        env=env,
    )


def restore(
    control: KernelControl,
    kernel: KernelOnHost,
    lease: Lease,
    path: str | None,
    token: CancelToken,
    say: Callable[[str], None],
    started: float,
    link_dropped: Callable[[], bool],
) -> None:
    """Load the saved state at ``path`` (None: the kernel's own runtime dir) into the new kernel;
    say what came back. ``ResumeError`` at once when the kernel dies or the link drops."""
    assert lease.host is not None and lease.slot is not None
    host = lease.host.name

    def stop() -> str | None:
        if kernel.exited.is_set():
            return f"the kernel died while restoring ({exit_text(kernel.exit_code)})"
        if link_dropped():
            return f"the connection to {host} dropped while the kernel restored"
        return None

    try:
        reply = control.request(
            "restore_request", {"checkpoint": path}, RESTORE_TIMEOUT, token, stop=stop
        )
    except KernelControlError as err:
        raise ResumeError(
            err.message,
            "the saved state is kept; run the cell again to retry, or restart the kernel to "
            f"start with an empty namespace (see kernel.log in the kernel's runtime dir on {host})",
        ) from err
    if reply.get("status") != "ok":
        raise ResumeError(
            f"the saved state was refused: {reply.get('evalue') or reply}",
            "restart the kernel to start with an empty namespace",
        )
    restored = reply.get("restored") or []
    imports = reply.get("imports") or []
    also = f" and {len(imports)} imports" if imports else ""
    say(
        f"Resumed on {host} slot {lease.slot.id}: restored {len(restored)} variables{also} "
        f"({format_bytes(int(reply.get('bytes') or 0))}) in "
        f"{float(reply.get('seconds') or 0):.1f}s, {time.monotonic() - started:.1f}s in all"
    )
    for item in reply.get("dropped") or []:
        say(f"  not restored: {item.get('name')}: {item.get('reason')}")
    for note in reply.get("notes") or []:
        say(f"  note: {note}")


@dataclass(frozen=True)
class SaveResult:
    """How a suspend request ended: saved (where, how big), or not (why; ``busy``: a cell ran)."""

    saved: bool
    path: str | None = None
    bytes: int = 0
    error: str = ""
    busy: bool = False


def ask_to_save(
    control: KernelControl,
    kernel: KernelOnHost,
    link: HostLink,
    request: dict[str, Any],
    token: CancelToken,
) -> SaveResult:
    """``suspend_request``: the kernel saves and exits; wait for the exit (kill it if it lingers).
    A reply lost with the link is replaced by what the watch says once the link is back.
    ``Cancelled`` goes through (a shutdown ends the kernel anyway)."""

    def exited() -> str | None:
        return "the kernel exited" if kernel.exited.is_set() else None

    reply: dict[str, Any] = {}
    try:
        reply = control.request("suspend_request", request, SUSPEND_TIMEOUT, token, exited)
    except KernelControlError as err:
        if not (kernel.exited.is_set() and kernel.exit_code == SUSPENDED_EXIT_CODE):
            return SaveResult(False, error=err.message)
    if reply and reply.get("status") != "ok":
        return SaveResult(
            False,
            error=f"the kernel could not suspend: {reply.get('evalue') or reply}",
            busy=reply.get("ename") == "KernelBusy",
        )
    if not kernel.exited.wait(EXIT_TIMEOUT):
        log.warning("kernel %s did not exit after saving; killing it", link.kernel_id)
        end_kernel(link)
    watched = kernel.saved or {}  # the watch's word, when the reply was lost
    path = reply.get("checkpoint", watched.get("path"))
    nbytes = reply.get("bytes", watched.get("bytes"))
    return SaveResult(
        True,
        path if isinstance(path, str) else None,
        nbytes if isinstance(nbytes, int) else 0,
    )


FORCED_WHY = {
    "quota": "your daily GPU quota is used up",
    "max_lease": "this kernel has held its GPU for the longest time the pool allows",
    "lease ended": "the broker ended this kernel's lease (it could not hear from us)",
}


def stop_running_cell(
    busy: Callable[[], bool],
    notify: Callable[[str], None],
    interrupt: Callable[[], None],
    token: CancelToken,
    reason: str,
    grace: float,
) -> None:
    """Before a forced suspend of a busy kernel: say so in the running cell, wait ``grace`` s
    for it to end, then interrupt it and wait a little for the interrupt to land."""
    why = FORCED_WHY.get(reason, f"the broker asks this kernel to give its GPU back ({reason})")
    notify(
        f"Shared GPU: {why}: this cell will be interrupted in {grace:.0f}s and the kernel "
        "suspended, with its variables saved; the next cell resumes it when a GPU is free"
    )
    for wait, then in ((grace, interrupt), (STOP_CELL_WAIT, None)):
        until = time.monotonic() + wait
        while busy() and time.monotonic() < until:
            if token.wait(0.2):
                token.check()
        if not busy() or then is None:
            return
        then()


def end_kernel(link: HostLink) -> bool:
    """Kill the link's kernel on its host (bounded); False when the host could not be asked
    (the kernel may still run: the broker must fence its slot)."""
    try:
        link.ctl("kill", deadline(CLEANUP_STEP))
    except (SharedGPUError, Cancelled) as err:
        log.warning("could not end kernel %s on its host: %s", link.kernel_id, err)
        return False
    return True
