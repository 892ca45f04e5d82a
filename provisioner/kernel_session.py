"""One Shared GPU kernel's life on the Jupyter side: its lease, its host connection, its proxy.

``SharedGPUProvisioner`` (the jupyter_client adapter) owns one ``KernelSession`` and calls it from
worker threads; everything here is synchronous and thread-safe where it says so. The session
outlives kernel restarts (same lease, same slot, same proxy ports) and ends with ``close()``.
The proxy's frontend ports are what Jupyter sees; the kernel behind them may change (restart now,
suspend/resume later) without Jupyter noticing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from broker.client import BrokerClient, Lease
from broker.errors import BrokerError
from gpu_kernel import remote
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.protocol import PROTOCOL_VERSION, LaunchReply, LaunchRequest
from gpu_kernel.ssh import HostConnection, HostTarget, connect
from provisioner.kernel_control import KernelControl, KernelControlError
from provisioner.proxy import SessionProxy
from provisioner.settings import ProvisionerSettings
from provisioner.suspension import SUSPENDED_EXIT_CODE, SuspensionMixin

log = logging.getLogger(__name__)

POLL_CACHE_S = 0.5  # poll() answers from a fresh-enough status instead of a round trip each call


class LeaseTimeout(SharedGPUError):
    """No slot was granted within the kernelspec's ``lease_timeout``."""


class LeaseLost(SharedGPUError):
    """The broker ended our lease (expired or dropped from the queue)."""


@dataclass
class RunningKernel:
    """The kernel process on the host, as the launcher reported it."""

    reply: LaunchReply
    exit_code: int | None = None
    checked_at: float = 0.0


