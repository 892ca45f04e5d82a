"""``SharedGPUProvisioner``: jupyter_client's kernel provisioner for "Shared GPU" kernels.

jupyter_client's ``KernelManager`` calls these hooks (see its ``provisioning/provisioner_base.py``):
``pre_launch`` -> ``launch_kernel`` -> ``post_launch`` on start; ``poll`` from the restarter every
few seconds; ``send_signal`` for interrupts; ``shutdown_requested`` ->
``wait``/``terminate``/``kill`` -> ``cleanup`` on shutdown and restart. A ``KernelSession`` does
the work in worker threads; this class adapts it and logs our errors as one clear line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from broker.client import BrokerClient, read_token
from gpu_kernel.errors import SharedGPUError
from provisioner.kernel_session import KernelSession
from provisioner.proxy_state import ProxyState
from provisioner.settings import ProvisionerSettings
from provisioner.ui_state import CheckpointFacts, SessionFacts, ui_state

# Variables of the Jupyter server's environment that the remote kernel gets; the rest (which may
# hold the server's secrets) stays here. The kernelspec's own ``env`` stanza is always passed.
FORWARDED_ENV = ("JPY_SESSION_NAME", "JUPYTERHUB_USER", "LANG", "LC_ALL", "TZ")


class SharedGPUProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Runs the kernel on a GPU slot leased from the broker, behind a local session proxy."""

    session: KernelSession | None = None
    _restarting: bool = False
    # What ui_state() shows once the session is gone or when something went wrong.
    _message: str | None = None
    _failed: bool = False
    _ended: bool = False
    _suspend_thread: threading.Thread | None = None
    _last_terms: tuple[dict | None, dict | None] = (None, None)  # policy, quota of the last lease

    def __init__(self, **kwargs: Any) -> None:
        # The factory passes the kernelspec's provisioner config as keyword arguments; traitlets
        # would drop them with a warning. We validate that stanza ourselves in pre_launch.
        spec = kwargs.get("kernel_spec")
        stanza = (getattr(spec, "metadata", None) or {}).get("kernel_provisioner") or {}
        for key in stanza.get("config") or {}:
            kwargs.pop(key, None)
        super().__init__(**kwargs)

    @property
    def has_process(self) -> bool:
        session = self.session
        return session is not None and (session.kernel is not None or session.suspended is not None)

    # ---- start -------------------------------------------------------------------------------

    def _settings(self) -> ProvisionerSettings:
        stanza = (self.kernel_spec.metadata or {}).get("kernel_provisioner", {})
        return ProvisionerSettings.from_config(
            stanza.get("config") or {}, self.kernel_spec.display_name
        )

    async def _in_thread(self, func: Any, *args: Any) -> Any:
        """Run blocking session work off the event loop; log why it failed once, no traceback."""
        try:
            return await asyncio.to_thread(func, *args)
        except SharedGPUError as err:
            self.log.error("Shared GPU kernel %s: %s", self.kernel_id, err)
            self._message = str(err).splitlines()[0]
            raise

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Take a lease (waiting in the broker's queue), or keep the one we hold on a restart."""
        if self.session is None:
            settings = self._settings()
            token, source = read_token(settings.token_env, settings.token_file)
            client = BrokerClient(settings.broker_url, token, token_source=source)
            self.session = KernelSession(self.kernel_id, settings, client, progress=self.log.info)
        session = self.session
        try:
            await self._in_thread(session.acquire_lease)
        except asyncio.CancelledError:
            session.cancel()
            self._forget_failed_start()
            raise
        except BaseException:
            await self._abandon()
            self._forget_failed_start()
            raise
        self._restarting = False
        self._failed, self._ended, self._message = False, False, None
        kwargs.pop("extra_arguments", None)
        return await super().pre_launch(cmd=list(self.kernel_spec.argv), **kwargs)

    def _kernel_env(self, env: dict[str, str]) -> dict[str, str]:
        wanted = set(self.kernel_spec.env or {}) | set(FORWARDED_ENV)
        return {k: v for k, v in env.items() if k in wanted}

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the kernel on the leased host; return the proxy's ports to Jupyter."""
        assert self.session is not None
        km = self.parent
        key: bytes = km.session.key
        scheme: str = km.session.signature_scheme
        env = self._kernel_env(kwargs.get("env") or dict(os.environ))
        try:
            ports = await self._in_thread(self.session.launch, key, scheme, env)
        except BaseException:
            await self._abandon()
            self._forget_failed_start()
            raise
        self.connection_info = {
            "transport": "tcp",
            "ip": "127.0.0.1",
            "shell_port": ports["shell"],
            "iopub_port": ports["iopub"],
            "stdin_port": ports["stdin"],
            "control_port": ports["control"],
            "hb_port": ports["hb"],
            "key": key,
            "signature_scheme": scheme,
            "kernel_name": getattr(km, "kernel_name", ""),
        }
        return self.connection_info

    async def _abandon(self) -> None:
        """A start failed: give back the lease and every local resource."""
        self._failed = True
        session, self.session = self.session, None
        if session is not None:
            await asyncio.to_thread(session.close)

    def _forget_failed_start(self) -> None:
        """Take a failed start off the multi-kernel manager's pending list once its task ends.

        jupyter_client leaves it there (``_add_kernel_when_ready`` only logs the error), and
        jupyter_server's ``shutdown_all`` then shuts down that unknown id, which raises
        "Kernel does not exist": the server's shutdown stops there, the other kernels keep
        their leases and the process hangs. Failed starts are routine here (queue timeout,
        unknown kind, broker down), so the provisioner cleans up after its own."""
        manager = getattr(self.parent, "parent", None)  # the MultiKernelManager, if any
        pending = getattr(manager, "_pending_kernels", None)
        kernel_id = self.kernel_id
        task = pending.get(kernel_id) if isinstance(pending, dict) else None
        if not isinstance(task, asyncio.Future):
            return

        def drop(done: asyncio.Future) -> None:
            if pending.get(kernel_id) is done:
                del pending[kernel_id]

        task.add_done_callback(drop)

    # ---- process-like hooks ------------------------------------------------------------------

    async def poll(self) -> int | None:
        session = self.session
        if session is None:
            return 0
        code = await asyncio.to_thread(session.poll)
        if code is not None and session.suspended is not None:
            # The kernel ended because it suspended while this poll waited for the session:
            # its state is saved. An exit code here would make the restarter start a fresh
            # kernel (state lost, a new slot taken) instead of resuming on the next cell.
            return None
        return code

    async def wait(self) -> int | None:
        while (code := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return code

    async def send_signal(self, signum: int) -> None:
        if self.session is not None:
            await self._in_thread(self.session.signal, signum)

    async def kill(self, restart: bool = False) -> None:
        if self.session is not None:
            await self._in_thread(self.session.discard_suspended)  # nothing runs: end it now
            await self._in_thread(self.session.kill)

    async def terminate(self, restart: bool = False) -> None:
        if self.session is not None:
            await self._in_thread(self.session.discard_suspended)
            await self._in_thread(self.session.signal, int(signal.SIGTERM))

    async def shutdown_requested(self, restart: bool = False) -> None:
        # terminate()/kill() never learn about restarts (jupyter_client #1061): remember it here.
        self._restarting = restart
        if self.session is not None and self.session.suspended is not None:
            # nothing runs: drop the saved state now, so poll() says "ended" at once
            await asyncio.to_thread(self.session.discard_suspended)

    async def cleanup(self, restart: bool = False) -> None:
        """On restart keep the lease, slot and proxy; otherwise release everything."""
        if self.session is None:
            return
        if restart or self._restarting:
            await asyncio.to_thread(self.session.forget_kernel)
        else:
            await self._abandon()
            self._failed, self._ended = False, True

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 5.0)

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, 30.0)

    # ---- what JupyterLab shows (provisioner.server_extension) --------------------------------

    def ui_state(self) -> dict[str, Any]:
        """This kernel's state for the status bar and panel (see ``provisioner.ui_state``).
        Cheap and never blocks on the network: it only reads the session's attributes."""
        return ui_state(self._facts(), time.time())

    def _facts(self) -> SessionFacts:
        session = self.session
        policy, quota = self._last_terms
        if session is None:
            return SessionFacts(
                kernel_id=self.kernel_id or "",
                failed=self._failed,
                ended=self._ended,
                message=self._message,
                policy=policy,
                quota=quota,
            )
        lease, kernel, suspended = session.lease, session.kernel, session.suspended
        if lease is not None and (lease.policy or lease.quota):
            self._last_terms = policy, quota = lease.policy or policy, lease.quota or quota
        activity = session.proxy.activity()
        conn = session.conn
        checkpoint = None
        if suspended is not None:
            checkpoint = CheckpointFacts(suspended.host.name, suspended.bytes, suspended.since)
        suspending = self._suspend_thread is not None and self._suspend_thread.is_alive()
        return SessionFacts(
            kernel_id=self.kernel_id or "",
            lease=lease,
            kernel_running=kernel is not None and kernel.exit_code is None,
            checkpoint=checkpoint,
            busy=activity.busy,
            last_activity=activity.last_activity,
            suspending=suspending,
            resuming=session.proxy.state is ProxyState.RESUMING,
            reconnecting=kernel is not None and conn is not None and not conn.is_alive(),
            failed=self._failed,
            message=self._message,
            policy=policy,
            quota=quota,
        )

    def request_suspend(self) -> None:
        """The panel's "Suspend now": returns at once, the suspend runs in a thread. When it
        cannot happen (a cell runs, nothing runs) ``ui_state()["message"]`` says why."""
        session = self.session
        if session is None or session.kernel is None or session.suspended is not None:
            self._message = "nothing to suspend: the kernel holds no GPU slot now"
            return
        if session.proxy.activity().busy:
            self._message = "not suspended: a cell is running; suspend once it has finished"
            return
        if self._suspend_thread is not None and self._suspend_thread.is_alive():
            return
        self._message = None

        def run() -> None:
            try:
                done = session.suspend("asked from JupyterLab")
            except SharedGPUError as err:
                self._message = f"not suspended: {str(err).splitlines()[0]}"
                return
            if not done and session.suspended is None:
                self._message = "not suspended: the kernel is busy; try again when the cell ends"

        self._suspend_thread = threading.Thread(
            target=run, name=f"suspend-{(self.kernel_id or '')[:8]}", daemon=True
        )
        self._suspend_thread.start()

    # ---- re-attach ---------------------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        if self.session is not None:
            info["shared_gpu"] = self.session.describe()
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        saved = provisioner_info.get("shared_gpu")
        if not saved:
            return
        settings = self._settings()
        token, source = read_token(settings.token_env, settings.token_file)
        client = BrokerClient(settings.broker_url, token, token_source=source)
        session = KernelSession(
            self.kernel_id, settings, client, self.log.info, saved.get("proxy_ports")
        )
        try:
            await self._in_thread(session.reattach, saved)
        except BaseException:
            await asyncio.to_thread(session.close)
            raise
        self.session = session
        ports = session.proxy.ports
        self.connection_info = dict(self.connection_info)
        self.connection_info.update(
            {
                "shell_port": ports["shell"],
                "iopub_port": ports["iopub"],
                "stdin_port": ports["stdin"],
                "control_port": ports["control"],
                "hb_port": ports["hb"],
            }
        )
