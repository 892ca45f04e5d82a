"""``SharedGPUProvisioner``: jupyter_client's kernel provisioner for "Shared GPU" kernels.

jupyter_client's ``KernelManager`` calls these hooks (see its ``provisioning/provisioner_base.py``):
``pre_launch`` -> ``launch_kernel`` -> ``post_launch`` on start; ``poll`` from the restarter every
few seconds; ``send_signal`` for interrupts; ``shutdown_requested`` ->
``wait``/``terminate``/``kill`` -> ``cleanup`` on shutdown and restart. A ``KernelSession``
(``provisioner.session``) does the work; this class adapts it, runs its blocking calls off the
event loop, and logs our errors as one clear line.

With lazy attach (the default) a start takes no lease and contacts no host: the session proxy
stands in until the first cell, which takes the slot. ``attach = "eager"`` in the kernelspec's
provisioner config takes it at start, as Jupyter's other provisioners do.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from broker.client import BrokerClient, read_token
from gpu_kernel.errors import SharedGPUError
from provisioner.session import KernelSession
from provisioner.session_state import Phase
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
        return session is not None and session.phase is not Phase.CLOSED

    # ---- start -------------------------------------------------------------------------------

    def _settings(self) -> ProvisionerSettings:
        stanza = (self.kernel_spec.metadata or {}).get("kernel_provisioner", {})
        return ProvisionerSettings.from_config(
            stanza.get("config") or {}, self.kernel_spec.display_name
        )

    def _new_session(self, proxy_ports: dict[str, int] | None = None) -> KernelSession:
        settings = self._settings()
        token, source = read_token(settings.token_env, settings.token_file)

        def make_client() -> BrokerClient:
            return BrokerClient(settings.broker_url, token, token_source=source)

        make_client().close()  # a bad URL fails here, with the start
        return KernelSession(
            self.kernel_id, settings, make_client, self.log.info, proxy_ports=proxy_ports
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
        """Check the kernelspec and the token (no network): a start or restart keeps the
        session, its lease if it holds one, and its proxy ports."""
        if self.session is None:
            try:
                self.session = self._new_session()
            except SharedGPUError as err:
                self.log.error("Shared GPU kernel %s: %s", self.kernel_id, err)
                self._failed, self._message = True, str(err).splitlines()[0]
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
        """Start the kernel (now with eager attach; else at the first cell); return the proxy's
        ports to Jupyter."""
        session = self.session
        assert session is not None
        km = self.parent
        key: bytes = km.session.key
        scheme: str = km.session.signature_scheme
        env = self._kernel_env(kwargs.get("env") or dict(os.environ))
        eager = session.settings.attach == "eager"
        try:
            ports = await self._in_thread(session.launch, key, scheme, env, eager)
        except BaseException:
            await self._abandon()
            self._forget_failed_start()
            raise
        self.connection_info = self._connection_info(ports, key, scheme)
        return self.connection_info

    def _connection_info(self, ports: dict[str, int], key: bytes, scheme: str) -> dict[str, Any]:
        return {
            "transport": "tcp",
            "ip": "127.0.0.1",
            "shell_port": ports["shell"],
            "iopub_port": ports["iopub"],
            "stdin_port": ports["stdin"],
            "control_port": ports["control"],
            "hb_port": ports["hb"],
            "key": key,
            "signature_scheme": scheme,
            "kernel_name": getattr(self.parent, "kernel_name", ""),
        }

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
        their leases and the process hangs. Failed starts are routine here (a bad token, an
        eager start with the pool full), so the provisioner cleans up after its own."""
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
        return 0 if self.session is None else self.session.poll()  # no network: never blocks

    async def wait(self) -> int | None:
        while (code := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return code

    async def send_signal(self, signum: int) -> None:
        if self.session is not None:
            await self._in_thread(self.session.signal, signum)

    async def kill(self, restart: bool = False) -> None:
        if self.session is not None:
            await self._in_thread(self.session.kill)

    async def terminate(self, restart: bool = False) -> None:
        if self.session is not None:
            await self._in_thread(self.session.kill)

    async def shutdown_requested(self, restart: bool = False) -> None:
        # terminate()/kill() never learn about restarts (jupyter_client #1061): remember it here.
        self._restarting = restart
        if self.session is not None:
            self.session.shutdown_requested(restart)

    async def cleanup(self, restart: bool = False) -> None:
        """On restart keep the lease, slot and proxy; otherwise release everything."""
        if self.session is None:
            return
        if restart or self._restarting:
            await asyncio.to_thread(self.session.prepare_restart)
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
        phase = session.phase
        lease = session.keeper.queued or session.lease
        if lease is not None and (lease.policy or lease.quota):
            self._last_terms = policy, quota = lease.policy or policy, lease.quota or quota
        activity = session.proxy.activity()
        saved = session.saved
        checkpoint = None
        if saved is not None:
            checkpoint = CheckpointFacts(saved.host.name, saved.bytes, saved.since)
        message = session.message or session.broker_trouble or self._message
        return SessionFacts(
            kernel_id=self.kernel_id or "",
            lease=lease,
            kernel_running=phase in (Phase.RUNNING, Phase.RECONNECTING, Phase.SUSPENDING),
            checkpoint=checkpoint,
            busy=activity.busy,
            last_activity=activity.last_activity,
            suspending=phase is Phase.SUSPENDING,
            resuming=phase is Phase.RESUMING,
            reconnecting=phase is Phase.RECONNECTING,
            failed=self._failed or (phase is Phase.UNATTACHED and message is not None),
            ended=phase in (Phase.ENDED, Phase.CLOSED) and not self._restarting,
            message=message,
            policy=policy,
            quota=quota,
        )

    def request_suspend(self) -> None:
        """The panel's "Suspend now": returns at once, the suspend runs on the session's worker.
        When it cannot happen (a cell runs, nothing holds a slot) ``ui_state()["message"]``
        says why."""
        session = self.session
        if session is None or session.phase is not Phase.RUNNING:
            self._message = "nothing to suspend: the kernel holds no GPU slot now"
            return
        if session.proxy.activity().busy:
            self._message = "not suspended: a cell is running; suspend once it has finished"
            return
        self._message = None
        session.request_suspend("asked from JupyterLab")

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
        session = self._new_session(saved.get("proxy_ports"))
        key = self.connection_info.get("key") or self.parent.session.key
        key = key.encode() if isinstance(key, str) else key
        scheme = self.connection_info.get("signature_scheme") or "hmac-sha256"
        try:
            await self._in_thread(session.reattach, saved, key, scheme)
        except BaseException:
            await asyncio.to_thread(session.close)
            raise
        self.session = session
        self.connection_info = dict(self.connection_info)
        self.connection_info.update(self._connection_info(session.proxy.ports, key, scheme))
