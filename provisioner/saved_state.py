"""Where a suspended kernel's state is saved, and moving it to the host that resumes it.

``KernelSession`` keeps one ``SavedState`` while its kernel is suspended and calls
``bring_to(saved, target, conn, ...)`` when the resume's lease is on another host (the checkpoint
is copied over SSH, unless it is in the broker's shared ``checkpoint_dir``), and ``delete``
when the state is no longer wanted (resumed elsewhere, restart, shutdown). ``target_for`` turns a
lease's host into the SSH target the Jupyter server uses (its own key and known_hosts when the
kernelspec names them). ``check_not_expired`` and ``forget`` ask and tell the broker about the
checkpoint it records.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from broker.client import BrokerClient, HostInfo
from broker.errors import BrokerError
from gpu_kernel import remote
from gpu_kernel.cancel import CancelToken
from gpu_kernel.checkpoint import format_bytes
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.ssh import HostConnection, HostTarget
from gpu_kernel.transfer import copy_checkpoint
from provisioner.idle_connections import borrowed
from provisioner.settings import ProvisionerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedState:
    """A suspended kernel's checkpoint: the host it was written on, and where there."""

    host: HostInfo
    path: str | None  # None: the default place in the kernel's runtime dir on that host
    bytes: int
    reason: str
    since: float

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "host": asdict(self.host)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SavedState:
        host = HostInfo.from_json(data.get("host"))
        if host is None:
            raise ValueError("saved state without a host")
        return cls(
            host=host,
            path=data.get("path") or None,
            bytes=int(data.get("bytes") or 0),
            reason=str(data.get("reason") or ""),
            since=float(data.get("since") or time.time()),
        )


def target_for(host: HostInfo, settings: ProvisionerSettings) -> HostTarget:
    """The SSH target of a leased host, with this Jupyter server's key and known_hosts."""
    key_file = settings.ssh_key_file or host.key_file
    known_hosts = settings.known_hosts_file or host.known_hosts
    return HostTarget(
        name=host.name,
        address=host.address,
        port=host.port,
        user=host.user,
        key_file=os.path.expanduser(key_file) if key_file else None,
        known_hosts_file=os.path.expanduser(known_hosts) if known_hosts else None,
        python=host.python,
        connect_timeout=min(settings.launch_timeout, 30.0),
    )


def same_host(a: HostTarget, b: HostTarget) -> bool:
    return (a.name, a.address, a.port, a.user) == (b.name, b.address, b.port, b.user)


def in_shared_dir(path: str | None, shared: str | None) -> bool:
    """Whether ``path`` lies in the broker's shared ``checkpoint_dir`` (every host sees it)."""
    return bool(shared and path and path.startswith(shared.rstrip("/") + "/"))


def bring_to(
    saved: SavedState,
    kernel_id: str,
    settings: ProvisionerSettings,
    dest: HostConnection,
    dest_target: HostTarget,
    shared_dir: str | None,
    cancel: CancelToken,
    say: Callable[[str], None],
) -> tuple[str | None, bool]:
    """Make the checkpoint readable on ``dest_target``: (the path to restore from there, whether
    it was copied, so the original can go once the resume worked)."""
    source = target_for(saved.host, settings)
    if same_host(source, dest_target) or in_shared_dir(saved.path, shared_dir):
        return saved.path, False
    say(
        f"Copying the saved state ({format_bytes(saved.bytes)}) from {saved.host.name} to "
        f"{dest_target.name}"
    )
    # a link that goes quiet mid-copy fails the copy after a few link timeouts, not minutes
    quiet = max(3 * settings.link_timeout, 6.0)
    with borrowed(source, cancel) as src, cancel.hook(src.close), cancel.hook(dest.close):
        copy_checkpoint(src, source, dest, dest_target, kernel_id, timeout=quiet)
    return None, True


def delete(
    saved: SavedState,
    kernel_id: str,
    settings: ProvisionerSettings,
    shared_dir: str | None,
    cancel: CancelToken,
) -> bool:
    """Remove the checkpoint (with the kernel's runtime dir on its host); True when done."""
    target = target_for(saved.host, settings)
    try:
        with borrowed(target, cancel) as conn, cancel.hook(conn.close):
            remote.cleanup(conn, target, kernel_id)
            if in_shared_dir(saved.path, shared_dir) and saved.path:
                conn.run(["rm", "-rf", "--", saved.path])
    except SharedGPUError as err:
        log.warning("could not delete the saved state of %s on %s: %s", kernel_id, target.name, err)
        return False
    return True


def host_info(target: HostTarget) -> HostInfo:
    """The HostInfo of a host we reached (a lease that ended left none to copy it from)."""
    return HostInfo(
        name=target.name,
        address=target.address,
        port=target.port,
        user=target.user,
        key_file=target.key_file,
        known_hosts=target.known_hosts_file,
        python=target.python,
    )


def check_not_expired(client: BrokerClient, kernel_id: str) -> None:
    """The broker deletes checkpoints older than its policy allows: say so, plainly (a broker
    that cannot be asked is not a reason to refuse the resume)."""
    try:
        records = client.checkpoints(kernel_id)
    except BrokerError as err:
        log.info("could not ask the broker about the checkpoint: %s", err)
        return
    for record in records:
        if record.get("state") == "expired":
            raise SharedGPUError(
                str(record.get("message") or "the saved state expired and was deleted"),
                "restart the kernel to start with an empty namespace",
            )


def forget(client: BrokerClient, kernel_id: str) -> None:
    """Tell the broker the checkpoint is gone (resumed or deleted)."""
    try:
        client.forget_checkpoint(kernel_id)
    except BrokerError as err:
        log.info("broker did not forget checkpoint of %s: %s", kernel_id, err)
