"""Suspend and resume for ``KernelSession``: give the GPU back, keep the notebook's state.

Suspend (the broker's order in a heartbeat reply, or the kernel's own ``%gpu suspend`` / orphan
watchdog): the kernel checkpoints its namespace and exits with ``SUSPENDED_EXIT_CODE``; we
release the lease telling the broker where the checkpoint lives, and the proxy stands in for the
kernel. ``poll()`` keeps answering None: to Jupyter the kernel is alive.

Resume (the proxy calls ``resume`` in a thread of its own when a cell runs): lease a slot (any
host), copy the checkpoint there if it moved, launch a kernel with the same key, send it
``restore_request``, then attach the proxy, which sends the waiting cell. The cell shows each step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from broker.client import HostInfo
from broker.errors import BrokerError
from gpu_kernel import remote
from gpu_kernel.checkpoint import format_bytes
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.protocol import SUSPENDED_EXIT_CODE
from gpu_kernel.ssh import HostTarget, connect
from gpu_kernel.transfer import copy_checkpoint
from provisioner.kernel_control import KernelControlError

log = logging.getLogger(__name__)

SUSPEND_TIMEOUT = 600.0  # writing 1 GiB of tensors takes seconds; a stuck kernel gets this long
EXIT_TIMEOUT = 30.0  # from suspend_reply to the process being gone


class ResumeError(SharedGPUError):
    """The kernel's saved state could not be brought back."""


@dataclass(frozen=True)
class Suspended:
    """Where a suspended kernel's checkpoint lives (the host it was written on)."""

    host: HostInfo
    target: HostTarget
    path: str | None  # None: the default place in the kernel's runtime dir on that host
    bytes: int
    reason: str
    since: float