class KernelSession(SuspensionMixin):
    """Lease + host connection + tunnels + proxy for one Jupyter kernel id."""

    def __init__(
        self,
        kernel_id: str,
        settings: ProvisionerSettings,
        client: BrokerClient,
        progress: Callable[[str], None] = log.info,
        proxy_ports: dict[str, int] | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        self.settings = settings
        self.client = client
        self.progress = progress
        self.proxy = SessionProxy(ports=proxy_ports)
        self.proxy.kernel_suspended_hook = self.kernel_said_suspended
        self.lease: Lease | None = None
        self.conn: HostConnection | None = None
        self.target: HostTarget | None = None
        self.kernel: RunningKernel | None = None
        self.control: KernelControl | None = None
        self._upstream: dict[str, int] = {}
        self._launch: tuple[bytes, str, dict[str, str]] | None = None  # key, scheme, env
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._closed = threading.Event()
        self._heartbeat: threading.Thread | None = None
        # BrokerClient is not thread-safe: the heartbeat thread has a client of its own.
        self._heartbeat_client = BrokerClient(
            client.url, client.token, client.timeout, token_source=client.token_source
        )

    # ---- lease -------------------------------------------------------------------------------

    def acquire_lease(
        self, say: Callable[[str], None] | None = None, resume_from: str | None = None
    ) -> Lease:
        """Ask the broker for a slot and wait in its queue (saying where we stand) until granted.

        Raises LeaseTimeout after ``settings.lease_timeout``; the queued request is withdrawn.
        """
        if self.lease is not None and self.lease.state == "granted":
            return self.lease
        say = say or self.progress
        deadline = time.monotonic() + self.settings.lease_timeout
        lease = self.client.request_lease(
            kind=self.settings.slot_kind, kernel_id=self.kernel_id, resume_from=resume_from
        )
        self.lease = lease
        last_position = None
        while lease.state == "queued":
            if lease.position != last_position:
                say(
                    f"Waiting for a free {self.settings.slot_kind!r} GPU slot: "
                    f"position {lease.position} of {lease.queue_length} in the queue"
                )
                last_position = lease.position
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._cancel.is_set():
                self._withdraw()
                if self._cancel.is_set():
                    raise LeaseLost("the kernel was shut down while it waited for a GPU slot")
                raise LeaseTimeout(
                    f"no {self.settings.slot_kind!r} GPU slot was free within "
                    f"{self.settings.lease_timeout:.0f}s (position {lease.position} of "
                    f"{lease.queue_length} when we gave up)",
                    "try again later, choose a kernel with another slot kind, or raise "
                    "lease_timeout with `jupyter shared-gpu install --lease-timeout ...`",
                )
            lease = self.client.get_lease(lease.id, wait=min(remaining, 5.0))
            self.lease = lease
        if lease.state != "granted":
            self.lease = None
            raise LeaseLost(
                f"the broker ended our request for a GPU slot (state: {lease.state})",
                "start the kernel again; if it keeps happening ask the admin about the "
                "broker's queue_timeout",
            )
        assert lease.slot is not None and lease.host is not None
        say(f"Leased GPU slot {lease.slot.id} ({lease.slot.kind}) on {lease.host.name}")
        self._start_heartbeat()
        return lease

    def _withdraw(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                self.client.release(lease.id)
            except BrokerError as err:
                log.warning("could not release lease %s: %s", lease.id, err)

    def cancel(self) -> None:
        """Stop waiting for a lease (called from another thread when a start is abandoned)."""
        self._cancel.set()

    # ---- kernel on the host ------------------------------------------------------------------

    def _target(self) -> HostTarget:
        assert self.lease is not None and self.lease.host is not None
        host = self.lease.host
        key_file = self.settings.ssh_key_file or host.key_file
        known_hosts = self.settings.known_hosts_file or host.known_hosts
        return HostTarget(
            name=host.name,
            address=host.address,
            port=host.port,
            user=host.user,
            key_file=os.path.expanduser(key_file) if key_file else None,
            known_hosts_file=os.path.expanduser(known_hosts) if known_hosts else None,
            python=host.python,
            connect_timeout=min(self.settings.launch_timeout, 30.0),
        )

    def _connection(self) -> HostConnection:
        """The SSH connection to the leased host (the one we have, if the lease did not move)."""
        target = self._target() if self.lease is not None else self.target
        assert target is not None
        if self.conn is not None and self.conn.is_alive() and target == self.target:
            return self.conn
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.target = target
        self.conn = connect(target)
        return self.conn

    def launch(self, key: bytes, signature_scheme: str, env: dict[str, str]) -> dict[str, int]:
        """Start the kernel on the leased slot, point the proxy at it; return the proxy's ports."""
        with self._lock:
            if self._launch is None:
                self.proxy.configure_session(key, signature_scheme)
            grace = {"SHARED_GPU_ORPHAN_GRACE": f"{self.settings.orphan_grace:g}"}
            self._launch = (key, signature_scheme, {**env, **grace})
            self._start_kernel(attach=True)
            return self.proxy.ports

    def _start_kernel(self, attach: bool) -> None:
        """Launch on the leased slot (a fresh kernel or one about to restore); forward its ports."""
        assert self.lease is not None and self.lease.slot is not None and self._launch
        key, scheme, env = self._launch
        conn = self._connection()
        assert self.target is not None
        request = LaunchRequest(
            protocol=PROTOCOL_VERSION,
            kernel_id=self.kernel_id,
            key=key.decode("ascii"),
            signature_scheme=scheme,
            cuda_visible_devices=self.lease.slot.device,
            host_name=self.lease.host.name,
            slot_id=self.lease.slot.id,
            owner=self.lease.user,
            env=env,
            runtime_root=None,
        )
        reply = remote.launch(conn, self.target, request)
        self.kernel = RunningKernel(reply=reply, checked_at=time.monotonic())
        self._forward(conn, attach)
        self.progress(
            f"Kernel running on {self.lease.host.name} ({reply.hostname}), slot "
            f"{self.lease.slot.id}, CUDA_VISIBLE_DEVICES={self.lease.slot.device}"
        )

    def _forward(self, conn: HostConnection, attach: bool) -> None:
        """Tunnel the running kernel's ports over ``conn``; a control client for ourselves."""
        assert self.kernel is not None and self._launch is not None
        key, scheme, _ = self._launch
        ports = self.kernel.reply.ports
        self._upstream = {name: conn.forward(port) for name, port in ports.items()}
        self._drop_control()
        self.control = KernelControl(self._upstream["control"], key, scheme)
        if attach:
            self.proxy.attach(self._upstream)

    def _drop_control(self) -> None:
        """Close our control client of a kernel that is ending or being replaced."""
        control, self.control = self.control, None
        if control is not None:
            control.close()

    def ensure_connected(self) -> None:
        """After an SSH drop: reconnect, tunnel again, re-attach (the kernel outlived the drop)."""
        with self._lock:
            if self.kernel is None or self.conn is None or self.conn.is_alive():
                return
            log.warning("SSH connection to %s dropped; reconnecting", self.target.name)
            self.proxy.hold()  # cells wait here, not in sockets bound for a dead tunnel
            try:
                conn = self._connection()
            except SharedGPUError as err:
                log.warning("cannot reconnect to %s yet: %s", self.target.name, err)
                return
            self._forward(conn, attach=True)  # attach waits for IOPub, then sends what waited
            self.progress(f"Reconnected to kernel {self.kernel_id} on {self.target.name}")

    def poll(self) -> int | None:
        """None while the kernel runs or is suspended; its exit code once it has ended."""
        if self.suspended is not None:
            return None  # no lock: a resume may hold it for as long as the queue takes
        with self._lock:
            kernel = self.kernel
            if kernel is None:
                return 0
            if kernel.exit_code is not None:
                return kernel.exit_code
            if time.monotonic() - kernel.checked_at < POLL_CACHE_S:
                return None
            try:
                self.ensure_connected()  # a drop must re-tunnel, not just reconnect
                status = remote.status(self._connection(), self.target, self.kernel_id)
            except SharedGPUError as err:
                # The host is unreachable for now: the kernel may well be alive (it outlives
                # our connection). Saying "dead" would make Jupyter restart it on a new slot.
                log.warning("cannot check kernel %s: %s", self.kernel_id, err)
                kernel.checked_at = time.monotonic()
                return None
            kernel.checked_at = time.monotonic()
            if not status.alive:
                if status.exit_code == SUSPENDED_EXIT_CODE:
                    self.kernel_suspended_itself()
                    return None
                kernel.exit_code = status.exit_code if status.exit_code is not None else -1
            return kernel.exit_code

    def signal(self, signum: int) -> None:
        with self._lock:
            if self.kernel is not None and self.kernel.exit_code is None:
                remote.signal(self._connection(), self.target, self.kernel_id, signum)

    def kill(self) -> None:
        with self._lock:
            if self.kernel is not None and self.kernel.exit_code is None:
                remote.kill(self._connection(), self.target, self.kernel_id)
                self.kernel.checked_at = 0.0

    def forget_kernel(self) -> None:
        """The kernel has ended (restart): detach the proxy, keep the lease and the connection."""
        with self._lock:
            self.proxy.detach()
            self.kernel = None
            self._drop_control()

    # ---- re-attach (a restarted Jupyter server finds its kernels again) ---------------------

    def describe(self) -> dict[str, Any]:
        """What ``reattach`` needs, as JSON-able data (no secret: the key stays with Jupyter)."""
        lease, kernel = self.lease, self.kernel
        return {
            "lease_id": lease.id if lease else None,
            "kernel": json.loads(kernel.reply.to_json()) if kernel else None,
            "proxy_ports": dict(self.proxy.ports),
        }

    def reattach(self, saved: dict[str, Any]) -> None:
        """Take over a kernel another process started: its lease, its host process, its ports."""
        if not saved.get("lease_id") or not saved.get("kernel"):
            raise LeaseLost("nothing to re-attach: the kernel had no lease or no process")
        lease = self.client.get_lease(saved["lease_id"])
        if lease.state != "granted":
            raise LeaseLost(
                f"cannot re-attach: the broker ended lease {lease.id} ({lease.state})",
                "start a new kernel; its variables are lost",
            )
        self.lease = lease
        reply = LaunchReply.from_json(json.dumps(saved["kernel"]))
        with self._lock:
            conn = self._connection()
            status = remote.status(conn, self.target, self.kernel_id)
            if not status.alive:
                raise LeaseLost(
                    f"cannot re-attach: kernel {self.kernel_id} is no longer running on "
                    f"{lease.host.name}",
                    "start a new kernel",
                )
            upstream = {name: conn.forward(port) for name, port in reply.ports.items()}
            self._upstream = upstream
            self.proxy.attach(upstream)
            self.kernel = RunningKernel(reply=reply, checked_at=time.monotonic())
        self._start_heartbeat()
        self.progress(f"Re-attached to kernel {self.kernel_id} on {lease.host.name}")

    # ---- heartbeat ---------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or not self._heartbeat.is_alive():
            self._heartbeat = threading.Thread(
                target=self._heartbeat_loop, name=f"heartbeat-{self.kernel_id[:8]}", daemon=True
            )
            self._heartbeat.start()

    def _heartbeat_loop(self) -> None:
        """Tell the broker, every heartbeat_interval, that the lease is in use and how busy."""
        while True:
            lease = self.lease
            interval = lease.heartbeat_interval if lease else 10.0
            if self._closed.wait(interval):
                return
            lease = self.lease
            if lease is None or lease.state != "granted":
                continue
            self.ensure_connected()
            activity = self.proxy.activity()
            try:
                reply = self._heartbeat_client.heartbeat(
                    lease.id, busy=activity.busy, last_activity=activity.last_activity
                )
            except BrokerError as err:
                log.warning("heartbeat for lease %s failed: %s", lease.id, err)
                continue
            if reply.lease.state != "granted":
                log.error(
                    "the broker ended lease %s (%s); the kernel runs on until it is shut down",
                    lease.id,
                    reply.lease.state,
                )
                continue
            self._tell_kernel(reply.lease)
            for order in reply.orders:
                if order.get("order") == "suspend":
                    self.suspend(str(order.get("reason") or "idle"))

    def _tell_kernel(self, lease: Lease) -> None:
        """Share the lease with the kernel (for %gpu); it also keeps the orphan watchdog quiet."""
        control = self.control
        if control is None or lease.slot is None or lease.host is None:
            return
        info = {
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
        try:
            control.request("shared_gpu_info", info, 5.0, self._closed)
        except (KernelControlError, zmq.ZMQError) as err:
            log.debug("kernel %s did not take shared_gpu_info: %s", self.kernel_id, err)

    # ---- end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Shutdown: remove the kernel's files on the host, release the lease, free local ports."""
        self._closed.set()
        self._cancel.set()
        self.discard_suspended()
        with self._lock:
            if self.conn is not None and self.target is not None:
                try:
                    remote.cleanup(self.conn, self.target, self.kernel_id)
                except SharedGPUError as err:
                    log.warning("could not clean up kernel %s on its host: %s", self.kernel_id, err)
                self.conn.close()
                self.conn = None
            self.kernel = None
            self._drop_control()
            self._withdraw()
            self.proxy.close()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=self._heartbeat_client.timeout + 1)
        self.client.close()
        self._heartbeat_client.close()
