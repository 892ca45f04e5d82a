"""The IPython kernel that runs on a GPU host: ``python -m gpu_kernel kernel -f CONNFILE``.

Started by ``launcher.start_kernel`` in its own session. ``GPUKernelApp`` binds 127.0.0.1 only,
whatever the connection file says, and writes ``exit_code`` next to the connection file when it
exits (cleanly, by ``sys.exit``, or by SIGTERM), so ``ctl status`` can report it.

``GPUKernel`` adds the shared-GPU control messages (docs/internals.md, "Suspend and resume"):
``usage_request`` with NVML figures, ``suspend_request`` (checkpoint the namespace into
``<runtime dir>/checkpoint``, reply, exit with ``SUSPENDED_EXIT_CODE``), ``restore_request``,
``shared_gpu_info``; an orphan watchdog (no control message for ``SHARED_GPU_ORPHAN_GRACE`` s,
default 120, "0" disables: suspend itself once idle; armed when that variable is set or the first
``shared_gpu_info`` arrives); ``SAVE_SIGNAL`` (the broker's fence: save as soon as no cell runs,
exit with ``SUSPENDED_EXIT_CODE``); and the ``%gpu`` magics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from tornado.ioloop import PeriodicCallback
from traitlets import Type, validate

from gpu_kernel import __version__, nvml
from gpu_kernel.control import (
    KernelActivity,
    KernelBusy,
    RestorePending,
    error_reply,
    orphan_grace,
    restore_reply,
    suspend_reply,
)
from gpu_kernel.protocol import SAVE_SIGNAL, SUSPENDED_EXIT_CODE

LOOPBACK = "127.0.0.1"
SUSPENDED_NOTICE = "shared_gpu_suspended"  # IOPub: the kernel saved itself and will exit
ORPHAN_EXIT_CODE = 70  # orphaned and the checkpoint failed: exits anyway, the GPU goes back
EXIT_DELAY = 0.2  # s between the last reply and the exit, for IOPub's idle status to go out
SAVE_RETRY = 0.1  # s between two looks at a running cell after SAVE_SIGNAL


class GPUKernel(IPythonKernel):
    """An IPython kernel with the shared-GPU control messages, watchdog and ``%gpu``."""

    implementation = "gpu_kernel"
    implementation_version = __version__
    control_msg_types = [
        *IPythonKernel.control_msg_types,
        "suspend_request",
        "restore_request",
        "shared_gpu_info",
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.activity = KernelActivity()
        self.orphan_grace = orphan_grace()
        self.exit_status: int | None = None
        self._suspend_after_cell = False
        self._exit_after_cell = False
        self._watchdog: PeriodicCallback | None = None

    # -- set-up --------------------------------------------------------------------------------

    @property
    def runtime_dir(self) -> Path:
        """The folder of the connection file (the launcher's ``<runtime_root>/<kernel_id>``)."""
        conn = getattr(self.parent, "abs_connection_file", "") or getattr(
            self.parent, "connection_file", ""
        )
        return Path(conn).absolute().parent if conn else Path.cwd()

    def start(self) -> None:
        super().start()
        from gpu_kernel.magics import GPUMagics

        if self.shell is not None:
            self.shell.register_magics(GPUMagics(self.shell, self))
            self.shell.events.register("post_run_cell", self._post_run_cell)
        if self.orphan_grace > 0:
            period = max(50.0, min(1000.0, self.orphan_grace * 250))
            self._watchdog = PeriodicCallback(self._check_orphaned, period)
            self._watchdog.start()
        signal.signal(SAVE_SIGNAL, self._on_save_signal)

    # -- activity ------------------------------------------------------------------------------

    async def process_control(self, msg: Any) -> None:
        self.activity.control_seen()
        await super().process_control(msg)

    async def execute_request(self, stream: Any, ident: Any, parent: dict) -> None:
        while self.activity.restoring:
            await asyncio.sleep(0.02)
        if not self.activity.cell_started():
            # A suspend is under way and the process is about to exit: no reply, no idle
            # status; the proxy sends the request again to the resumed kernel.
            await asyncio.Event().wait()
        try:
            await super().execute_request(stream, ident, parent)
        finally:
            self.activity.cell_finished()
        if self._exit_after_cell:
            self._exit_after_cell = False
            self._exit(SUSPENDED_EXIT_CODE)

    # -- control messages ----------------------------------------------------------------------

    async def usage_request(self, stream: Any, ident: Any, parent: dict) -> None:
        """ipykernel's usage figures + ``gpu`` (NVML, or null) + ``shared_gpu``."""
        if not self.session:
            return
        content = self._process_usage()
        content["gpu"] = nvml.device_usage()
        content["shared_gpu"] = self.activity.shared_gpu()
        self.session.send(stream, "usage_reply", content, parent, ident)

    def _process_usage(self) -> dict[str, Any]:
        """The fields ipykernel's own ``usage_request`` answers (hostname, pid, CPU, memory)."""
        content: dict[str, Any] = {"hostname": socket.gethostname(), "pid": os.getpid()}
        try:
            import psutil
        except ImportError:
            content["cpu_count"] = os.cpu_count()
            return content
        current = psutil.Process()
        procs = [current, *current.children(recursive=True)]
        self.processes = {p.pid: self.processes.get(p.pid, p) for p in procs}
        metric = self.get_process_metric_value
        content["kernel_cpu"] = sum(metric(p, "cpu_percent", None) for p in self.processes.values())
        mem_type = "pss" if hasattr(current.memory_full_info(), "pss") else "rss"
        content["kernel_memory"] = sum(
            metric(p, "memory_full_info", mem_type) for p in self.processes.values()
        )
        cpu = psutil.cpu_percent()
        if cpu:
            content["host_cpu_percent"] = cpu
        content["cpu_count"] = psutil.cpu_count(logical=True)
        content["host_virtual_memory"] = dict(psutil.virtual_memory()._asdict())
        return content

    async def shared_gpu_info(self, stream: Any, ident: Any, parent: dict) -> None:
        """Lease, policy, queue and quota from the proxy (for ``%gpu``); also its keepalive."""
        content = parent.get("content")
        if isinstance(content, dict):
            self.activity.set_info(content)
        self.session.send(stream, "shared_gpu_info_reply", {"status": "ok"}, parent, ident)

    async def suspend_request(self, stream: Any, ident: Any, parent: dict) -> None:
        """Checkpoint, reply, exit with SUSPENDED_EXIT_CODE (an error reply keeps it running)."""
        request = parent.get("content") or {}
        reason = str(request.get("reason", ""))
        where = request.get("checkpoint")  # a shared checkpoint_dir's place, else the runtime dir
        try:
            content = self.checkpoint(reason, directory=Path(where) if where else None)
        except Exception as e:
            self.session.send(stream, "suspend_reply", error_reply(e), parent, ident)
            return
        self.session.send(stream, "suspend_reply", content, parent, ident)
        with contextlib.suppress(Exception):
            stream.flush(zmq.POLLOUT)
        self._exit(SUSPENDED_EXIT_CODE)

    async def restore_request(self, stream: Any, ident: Any, parent: dict) -> None:
        """Load a checkpoint into this (idle) kernel's namespace."""
        path = (parent.get("content") or {}).get("checkpoint") or str(self.checkpoint_dir)
        try:
            content = self.restore(Path(path))
        except Exception as e:
            content = error_reply(e)
        self.session.send(stream, "restore_reply", content, parent, ident)

    # -- checkpoint and restore ----------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.runtime_dir / "checkpoint"

    def checkpoint(
        self, reason: str, *, from_cell: bool = False, directory: Path | None = None
    ) -> dict[str, Any]:
        """Save the user's namespace (into ``directory``, default the runtime dir's); returns the
        ``suspend_reply`` content. Leaves the kernel marked as suspending (no cell starts any
        more) unless it raises. Blobs go to the owner's store on this host (only those it does
        not hold yet), or beside a shared ``directory``."""
        from gpu_kernel.checkpoint import save_namespace

        target = directory or self.checkpoint_dir
        self.activity.begin_suspend(from_cell=from_cell)
        try:
            t0 = time.monotonic()
            shell = self.shell
            self.log.info("suspending (%s): checkpoint to %s", reason or "asked", target)
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            manifest = save_namespace(
                shell.user_ns,
                target,
                self._key(),
                hidden=shell.user_ns_hidden,
                execution_count=shell.execution_count,
                cwd=os.getcwd(),
                store=None if directory else self._blob_store(),
            )
        except BaseException:
            self.activity.abort_suspend()
            raise
        self._record_saved(target, int(manifest.total_bytes))
        content = suspend_reply(str(target), manifest, time.monotonic() - t0)
        content["written"] = manifest.written_bytes
        return content

    def _record_saved(self, target: Path, nbytes: int) -> None:
        """Note where the state went (``saved.json`` in the runtime dir): ``ctl status`` and the
        watch report it after the exit, for a caller whose suspend reply was lost, or a fence."""
        record = self.runtime_dir / "saved.json"
        tmp = record.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"path": str(target), "bytes": nbytes}))
            os.replace(tmp, record)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load the checkpoint at ``path`` into ``user_ns``; returns the ``restore_reply``.

        Never lets the kernel die: a variable that fails is named in ``dropped``; a checkpoint
        that can't be trusted or is incomplete raises CheckpointError (the caller answers an
        error reply) and is left as it is."""
        from gpu_kernel.checkpoint import load_namespace

        self.activity.begin_restore()
        restored = False
        try:
            t0 = time.monotonic()
            shell = self.shell
            # Into user_ns itself, so restored functions see the notebook's globals; imports and
            # the working directory come back too. device=None: the slot's GPU if torch sees
            # one, else the CPU (and torch is not imported for a checkpoint without tensors).
            _, manifest = load_namespace(
                path,
                self._key(),
                namespace=shell.user_ns,
                modules_dir=self.runtime_dir / "modules",
            )
            if manifest.execution_count:
                shell.execution_count = int(manifest.execution_count)
            # the same count the suspend said it saved: variables; the imports apart
            names = [v.name for v in manifest.variables]
            if not path.is_relative_to(self.checkpoint_dir.parent):
                # a shared checkpoint_dir's copy is consumed: the next suspend writes a new one
                shutil.rmtree(path, ignore_errors=True)
            content = restore_reply(sorted(names), manifest, time.monotonic() - t0)
            content["imports"] = sorted(manifest.imports)
            content["notes"] = list(manifest.notes)
            restored = True
            return content
        finally:
            self.activity.end_restore(restored)

    def _blob_store(self) -> Path:
        """``<root>/<host>/.blobs/<owner>``: shared by this user's kernels on this host only."""
        from gpu_kernel.checkpoint import runtime_store
        from gpu_kernel.launcher import launch_record
        from gpu_kernel.protocol import USER_NAME_RE

        owner = (launch_record(self.runtime_dir) or {}).get("owner")
        if not isinstance(owner, str) or not USER_NAME_RE.fullmatch(owner):
            owner = "_unknown"  # started by hand, not by the launcher
        return runtime_store(self.runtime_dir, owner)

    def _key(self) -> bytes:
        key = self.session.key
        return key if isinstance(key, bytes) else str(key).encode()

    # -- self-suspend: %gpu suspend and the orphan watchdog --------------------------------------

    def suspend_after_cell(self) -> None:
        """``%gpu suspend``: checkpoint once this cell has run, then exit after its reply."""
        self._suspend_after_cell = True

    def _post_run_cell(self, result: Any) -> None:
        if not self._suspend_after_cell:
            return
        self._suspend_after_cell = False
        try:
            content = self.checkpoint("%gpu suspend", from_cell=True)
        except Exception as e:
            print(f"Could not suspend: {e}", file=sys.stderr)
            return
        print(_suspended_text(content))
        # Tell the session proxy first (IOPub goes out before this cell's reply), so it holds
        # the next cell for the resume instead of sending it to a process about to exit.
        notice = {k: content[k] for k in ("checkpoint", "bytes")}
        self.session.send(
            self.iopub_socket,
            SUSPENDED_NOTICE,
            {**notice, "reason": "%gpu suspend"},
            parent=self.get_parent("shell"),
            ident=self._topic(SUSPENDED_NOTICE),
        )
        self._exit_after_cell = True

    def _check_orphaned(self) -> None:
        """Watchdog tick (main thread, so never inside a synchronous cell)."""
        if self.exit_status is not None or not self.activity.orphaned(self.orphan_grace):
            return
        self.log.warning(
            "no word from the session proxy for %.0f s: suspending (orphaned)", self.orphan_grace
        )
        try:
            self.checkpoint("orphaned")
        except KernelBusy:
            return  # a cell or a suspend started meanwhile: look again at the next tick
        except RestorePending:
            self.log.warning("orphaned before its saved state was restored: exiting, state kept")
            self._exit(SUSPENDED_EXIT_CODE)  # the saved state is the one it was to resume
            return
        except Exception:
            self.log.exception("orphaned and the checkpoint failed: exiting to free the GPU")
            self._exit(ORPHAN_EXIT_CODE)
            return
        self._exit(SUSPENDED_EXIT_CODE)

    # -- SAVE_SIGNAL: the broker's fence asks for a save before it ends the kernel --------------

    def _on_save_signal(self, signum: int, frame: object) -> None:
        """Signal handler (main thread, between bytecodes): hand the save to the IO loop."""
        self.io_loop.add_callback(self._save_for_fence)

    def _save_for_fence(self) -> None:
        """Save the namespace as soon as no cell runs (as the orphan watchdog does), then exit
        with SUSPENDED_EXIT_CODE; ORPHAN_EXIT_CODE when the save failed (the fence kills what
        is left after its grace either way)."""
        if self.exit_status is not None or self.activity.suspending:
            return  # already on its way out (a suspend or the watchdog saves)
        self.log.warning("SAVE_SIGNAL: the broker is ending this kernel; saving first")
        try:
            self.checkpoint("fenced")
        except KernelBusy:
            self.io_loop.call_later(SAVE_RETRY, self._save_for_fence)  # a cell runs: wait
            return
        except RestorePending:
            self.log.warning("SAVE_SIGNAL before the saved state was restored: that state stays")
            self._exit(SUSPENDED_EXIT_CODE)
            return
        except Exception:
            self.log.exception("SAVE_SIGNAL: the checkpoint failed; exiting without it")
            self._exit(ORPHAN_EXIT_CODE)
            return
        self._exit(SUSPENDED_EXIT_CODE)

    def _exit(self, status: int) -> None:
        """Stop the kernel's loops shortly (replies and the idle status go out first); ``run``
        then exits the process with ``status``."""
        if self.exit_status is not None:
            return
        self.exit_status = status
        if self._watchdog is not None:
            self.io_loop.add_callback(self._watchdog.stop)

        def stop() -> None:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            if self.control_stream:
                control_loop = self.control_stream.io_loop
                control_loop.add_callback(control_loop.stop)
            if self.shell_stream and self.shell_stream.io_loop != self.io_loop:
                self.shell_stream.io_loop.add_callback(self.shell_stream.io_loop.stop)
            self.io_loop.stop()

        self.io_loop.add_callback(lambda: self.io_loop.call_later(EXIT_DELAY, stop))