class SuspensionMixin:
    """The suspend/resume half of ``KernelSession`` (which defines every attribute used here)."""

    suspended: Suspended | None = None

    # ---- suspend -----------------------------------------------------------------------------

    def suspend(self, reason: str) -> bool:
        """Checkpoint the idle kernel and give its slot back; False if it could not (busy).

        The session lock is not held while the kernel saves (seconds per GiB), so poll, signal
        and shutdown stay responsive; a shutdown meanwhile abandons the wait."""
        with self._lock:
            control = self.control
            if self.kernel is None or self.suspended is not None or control is None:
                return False
            self.proxy.hold()  # cells run from now on wait (then resume the kernel)
        request = {"reason": reason}
        shared = self._shared_dir()
        if shared and self.lease is not None:
            request["checkpoint"] = f"{shared}/{self.lease.user}/{self.kernel_id}"
        try:
            reply = control.request("suspend_request", request, SUSPEND_TIMEOUT, self._closed)
            if reply.get("status") != "ok":
                raise KernelControlError(
                    f"the kernel refused to suspend: {reply.get('evalue') or reply}"
                )
        except (KernelControlError, zmq.ZMQError) as err:
            log.warning("kernel %s stays running: %s", self.kernel_id, err)
            self.proxy.release()
            return False
        with self._lock:
            if self.kernel is None or self.suspended is not None:
                return True  # poll() saw the exit first and did the rest
            self._wait_exit()
            self._enter_suspended(reply.get("checkpoint"), int(reply.get("bytes") or 0), reason)
            return True

    def _wait_exit(self) -> None:
        deadline = time.monotonic() + EXIT_TIMEOUT
        while time.monotonic() < deadline:
            status = remote.status(self._connection(), self.target, self.kernel_id)
            if not status.alive:
                return
            time.sleep(0.1)
        log.warning("kernel %s did not exit after saving its state; killing it", self.kernel_id)
        remote.kill(self._connection(), self.target, self.kernel_id)

    def _enter_suspended(self, path: str | None, nbytes: int, reason: str) -> None:
        """The kernel process has ended with its state saved: release the slot, stand in."""
        lease = self.lease
        assert lease is not None and lease.host is not None and self.target is not None
        self.suspended = Suspended(lease.host, self.target, path, nbytes, reason, time.time())
        self.kernel = None
        self._drop_control()
        self.lease = None
        checkpoint = {
            "host": lease.host.name,
            "path": path or "",
            "bytes": nbytes,
            "kernel_id": self.kernel_id,
        }
        try:
            self.client.release(lease.id, reason="suspended", checkpoint=checkpoint)
        except BrokerError as err:
            log.warning("could not release lease %s after suspending: %s", lease.id, err)
        self.proxy.suspend(self.resume)
        self.progress(
            f"Suspended ({reason}): state saved on {lease.host.name} ({format_bytes(nbytes)}); "
            "GPU slot given back; the next cell resumes the kernel"
        )

    def kernel_suspended_itself(self) -> None:
        """``poll`` saw exit code 75: ``%gpu suspend`` or the orphan watchdog saved the state."""
        self._enter_suspended(None, 0, "by the kernel")

    def kernel_said_suspended(self, notice: dict) -> None:
        """The kernel's IOPub notice (``%gpu suspend``): it saved itself and is exiting."""
        with self._lock:
            if self.kernel is None or self.suspended is not None:
                return
            self._wait_exit()
            path = notice.get("checkpoint")
            nbytes = notice.get("bytes")
            self._enter_suspended(
                path if isinstance(path, str) else None,
                nbytes if isinstance(nbytes, int) else 0,
                str(notice.get("reason") or "by the kernel"),
            )

    # ---- resume ------------------------------------------------------------------------------

    def resume(self) -> None:
        """Bring the kernel back (the proxy calls this in its own thread when a cell runs)."""
        say = self.proxy.publish_progress
        started = time.monotonic()
        try:
            with self._lock:
                suspended = self.suspended
                if suspended is None:
                    return
                self._check_not_expired()
                say("Shared GPU: resuming the kernel; asking for a GPU slot")
                lease = self.acquire_lease(say=say, resume_from=self.kernel_id)
                path, moved_from = self._bring_checkpoint(suspended, say)
                self._start_kernel(attach=False)
                assert self.control is not None and lease.slot is not None
                reply = self.control.request(
                    "restore_request", {"checkpoint": path}, SUSPEND_TIMEOUT, self._closed
                )
                if reply.get("status") != "ok":
                    self._abort_resume()
                    raise ResumeError(
                        f"the saved state was refused: {reply.get('evalue') or reply}",
                        "restart the kernel to start with an empty namespace",
                    )
                restored = reply.get("restored") or []
                say(
                    f"Resumed on {lease.host.name} slot {lease.slot.id}: restored "
                    f"{len(restored)} variables ({format_bytes(int(reply.get('bytes') or 0))}) "
                    f"in {float(reply.get('seconds') or 0):.1f}s, "
                    f"{time.monotonic() - started:.1f}s in all"
                )
                for item in reply.get("dropped") or []:
                    say(f"  not restored: {item.get('name')}: {item.get('reason')}")
                self.suspended = None
                self.proxy.attach(self._upstream)  # the waiting cell runs now
                if moved_from is not None:
                    self._delete_checkpoint(moved_from)
            self._forget_checkpoint()
        except SharedGPUError as err:
            log.warning("resume of kernel %s failed: %s", self.kernel_id, err)
            self.proxy.resume_failed(str(err))

    def _bring_checkpoint(
        self, suspended: Suspended, say: Callable[[str], None]
    ) -> tuple[str | None, HostTarget | None]:
        """Copy the checkpoint to the newly leased host if it moved: (path there, old host)."""
        assert self.lease is not None and self.lease.host is not None
        new = self._target()
        old = suspended.target
        if (new.address, new.port, new.user) == (old.address, old.port, old.user):
            return suspended.path, None
        shared = self._shared_dir()
        if shared and suspended.path and suspended.path.startswith(shared.rstrip("/") + "/"):
            return suspended.path, None  # every host sees it: nothing to copy
        say(
            f"Copying the saved state ({format_bytes(suspended.bytes)}) from "
            f"{suspended.host.name} to {self.lease.host.name}"
        )
        with connect(old) as src:
            copy_checkpoint(src, old, self._connection(), new, self.kernel_id)
        return None, old  # None: the default place on the new host

    def _delete_checkpoint(self, target: HostTarget, shared_path: str | None = None) -> None:
        """Remove the kernel's files (its old checkpoint) from a host it has left, and the
        checkpoint in the shared ``checkpoint_dir`` when it was written there."""
        try:
            with connect(target) as conn:
                remote.cleanup(conn, target, self.kernel_id)
                if shared_path:
                    conn.run(["rm", "-rf", "--", shared_path])
        except SharedGPUError as err:
            log.warning("could not delete the old checkpoint on %s: %s", target.name, err)

    def _check_not_expired(self) -> None:
        """The broker deletes checkpoints older than its policy allows: say so, plainly."""
        try:
            records = self.client.checkpoints(self.kernel_id)
        except BrokerError as err:
            log.info("could not ask the broker about the checkpoint: %s", err)
            return
        for record in records:
            if record.get("state") == "expired":
                raise ResumeError(
                    str(record.get("message") or "the saved state expired and was deleted"),
                    "restart the kernel to start with an empty namespace",
                )

    def _shared_dir(self) -> str | None:
        """The broker's ``checkpoint_dir`` (mounted on every host), if it names one."""
        lease = self.lease
        shared = lease.policy.get("checkpoint_dir") if lease is not None else None
        return shared if isinstance(shared, str) and shared else None

    def _abort_resume(self) -> None:
        """A kernel launched for a resume could not take the state: end it, free its slot."""
        if self.kernel is not None:
            remote.kill(self._connection(), self.target, self.kernel_id)
            self.kernel = None
        self._drop_control()
        self._withdraw()

    def _forget_checkpoint(self) -> None:
        try:
            self.client.forget_checkpoint(self.kernel_id)
        except BrokerError as err:
            log.info("broker did not forget checkpoint of %s: %s", self.kernel_id, err)

    def discard_suspended(self) -> None:
        """Shutdown or restart while suspended: delete the checkpoint; nothing is left running."""
        with self._lock:
            suspended, self.suspended = self.suspended, None
            if suspended is None:
                return
            in_runtime_dir = (suspended.path or "").endswith(f"/{self.kernel_id}/checkpoint")
            shared = None if in_runtime_dir else suspended.path
            self._delete_checkpoint(suspended.target, shared)
            self._forget_checkpoint()
            self.proxy.detach()


__all__ = ["SUSPENDED_EXIT_CODE", "ResumeError", "Suspended", "SuspensionMixin"]
