"""One Shared GPU kernel's session on the Jupyter side: its phases and the work that moves them.

``SharedGPUProvisioner`` (the jupyter_client adapter) owns one ``KernelSession`` per kernel id.
The session composes collaborators that each own one piece of state:

- ``LeaseKeeper`` (``lease_keeper``): the lease and its heartbeats, in a thread of its own;
- ``HostLink`` (``host_link``): the SSH connection, the tunnels, the kernel's watch, reconnects;
- ``SessionProxy`` (``proxy``): the stable ports Jupyter talks to, standing in when no kernel runs;
- ``KernelControl`` (``kernel_control``): our own control requests to the running kernel;
- ``SavedState`` (``saved_state``): where a suspended kernel's state is.

The session owns the phase (``session_state``: a table, every change through ``advance``) and a
worker thread that runs one operation at a time: wake (take a lease, launch, restore, attach),
suspend, and their clean-ups. Nothing holds a lock over a network wait or a save: the phase lock
guards memory only. A shutdown or an interrupt cancels the operation under way through its
``CancelToken``, which breaks whatever it waits on (the queue's long poll, an SSH handshake, a
copy, a restore), so Jupyter gets its answer within a second in every phase. Events from the
keeper, the link and the proxy arrive on their threads and return at once: they change the phase
or queue an operation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal as _signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from broker.client import BrokerClient, HostInfo, Lease
from broker.errors import BrokerError
from gpu_kernel.cancel import Cancelled, CancelToken
from gpu_kernel.checkpoint import format_bytes
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.protocol import RESTORE_PENDING_ENV, SUSPENDED_EXIT_CODE, LaunchReply
from provisioner import kernel_steps, saved_state
from provisioner.host_link import HostLink, KernelOnHost
from provisioner.kernel_control import KernelControl
from provisioner.kernel_info import KernelInfo
from provisioner.kernel_steps import CLEANUP_STEP, deadline, exit_text
from provisioner.lease_keeper import LeaseKeeper, LeaseLost
from provisioner.proxy import SessionProxy
from provisioner.proxy_state import ProxyError
from provisioner.saved_state import SavedState, target_for
from provisioner.session_state import WITH_PROCESS, Event, Phase, advance
from provisioner.settings import ProvisionerSettings

log = logging.getLogger(__name__)

FORCED_REASONS = ("quota", "max_lease")
DEFAULT_BUSY_GRACE = 60.0


class KernelSession:
    """Lease, host link, proxy and saved state of one Jupyter kernel id."""

    def __init__(
        self,
        kernel_id: str,
        settings: ProvisionerSettings,
        make_client: Callable[[], BrokerClient],
        progress: Callable[[str], None] = log.info,
        proxy_ports: dict[str, int] | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        self.settings = settings
        self._make_client = make_client
        self._log_progress = progress
        self.proxy = SessionProxy(ports=proxy_ports)
        self.proxy.kernel_suspended_hook = self._kernel_said_suspended
        self.keeper = LeaseKeeper(
            make_client, kernel_id, settings.slot_kind, self.proxy.activity, self
        )
        self.link = HostLink(
            kernel_id,
            self,
            link_timeout=settings.link_timeout,
            give_up_after=settings.orphan_grace + 30.0,
        )
        self.saved: SavedState | None = None
        self.control: KernelControl | None = None
        self.exit_code: int | None = None
        self.message: str | None = None  # the last thing the user should know (ui_state)
        self.broker_trouble: str | None = None  # the heartbeats cannot get through: why
        self._launch_args: tuple[bytes, str, dict[str, str]] | None = None
        self._phase = Phase.UNATTACHED
        self._lock = threading.Lock()  # phase, op token, flags; memory only
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"session-{kernel_id[:8]}")
        self._op_token: CancelToken | None = None
        self._op_name = ""
        self._suspend_pending = False
        self._ending = False  # Jupyter asked for a shutdown or restart
        self._kernel_may_run = False  # a kill or clean-up could not reach the host
        self.info = KernelInfo(kernel_id, lambda: (self.control, self.keeper.lease))
        self._own_sessions: list[str] = []
        self._link_drops = 0  # link_lost calls so far (an operation notices a drop mid-way)
        self._closing = False
        self.closed = threading.Event()  # set once a shutdown's clean-up is done

    # ---- phase ---------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def kernel(self) -> KernelOnHost | None:
        return self.link.kernel

    @property
    def lease(self) -> Lease | None:
        return self.keeper.lease

    def _advance(self, event: Event) -> Phase:
        with self._lock:
            self._phase = advance(self._phase, event)
            return self._phase

    def _to_proxy(self, method: str, *args: Any) -> None:
        """Tell the proxy something from an event or a clean-up; once the session is closing
        (the proxy is closed first, to free the ports at once) there is nobody to tell."""
        try:
            getattr(self.proxy, method)(*args)
        except ProxyError:
            if not self._closing:
                raise

    def _say(self, text: str) -> None:
        self._log_progress(f"Shared GPU kernel {self.kernel_id[:8]}: {text}")

    # ---- operations on the worker ----------------------------------------------------------------

    def _submit(self, name: str, op: Callable[[CancelToken], None]) -> Future[None]:
        """Queue ``op(token)`` on the worker; the token is cancelled by shutdown or interrupt."""

        def run() -> None:
            token = CancelToken()
            with self._lock:
                if self._phase is Phase.CLOSED:
                    return
                self._op_token, self._op_name = token, name
            try:
                op(token)
            except Exception as exc:  # an operation never dies in silence
                log.exception("kernel %s: %s failed", self.kernel_id, name)
                self.message = f"internal error during {name}: {exc}"
            finally:
                with self._lock:
                    self._op_token, self._op_name = None, ""

        return self._worker.submit(run)

    def _cancel_op(self, reason: str, only: tuple[str, ...] = ()) -> None:
        with self._lock:
            token, name = self._op_token, self._op_name
        if token is not None and (not only or name in only):
            token.cancel(reason)

    # ---- start (Jupyter's launch_kernel) ---------------------------------------------------------

    def launch(self, key: bytes, scheme: str, env: dict[str, str], eager: bool) -> dict[str, int]:
        """Jupyter starts or restarts the kernel: with ``eager`` (or a lease held from before a
        restart) take a slot and launch now, else stand in until the first cell. Returns the
        proxy's ports."""
        if self._launch_args is None:
            self.proxy.configure_session(key, scheme)
        grace = {"SHARED_GPU_ORPHAN_GRACE": f"{self.settings.orphan_grace:g}"}
        self._launch_args = (key, scheme, {**env, **grace})
        if eager or self.keeper.lease is not None:
            failure: list[BaseException] = []
            self._submit("start", lambda token: self._op_launch(token, failure)).result()
            if failure:
                raise failure[0]
            if self._phase is not Phase.RUNNING:
                raise SharedGPUError(self.message or "the kernel did not start")
        else:
            if self._phase is Phase.ENDED:
                self._advance(Event.RESET)
            self.proxy.stand_in(self.wake)
        return self.proxy.ports

    def _op_launch(self, token: CancelToken, failure: list[BaseException]) -> None:
        self._advance(Event.LAUNCH)
        self.message = None
        try:
            # a lease kept from before a restart is used only if the broker says it still is
            # ours: a stale copy would start a second kernel on someone else's slot
            lease = self.keeper.verify() or self.keeper.acquire(
                token, self.settings.lease_timeout, self._say
            )
            self._start_on(lease, None, token, self._say)
        except (SharedGPUError, Cancelled, BrokerError) as err:
            failure.append(err)
            self.message = str(err)
            self._undo_start(token)
            with self._lock:
                if self._phase is Phase.STARTING:
                    self._phase = advance(self._phase, Event.START_FAILED)
            return
        self._started()

    # ---- wake: the first cell, or a cell after a suspend -----------------------------------------

    def wake(self) -> None:
        """The proxy's callback when a cell runs while no kernel process exists."""
        self._submit("wake", self._op_wake)

    def _op_wake(self, token: CancelToken) -> None:
        with self._lock:
            if self._phase not in (Phase.UNATTACHED, Phase.SUSPENDED) or self._ending:
                return
            resuming = self._phase is Phase.SUSPENDED
            self._phase = advance(self._phase, Event.WAKE)
        saved = self.saved
        started = time.monotonic()
        self.message = None
        # a resume tells each step in the cell's output; a first start keeps it to one line
        # that each step replaces, so what the cell prints stays the cell's own
        say = self.proxy.progress if resuming else self.proxy.status_line
        failed = "ResumeFailed" if resuming else "StartFailed"
        try:
            if resuming:
                self._with_broker(saved_state.check_not_expired, self.kernel_id)
                say("Shared GPU: resuming the kernel; asking for a GPU slot")
            else:
                say("Shared GPU: starting the kernel; asking for a GPU slot")
            lease = self.keeper.acquire(
                token,
                self.settings.lease_timeout,
                self.proxy.status_line,
                resume_from=self.kernel_id if resuming else None,
            )
            copied = self._start_on(lease, saved, token, say, started)
        except Cancelled as err:
            interrupted = err.message.startswith("interrupted")
            self._wake_failed(token, err.message, "KeyboardInterrupt" if interrupted else failed)
            return
        except SharedGPUError as err:
            what = "resumed" if resuming else "started"
            self._wake_failed(token, f"the kernel could not be {what}: {err}", failed)
            return
        except Exception as exc:
            log.exception("kernel %s: wake failed", self.kernel_id)
            self._wake_failed(token, f"internal error while bringing the kernel: {exc}", failed)
            return
        self._started()  # from here an interrupt, a suspend order, a lease that ends reach it
        if saved is not None:  # the kernel holds the state now; the old checkpoint can go
            self._drop_checkpoint(saved, delete=copied)

    def _started(self) -> None:
        """The kernel runs and the proxy is attached, unless a shutdown came meanwhile (then
        the phase says ended, and the clean-up ends the kernel just launched)."""
        with self._lock:
            if self._phase in (Phase.STARTING, Phase.RESUMING):
                self._phase = advance(self._phase, Event.STARTED)

    def _wake_failed(self, token: CancelToken, text: str, ename: str) -> None:
        self.message = text
        self._undo_start(token)
        with self._lock:
            if self._phase in (Phase.STARTING, Phase.RESUMING):
                self._phase = advance(self._phase, Event.START_FAILED)
            closing = self._phase in (Phase.ENDED, Phase.CLOSED)
        if not closing:
            self._to_proxy("wake_failed", text, ename)

    def _start_on(
        self,
        lease: Lease,
        saved: SavedState | None,
        token: CancelToken,
        say: Callable[[str], None],
        started: float | None = None,
    ) -> bool:
        """Launch on ``lease`` (restoring ``saved``), attach the proxy: the cells go. True when
        ``saved`` was copied here from another host (its old copy is then the caller's to
        delete, once the kernel counts as running)."""
        assert lease.host is not None and lease.slot is not None and self._launch_args
        target = target_for(lease.host, self.settings)
        say(f"Leased GPU slot {lease.slot.id} ({lease.slot.kind}) on {lease.host.name}")
        conn = self.link.open(target, token)
        path, copied = None, False
        if saved is not None:
            path, copied = saved_state.bring_to(
                saved, self.kernel_id, self.settings, conn, target, self._shared_dir(), token, say
            )
        key, scheme, env = self._launch_args
        if saved is not None:  # until restored, the kernel saves nothing over the saved state
            env = {**env, RESTORE_PENDING_ENV: "1"}
        request = kernel_steps.launch_request(
            self.kernel_id,
            lease,
            key,
            scheme,
            env,
            warm=self.settings.warm,
            warm_preload=self.settings.warm_preload,
        )
        say(f"Shared GPU: starting the kernel on {lease.host.name} slot {lease.slot.id}")
        kernel = self.link.launch(request, token)
        control = self._new_control(kernel)
        self.info.send_now(control, lease)  # %gpu knows its lease from the first moment
        if saved is not None:
            drops = self._link_drops
            kernel_steps.restore(
                control,
                kernel,
                lease,
                path,
                token,
                say,
                started if started is not None else time.monotonic(),
                lambda: self._link_drops != drops,
            )
        else:
            self.proxy.clear_status()
        self.proxy.attach(kernel.upstream)  # the waiting cells run now
        self.exit_code = None
        if saved is not None:
            self.saved = None  # a shutdown from now on must not delete what the kernel runs in
            return copied
        self._say(
            f"running on {lease.host.name} ({kernel.reply.hostname}), slot "
            f"{lease.slot.id}, CUDA_VISIBLE_DEVICES={lease.slot.device}"
        )
        return False

    def _undo_start(self, token: CancelToken) -> None:
        """A start or resume failed: end the kernel it launched, give back the lease."""
        kernel = self.link.kernel
        may_run = False
        if kernel is not None and not kernel.exited.is_set():
            may_run = not kernel_steps.end_kernel(self.link)
        self.link.drop_kernel()
        self._drop_control()
        self.keeper.release("kernel_may_run" if may_run else "released")

    def _new_control(self, kernel: KernelOnHost) -> KernelControl:
        assert self._launch_args is not None
        key, scheme, _ = self._launch_args
        self._drop_control()
        control = KernelControl(kernel.upstream["control"], key, scheme)
        self._own_sessions.append(control.session_id)
        self.proxy.set_own_sessions(self._own_sessions)
        self.control = control
        return control

    def _drop_control(self) -> None:
        control, self.control = self.control, None
        if control is not None:
            control.close()

    def _with_broker(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(client, *args)`` with a client of its own (clients are not thread-safe)."""
        client = self._make_client()
        try:
            return call(client, *args)
        finally:
            client.close()

    def _shared_dir(self) -> str | None:
        """The broker's ``checkpoint_dir`` (mounted on every host), if it names one."""
        lease = self.keeper.lease
        shared = lease.policy.get("checkpoint_dir") if lease is not None else None
        return shared if isinstance(shared, str) and shared else None

    # ---- the lease keeper's events (its thread; return at once) ----------------------------------

    def lease_info(self, lease: Lease) -> None:
        self.info.wanted()

    def lease_order(self, order: dict[str, Any]) -> None:
        if order.get("order") != "suspend":
            log.info("kernel %s: ignored an unknown order %r", self.kernel_id, order)
            return
        reason = str(order.get("reason") or "idle")
        forced = bool(order.get("forced", reason in FORCED_REASONS))
        grace = float(order.get("grace") or DEFAULT_BUSY_GRACE)
        self.request_suspend(reason, forced=forced, grace=grace)

    def lease_ended(self, lease: Lease) -> None:
        """The broker ended our lease (expired while it could not hear us, reset by an admin):
        the kernel must not keep the slot; save it (the broker's fence does too) and stand in."""
        why = f"the broker ended this kernel's lease ({lease.state})"
        self.message = why
        self._cancel_op(why, only=("wake", "start"))
        with self._lock:
            running = self._phase in (Phase.RUNNING, Phase.RECONNECTING)
        if running:
            self.request_suspend("lease ended", forced=True, grace=DEFAULT_BUSY_GRACE, lost=True)

    def heartbeat_trouble(self, message: str | None) -> None:
        self.broker_trouble = message

    # ---- suspend ---------------------------------------------------------------------------------

    def request_suspend(
        self, reason: str, forced: bool = False, grace: float = 0.0, lost: bool = False
    ) -> bool:
        """Ask for a suspend (broker's order, "Suspend now", a lease that ended); False when
        one is already on its way or nothing runs. Returns at once."""
        with self._lock:
            if self._suspend_pending or self._phase not in (Phase.RUNNING, Phase.RECONNECTING):
                return False
            self._suspend_pending = True
        self._submit("suspend", lambda token: self._op_suspend(token, reason, forced, grace, lost))
        return True

    def _op_suspend(
        self, token: CancelToken, reason: str, forced: bool, grace: float, lost: bool
    ) -> None:
        try:
            if forced and self.proxy.activity().busy:
                kernel_steps.stop_running_cell(
                    lambda: self.proxy.activity().busy,
                    self.proxy.notify_running_cell,
                    self.interrupt,
                    token,
                    reason,
                    grace,
                )
            with self._lock:
                kernel, control = self.link.kernel, self.control
                if self._phase is not Phase.RUNNING or kernel is None or control is None:
                    return
                self._phase = advance(self._phase, Event.SUSPEND)
            self._suspend(token, kernel, control, reason, lost)
        finally:
            with self._lock:
                self._suspend_pending = False

    def _suspend(
        self,
        token: CancelToken,
        kernel: KernelOnHost,
        control: KernelControl,
        reason: str,
        lost: bool,
    ) -> None:
        lease = self.keeper.lease
        self.proxy.hold()  # cells run from now on wait (then resume the kernel)
        request: dict[str, Any] = {"reason": reason}
        shared = self._shared_dir()
        if shared and lease is not None:
            request["checkpoint"] = f"{shared}/{lease.user}/{self.kernel_id}"
        try:
            result = kernel_steps.ask_to_save(control, kernel, self.link, request, token)
        except Cancelled:
            return  # shutting down: the clean-up ends the kernel
        if not result.saved:
            log.warning("kernel %s stays running: %s", self.kernel_id, result.error)
            self.message = result.error
            with self._lock:
                if self._phase is Phase.SUSPENDING:
                    self._phase = advance(self._phase, Event.REFUSED)
            if not result.busy:  # a real failure (disk full...): the user must hear of it
                self.proxy.notice_next_cell(
                    f"Shared GPU: {result.error} ({reason}); the kernel keeps running, with "
                    "its variables, on its GPU"
                )
            self.proxy.release()
            return
        self._enter_suspended(result.path, result.bytes, reason, lost)

    def _enter_suspended(
        self, path: str | None, nbytes: int, reason: str, lost: bool = False
    ) -> None:
        """The kernel process has ended with its state saved: give the slot back, stand in."""
        lease = self.keeper.lease
        target = self.link.target
        host = lease.host if lease is not None else None
        if host is None and self.saved is None and target is not None:
            host = saved_state.host_info(target)
        if host is not None:
            self.saved = SavedState(host, path, nbytes, reason, time.time())
        checkpoint = None
        if host is not None and path:
            checkpoint = {
                "host": host.name,
                "path": path,
                "bytes": nbytes,
                "kernel_id": self.kernel_id,
            }
        self.link.drop_kernel()
        self._drop_control()
        if not lost:
            self.keeper.release("suspended", checkpoint)
        with self._lock:
            event = Event.SUSPENDED if self._phase is Phase.SUSPENDING else Event.SAVED_ITSELF
            if self._phase in (Phase.SUSPENDING, Phase.RUNNING, Phase.RECONNECTING):
                self._phase = advance(self._phase, event)
        self._to_proxy("stand_in", self.wake)
        where = host.name if host is not None else "its host"
        self.message = None
        self._say(
            f"suspended ({reason}): state saved on {where} ({format_bytes(nbytes)}); GPU slot "
            "given back; the next cell resumes the kernel"
        )

    def _kernel_said_suspended(self, notice: dict) -> None:
        """The kernel's IOPub notice (``%gpu suspend``): it saved itself and is exiting."""
        self._submit("saved itself", lambda token: self._op_saved_itself(token, notice))

    def _op_saved_itself(self, token: CancelToken, notice: dict) -> None:
        kernel = self.link.kernel
        with self._lock:
            if self._phase not in (Phase.RUNNING, Phase.RECONNECTING) or kernel is None:
                return
        if not kernel.exited.wait(kernel_steps.EXIT_TIMEOUT):
            kernel_steps.end_kernel(self.link)
        path, nbytes = notice.get("checkpoint"), notice.get("bytes")
        self._enter_suspended(
            path if isinstance(path, str) else None,
            nbytes if isinstance(nbytes, int) else 0,
            str(notice.get("reason") or "by the kernel"),
        )

    # ---- the host link's events (its thread; return at once) -------------------------------------

    def kernel_exited(self, code: int | None) -> None:
        with self._lock:
            phase = self._phase
        if phase in (Phase.STARTING, Phase.RESUMING, Phase.SUSPENDING):
            return  # the operation under way sees it (KernelOnHost.exited)
        if phase not in (Phase.RUNNING, Phase.RECONNECTING):
            return
        if code == SUSPENDED_EXIT_CODE:
            # %gpu suspend (its notice may still come), the orphan watchdog, a fence's save
            self._submit("saved itself", self._op_exited_saved)
            return
        with self._lock:
            if self._phase in (Phase.RUNNING, Phase.RECONNECTING):
                self._phase = advance(self._phase, Event.EXITED)
                self.exit_code = code if code is not None else -1
            ending = self._ending
        if not ending:
            self.message = f"the kernel process ended {exit_text(code)}"
            log.warning("kernel %s ended %s", self.kernel_id, exit_text(code))
        self._to_proxy("detach")

    def _op_exited_saved(self, token: CancelToken) -> None:
        kernel = self.link.kernel
        with self._lock:
            if self._phase not in (Phase.RUNNING, Phase.RECONNECTING):
                return  # the notice's operation came first
            lost = self.keeper.lease is None
        saved = (kernel.saved if kernel is not None else None) or {}
        self._enter_suspended(saved.get("path"), saved.get("bytes") or 0, "by the kernel", lost)

    def link_lost(self, why: str) -> None:
        self._link_drops += 1
        target = self.link.target
        where = target.name if target is not None else "the host"
        self.message = f"lost the connection to {where} ({why}); reconnecting"
        with self._lock:
            if self._phase is Phase.RUNNING:
                self._phase = advance(self._phase, Event.LINK_LOST)
            else:
                return  # a suspend or resume under way meets the failure itself
        self._to_proxy("detach")
        self._to_proxy(
            "notify_running_cell",
            f"Shared GPU: lost the connection to {where} ({why}); reconnecting. The kernel "
            "keeps running there; nothing is lost.",
        )

    def link_retrying(self, attempt: int, why: str, next_in: float) -> None:
        target = self.link.target
        where = target.name if target is not None else "the host"
        self.message = f"cannot reach {where} ({why}); retry {attempt} in {next_in:.0f}s"

    def link_restored(self, upstream: dict[str, int]) -> None:
        kernel = self.link.kernel
        with self._lock:
            if self._phase is not Phase.RECONNECTING or kernel is None:
                return
            self._phase = advance(self._phase, Event.LINK_RESTORED)
        self.message = None
        self._new_control(kernel)
        self._to_proxy("attach", upstream, "127.0.0.1", True)
        self.info.wanted()
        self._say("reconnected to the kernel")

    def link_gave_up(self, why: str) -> None:
        """The link stayed down past the kernel's orphan grace: it has saved itself by now (if
        its host is up). Give the slot back for fencing and stand in; a cell retries later."""
        self._submit("give up", lambda token: self._op_gave_up(why))

    def _op_gave_up(self, why: str) -> None:
        with self._lock:
            if self._phase is not Phase.RECONNECTING:
                return
            self._phase = advance(self._phase, Event.GAVE_UP)
        lease, target = self.keeper.lease, self.link.target
        host = lease.host if lease is not None else None
        if host is None and target is not None:
            host = saved_state.host_info(target)
        if host is not None:
            self.saved = SavedState(host, None, 0, "host unreachable", time.time())
        self.link.drop_kernel()
        self._drop_control()
        self.keeper.release("kernel_may_run")
        self.message = (
            f"{why}; the kernel saves its state there when it stops hearing from us; run a "
            "cell to resume it once the host is back"
        )
        self._to_proxy("stand_in", self.wake)

    # ---- Jupyter's process-like calls -----------------------------------------------------------

    def poll(self) -> int | None:
        """None while the kernel runs, is suspended or not started; its exit code once ended.
        Never touches the network."""
        with self._lock:
            phase = self._phase
            if phase is Phase.ENDED:
                return self.exit_code if self.exit_code is not None else 0
            if phase is Phase.CLOSED:
                return 0
            if self._ending and phase is not Phase.RUNNING:
                # a shutdown: whatever is under way (queue, restore, save, reconnect) was
                # cancelled; the clean-up ends what is left on the host (``close``)
                return 0
        return None

    def interrupt(self) -> None:
        """Jupyter's interrupt (SIGINT): the running cell, or the wait for a kernel."""
        with self._lock:
            phase, control = self._phase, self.control
        if phase in (Phase.STARTING, Phase.RESUMING):
            self._cancel_op("interrupted: the request for a GPU slot was withdrawn", ("wake",))
        elif phase is Phase.RUNNING and control is not None:
            control.send("interrupt_request", {})
        elif phase is Phase.RECONNECTING:
            self.proxy.notify_running_cell(
                "Shared GPU: cannot interrupt now: the connection to the kernel's host is down "
                "(reconnecting)"
            )

    def signal(self, signum: int) -> None:
        """Another signal for the kernel process (over SSH)."""
        if signum == _signal.SIGINT:
            self.interrupt()
            return
        if self._phase is Phase.RUNNING:
            self.link.ctl("signal", deadline(CLEANUP_STEP), signum)

    def kill(self) -> None:
        """Jupyter's kill/terminate (or its shutdown timing out): the kernel counts as ended
        now; the process on the host is ended by what comes next, the clean-up of a shutdown
        (``close``, in the background) or of a restart (``prepare_restart``), so this never
        waits on the network."""
        self.shutdown_requested(restart=False)
        with self._lock:
            if self._phase in WITH_PROCESS:
                self._phase = advance(self._phase, Event.END)
                self.exit_code = 128 + _signal.SIGKILL

    def shutdown_requested(self, restart: bool) -> None:
        """Jupyter sent shutdown_request: stop any wait for a kernel; a kernel that has no
        process has ended now (``poll`` says so at once)."""
        with self._lock:
            self._ending = True
            phase = self._phase
        self._cancel_op("the kernel is shutting down", ("wake", "start"))
        if phase not in WITH_PROCESS:
            with self._lock:
                if self._phase not in (Phase.ENDED, Phase.CLOSED) and (
                    self._phase not in WITH_PROCESS
                ):
                    self._phase = advance(self._phase, Event.END)
                    self.exit_code = 0

    def prepare_restart(self) -> None:
        """After a shutdown for a restart: drop what the old kernel had, keep the lease and
        the proxy; the saved state (if suspended) is deleted."""
        self._cancel_op("the kernel is restarting")
        kernel = self.link.kernel
        if kernel is not None and not kernel.exited.is_set():
            kernel_steps.end_kernel(self.link)
        self.link.drop_kernel()
        self._drop_control()
        self.proxy.forget_kernel()
        self._discard_saved()
        with self._lock:
            self._ending = False
            if self._phase not in (Phase.ENDED, Phase.CLOSED):
                self._phase = advance(self._phase, Event.END)
            self.exit_code = 0

    def _discard_saved(self) -> None:
        saved, self.saved = self.saved, None
        if saved is not None:
            self._drop_checkpoint(saved, delete=True)

    def _drop_checkpoint(self, saved: SavedState, delete: bool) -> None:
        """``saved`` is needed no more: delete it on its host (not when a kernel on that host
        was resumed from it: it is that kernel's runtime dir now) and tell the broker."""
        if delete:
            saved_state.delete(
                saved, self.kernel_id, self.settings, self._shared_dir(), deadline(CLEANUP_STEP)
            )
        self._with_broker(saved_state.forget, self.kernel_id)

    # ---- shutdown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Shutdown: cancel what is under way and free the local ports now; end the kernel on
        its host, release the lease (saying when the kernel may still run, so the broker fences
        it first) and delete saved state in a thread (``closed`` is set when done), so Jupyter
        has its answer at once. The thread is not a daemon: a Jupyter server that exits waits
        for it (each of its steps is bounded)."""
        with self._lock:
            if self._phase is Phase.CLOSED or self._closing:
                return
            self._ending = self._closing = True
        self._cancel_op("the kernel is shutting down")
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.proxy.close()
        threading.Thread(
            target=self._finish_close, name=f"session-close-{self.kernel_id[:8]}"
        ).start()

    def _finish_close(self) -> None:
        try:
            self._clean_up_for_good()
        except Exception:  # the slot must still go back: say what failed
            log.exception("kernel %s: the clean-up after shutdown failed", self.kernel_id)
            self.keeper.release("kernel_may_run")
        finally:
            self.closed.set()

    def _clean_up_for_good(self) -> None:
        self._wait_worker(CLEANUP_STEP)
        kernel = self.link.kernel
        may_run = self._kernel_may_run
        if kernel is not None and not kernel.exited.is_set():
            try:
                self.link.ctl("cleanup", deadline(CLEANUP_STEP))
            except (SharedGPUError, Cancelled) as err:
                log.warning("could not end kernel %s on its host: %s", self.kernel_id, err)
                may_run = True
        elif kernel is not None:
            try:
                self.link.ctl("cleanup", deadline(CLEANUP_STEP))
            except (SharedGPUError, Cancelled) as err:
                log.info("could not remove the files of kernel %s: %s", self.kernel_id, err)
        self.keeper.release("kernel_may_run" if may_run else "released")
        self._discard_saved()
        with self._lock:
            self._phase = advance(self._phase, Event.CLOSE)
        self.info.close()
        self.keeper.close()
        self.link.close()
        self._drop_control()

    def _wait_worker(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self._lock:
                if self._op_token is None:
                    return
            time.sleep(0.02)
        log.warning(
            "kernel %s: %s did not stop within %.0fs", self.kernel_id, self._op_name, seconds
        )

    # ---- re-attach (a restarted Jupyter server finds its kernels again) --------------------------

    def describe(self) -> dict[str, Any]:
        """What ``reattach`` needs, as JSON-able data (no secret: the key stays with Jupyter)."""
        lease, kernel, saved = self.keeper.lease, self.link.kernel, self.saved
        return {
            "lease_id": lease.id if lease else None,
            "kernel": kernel.reply.to_json() if kernel else None,
            # where the kernel runs: if its lease ends while no server hears from it, the fence
            # saves it there, and a re-attach resumes it from that host
            "host": dataclasses.asdict(lease.host) if lease and lease.host else None,
            "saved": saved.to_json() if saved else None,
            "proxy_ports": dict(self.proxy.ports),
        }

    def reattach(self, saved: dict[str, Any], key: bytes, scheme: str) -> None:
        """Take over a kernel another process of ours started: its lease and host process, or
        its saved state; a kernel whose lease ended meanwhile comes back suspended when its
        fence saved it. Raises ``LeaseLost`` when nothing can be found again."""
        self.proxy.configure_session(key, scheme)
        self._launch_args = (key, scheme, {})
        if saved.get("saved"):
            self.saved = SavedState.from_json(saved["saved"])
            self._advance(Event.ADOPT_SAVED)
            self.proxy.stand_in(self.wake)
            return
        if not saved.get("lease_id") or not saved.get("kernel"):
            self.proxy.stand_in(self.wake)  # it never took a GPU: a fresh start on a cell
            return
        raw = saved["kernel"]
        reply = LaunchReply.from_json(raw if isinstance(raw, str) else json.dumps(raw))
        client = self._make_client()
        try:
            lease = client.get_lease(saved["lease_id"])
            records = client.checkpoints(self.kernel_id) if lease.state != "granted" else []
        finally:
            client.close()
        if lease.state != "granted":
            self._reattach_saved(lease, records, HostInfo.from_json(saved.get("host")))
            return
        assert lease.host is not None
        token = deadline(self.settings.launch_timeout)
        self.link.open(target_for(lease.host, self.settings), token)
        kernel = self.link.adopt(reply, token)
        if kernel is None:
            raise LeaseLost(
                f"cannot re-attach: kernel {self.kernel_id} is no longer running on "
                f"{lease.host.name}",
                "start a new kernel",
            )
        self.keeper.adopt(lease)
        self._new_control(kernel)
        self.proxy.attach(kernel.upstream)
        self._advance(Event.ADOPT_RUNNING)
        self.info.send_now(self.control, lease)
        self.info.wanted()
        self._say(f"re-attached to the kernel on {lease.host.name}")

    def _reattach_saved(
        self, lease: Lease, records: list[dict[str, Any]], host: HostInfo | None
    ) -> None:
        """The lease ended while no server heard from the kernel: its fence saved it (the
        broker's record says where) on the host it ran on."""
        host = host or lease.host
        saved = [r for r in records if r.get("state") != "expired" and r.get("host")]
        if not saved or host is None or saved[0]["host"] != host.name:
            raise LeaseLost(
                f"cannot re-attach: the broker ended lease {lease.id} ({lease.state}) and "
                "holds no saved state of the kernel",
                "start a new kernel; its variables are lost",
            )
        record = saved[0]
        self.saved = SavedState(
            host,
            record.get("path") or None,
            int(record.get("bytes") or 0),
            "the Jupyter server went away",
            time.time(),
        )
        self._advance(Event.ADOPT_SAVED)
        self.proxy.stand_in(self.wake)
        self._say(f"re-attached: the kernel's state is saved on {host.name}")
