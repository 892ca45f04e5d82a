"""Telling the running kernel its lease: ``%gpu`` shows it, and it keeps the orphan watchdog quiet.

``KernelSession`` owns one ``KernelInfo``. ``send_now(control, lease)`` (right after a launch, so
``%gpu`` knows the lease from the kernel's first moment) waits for the kernel's answer; ``wanted()``
(after each heartbeat) only wakes this object's thread, which sends the latest lease when the
kernel's control channel is free: the heartbeat thread never waits on the kernel, and a kernel
busy saving or restoring (its control channel taken) is not asked twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from broker.client import Lease
from provisioner.kernel_control import ControlBusy, KernelControl, KernelControlError

log = logging.getLogger(__name__)

INFO_TIMEOUT = 5.0


def info_content(lease: Lease) -> dict[str, Any] | None:
    """The ``shared_gpu_info`` request's content for ``lease`` (None without a slot)."""
    if lease.slot is None or lease.host is None:
        return None
    return {
        "lease": {
            "id": lease.id,
            "host": lease.host.name,
            "slot": lease.slot.id,
            "kind": lease.slot.kind,
            "device": lease.slot.device,
            "granted_at": lease.granted_at,
            "user": lease.user,
        },
        "queue": {"length": lease.queue_length},
        "policy": {**lease.policy, "heartbeat_interval": lease.heartbeat_interval},
        "quota": lease.quota,
    }


class KernelInfo:
    """Sends ``shared_gpu_info`` to the running kernel; one thread, started on first use."""

    def __init__(
        self, kernel_id: str, current: Callable[[], tuple[KernelControl | None, Lease | None]]
    ) -> None:
        """``current()``: the running kernel's control client and the lease, or Nones."""
        self.kernel_id = kernel_id
        self._current = current
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def send_now(self, control: KernelControl, lease: Lease) -> None:
        """Tell the kernel now and wait for its answer (a launch; errors are logged)."""
        self._send(control, lease, wait=True)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"kernel-info-{self.kernel_id[:8]}", daemon=True
            )
            self._thread.start()

    def wanted(self) -> None:
        """Send the current lease soon, from this object's thread (returns at once)."""
        self._wanted.set()

    def close(self) -> None:
        self._closed = True
        self._wanted.set()

    def _run(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                return
            try:
                control, lease = self._current()
                if control is not None and lease is not None:
                    self._send(control, lease, wait=False)
            except Exception:  # never die in silence: %gpu and the orphan watchdog need it
                log.exception("kernel %s: telling the kernel its lease failed", self.kernel_id)

    def _send(self, control: KernelControl, lease: Lease, wait: bool) -> None:
        content = info_content(lease)
        if content is None:
            return
        try:
            if wait:
                control.request("shared_gpu_info", content, INFO_TIMEOUT)
            else:
                control.try_request("shared_gpu_info", content, INFO_TIMEOUT)
        except ControlBusy:
            pass  # a suspend or restore is talking to the kernel: it knows we are here
        except (KernelControlError, OSError) as err:
            log.debug("kernel %s did not take shared_gpu_info: %s", self.kernel_id, err)