def _suspended_text(content: dict[str, Any]) -> str:
    from gpu_kernel.magics import size

    lines = [
        f"Suspended: {len(content['saved'])} variables ({size(content['bytes'])}) saved to "
        f"{content['checkpoint']} in {content['seconds']:.2f} s; the GPU goes back to the pool "
        "and the next cell resumes this kernel."
    ]
    lines += [f"  not saved: {d['name']} ({d['type']}): {d['reason']}" for d in content["dropped"]]
    return "\n".join(lines)


class GPUKernelApp(IPKernelApp):
    """``IPKernelApp`` with ``GPUKernel`` that never binds anything but the loopback address."""

    name = "gpu-kernel"
    kernel_class = Type(GPUKernel, klass="ipykernel.kernelbase.Kernel").tag(config=True)

    @validate("ip")
    def _loopback_only(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] != LOOPBACK:
            self.log.warning(
                "ignoring ip %r: a shared-GPU kernel binds %s only", proposal["value"], LOOPBACK
            )
        return LOOPBACK

    @validate("transport")
    def _tcp_only(self, proposal: dict[str, Any]) -> str:
        return "tcp"


def _write_exit_code(connection_file: str, code: int) -> None:
    with contextlib.suppress(OSError):
        (Path(connection_file).parent / "exit_code").write_text(f"{code}\n")


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run(connection_file: str, argv: list[str] | None = None) -> int:
    """Run the kernel until it shuts down; returns its exit status (``__main__`` calls this)."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    app = GPUKernelApp.instance()
    code = 1
    try:
        app.initialize(["-f", connection_file, *(argv or [])])
        app.start()
        code = getattr(app.kernel, "exit_status", None) or 0
    except SystemExit as e:
        code = _exit_status(e.code)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    finally:
        _write_exit_code(connection_file, code)
        sys.stdout.flush()
    return code
