"""The GPU-host side of the launch protocol: ``python -m gpu_kernel launch`` and ``... ctl``.

``remote.launch`` runs ``launch`` over SSH (or as a subprocess for a "local" host): it reads one
``LaunchRequest`` line on stdin, starts the kernel in its own session (so it outlives the SSH
channel), waits until it listens, and prints one ``LaunchReply`` line. ``remote.status`` /
``signal`` / ``kill`` / ``cleanup`` run ``ctl``, which acts only on the process whose pid file is in
the kernel's runtime dir and whose command line names that kernel's connection file. ``fence``
(``ctl KERNEL_ID fence``, and the fencing account's ``gpu_kernel.fence``) asks the kernel to
save itself before it kills it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gpu_kernel import __version__, fdwait, procs, warm
from gpu_kernel.errors import BadRequest
from gpu_kernel.protocol import (
    PORT_NAMES,
    PROTOCOL_VERSION,
    SAVE_SIGNAL,
    SUSPENDED_EXIT_CODE,
    KernelStatus,
    LaunchReply,
    LaunchRequest,
    check_host_name,
    check_kernel_id,
)

DEFAULT_RUNTIME_ROOT = "~/.local/share/jupyter-shared-gpu/kernels"
START_TIMEOUT = 30.0
POLL_INTERVAL = 0.02
START_POLL = 0.005  # s between looks at a starting kernel's ports (a warm fork binds in ~20 ms)
WATCH_INTERVAL = 1.0  # s between the watch's "still alive" lines
LAUNCH_RECORD = "launch.json"  # who the kernel belongs to: kernel_id, owner, host_name, slot, pid
SAVED_RECORD = "saved.json"  # where the kernel saved its state last: {"path", "bytes"}
# Variables that would tie the kernel to a process on this side (ipykernel's parent poller).
_DROP_ENV = ("JPY_PARENT_PID", "JPY_INTERRUPT_EVENT")


def runtime_root(root: str | None) -> Path:
    """The directory holding one runtime dir per kernel (``$SHARED_GPU_RUNTIME_ROOT`` overrides)."""
    chosen = root or os.environ.get("SHARED_GPU_RUNTIME_ROOT") or DEFAULT_RUNTIME_ROOT
    return Path(chosen).expanduser().absolute()


def runtime_dir(root: str | None, host_name: str, kernel_id: str) -> Path:
    """``<root>/<host_name>/<kernel_id>``, after checking neither name can escape the root.

    The host's name (the broker's) is part of the path so that hosts sharing a home directory
    (NFS) keep their kernels apart: a cleanup on one host never touches a kernel on another."""
    base = runtime_root(root)
    path = base / check_host_name(host_name) / check_kernel_id(kernel_id)
    if path.parent.parent != base:
        raise BadRequest(f"invalid host name {host_name!r} or kernel_id {kernel_id!r}")
    return path


# -- launch ------------------------------------------------------------------------------------


@dataclass
class Started:
    """A kernel this launcher just started (for ``watch`` when the request asked for it)."""

    rdir: Path
    proc: subprocess.Popen | None  # None: forked by a warm interpreter, not our child
    watch: bool


def request_line(stdin: IO[bytes], wait: float) -> bytes:
    """The request line from ``stdin``; empty when it closed, or stayed silent ``wait`` s (a
    launcher started ahead, ``remote.prepare_launch``, whose request never came)."""
    if not fdwait.ready([stdin], (), wait)[0]:
        return b""
    return stdin.readline(1 << 20)


def launch_main(stdin_line: bytes) -> tuple[LaunchReply, int, Started | None]:
    """Handle one request line; returns the reply, the launcher's exit status and the kernel."""
    try:
        raw = json.loads(stdin_line)
    except ValueError:
        raw = None
    theirs = raw.get("protocol") if isinstance(raw, dict) else None
    if type(theirs) is int and theirs != PROTOCOL_VERSION:
        return LaunchReply.failure(
            "protocol",
            f"launch protocol mismatch: the caller speaks protocol {theirs}, this host's "
            f"jupyter-shared-gpu {__version__} ({sys.executable}) speaks protocol "
            f"{PROTOCOL_VERSION}",
            "install the same jupyter-shared-gpu version on the host as on the Jupyter server "
            f"(e.g. `{sys.executable} -m pip install jupyter-shared-gpu==<server's version>`)",
        ), 1, None
    try:
        request = LaunchRequest.from_json(stdin_line)
        reply, started = start_kernel(request)
        return reply, 0, started
    except BadRequest as e:
        return LaunchReply.failure("bad_request", e.message, e.hint), 1, None
    except StartFailed as e:
        return LaunchReply.failure("start_failed", e.message, e.hint), 1, None


class StartFailed(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def _prepare_dir(rdir: Path) -> None:
    """Create the 0700 runtime dir, or reuse it after a kernel of the same id has died."""
    rdir.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    rdir.parent.mkdir(mode=0o700, exist_ok=True)
    if rdir.is_symlink() or (rdir.exists() and not rdir.is_dir()):
        raise BadRequest(f"runtime dir {rdir} is not a directory", "remove it and launch again")
    if rdir.exists():
        if procs.owned_pid(rdir) is not None:
            raise StartFailed(
                f"a kernel with id {rdir.name} is already running on this host",
                f"run `python -m gpu_kernel ctl {rdir.name} cleanup` first",
            )
        for name in ("connection.json", "kernel.pid", "exit_code", LAUNCH_RECORD, SAVED_RECORD):
            (rdir / name).unlink(missing_ok=True)
    else:
        rdir.mkdir(mode=0o700)
    os.chmod(rdir, 0o700)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def start_kernel(req: LaunchRequest) -> tuple[LaunchReply, Started]:
    """Start the kernel for ``req`` and wait until it accepts on its shell port."""
    rdir = runtime_dir(req.runtime_root, req.host_name, req.kernel_id)
    _prepare_dir(rdir)
    conn_file = rdir / "connection.json"
    info = {f"{n}_port": 0 for n in PORT_NAMES}
    info.update(ip="127.0.0.1", transport="tcp", key=req.key)
    info.update(signature_scheme=req.signature_scheme, kernel_name="shared-gpu")
    _write_private(conn_file, json.dumps(info, indent=1))

    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(req.env)
    env.update(
        CUDA_VISIBLE_DEVICES=req.cuda_visible_devices,
        SHARED_GPU_HOST=req.host_name,
        SHARED_GPU_SLOT=req.slot_id,
        SHARED_GPU_KERNEL_ID=req.kernel_id,
    )
    log_path = rdir / "kernel.log"
    record = {
        "kernel_id": req.kernel_id,
        "owner": req.owner,
        "host_name": req.host_name,
        "slot_id": req.slot_id,
        "started_at": time.time(),
    }
    _write_private(rdir / LAUNCH_RECORD, json.dumps(record))
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "ab") as log:
        log.write(f"--- gpu_kernel {__version__} starting kernel {req.kernel_id}\n".encode())
        log.flush()
    host_dir = rdir.parent
    pid = warm.launch(host_dir, req.owner, rdir, env, os.getcwd()) if req.warm > 0 else None
    proc: subprocess.Popen | None = None
    if pid is None:
        proc = _start_cold(conn_file, log_path, env)
        pid = proc.pid
    procs.write_pid_file(rdir, pid)
    if req.warm > 0:  # the next start or resume of this user's kernels here is warm
        warm.ensure(host_dir, req.owner, req.warm, list(req.warm_preload))

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ended = proc.poll() if proc is not None else (None if procs.alive(pid) else "?")
        if ended is not None:
            raise StartFailed(
                f"the kernel exited with status {ended} while starting; "
                f"kernel.log ends with:\n{_log_tail(log_path, req.key)}",
                f"see {log_path} on the host",
            )
        ports = _bound_ports(conn_file)
        if ports and _accepts(ports["shell"]):
            reply = LaunchReply.success(
                pid, ports, socket.gethostname(), __version__, warm=proc is None
            )
            return reply, Started(rdir, proc, req.watch)
        time.sleep(START_POLL)
    procs.kill_group(pid)
    raise StartFailed(
        f"the kernel did not start listening within {START_TIMEOUT:.0f} s; "
        f"kernel.log ends with:\n{_log_tail(log_path, req.key)}",
        f"see {log_path} on the host; is the host overloaded?",
    )


def _start_cold(conn_file: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """A new interpreter for the kernel (no warm one answered)."""
    argv = [sys.executable, "-m", "gpu_kernel", "kernel", "-f", str(conn_file)]
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    with os.fdopen(fd, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _bound_ports(conn_file: Path) -> dict[str, int] | None:
    """The ports once the kernel has rewritten its connection file with nonzero ones."""
    try:
        info = json.loads(conn_file.read_text())
        ports = {n: int(info[f"{n}_port"]) for n in PORT_NAMES}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not there, or caught half-written
    return ports if all(ports.values()) else None


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tail(path: Path, key: str, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return "(no kernel.log)"
    return data.replace(key, "<key>") if key else data


# -- ctl ---------------------------------------------------------------------------------------


def kernel_status(rdir: Path) -> KernelStatus:
    try:
        exit_code: int | None = int((rdir / "exit_code").read_text().strip())
    except (OSError, ValueError):
        exit_code = None
    alive = procs.owned_pid(rdir) is not None
    saved = saved_checkpoint(rdir) if exit_code == SUSPENDED_EXIT_CODE and not alive else None
    return KernelStatus(alive=alive, exit_code=exit_code, checkpoint=saved)


def saved_checkpoint(rdir: Path) -> dict | None:
    """Where the kernel in ``rdir`` saved its state last (its ``saved.json``, written after each
    checkpoint), or its default checkpoint dir when that holds one; None when neither."""
    try:
        record = json.loads((rdir / SAVED_RECORD).read_text())
        if isinstance(record.get("path"), str) and type(record.get("bytes")) is int:
            return {"path": record["path"], "bytes": record["bytes"]}
    except (OSError, ValueError, AttributeError):
        pass
    default = rdir / "checkpoint"
    if default.is_symlink() or not (default / "manifest.json").is_file():
        return None
    try:  # what the manifest says it needs (its data is in the blob store): for a message only
        size = json.loads((default / "manifest.json").read_bytes())["manifest"]["total_bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        size = 0
    return {"path": str(default), "bytes": size if type(size) is int else 0}


def launch_record(rdir: Path) -> dict | None:
    """What the launcher recorded about the kernel in ``rdir`` (owner, host, slot), or None."""
    try:
        record = json.loads((rdir / LAUNCH_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def watch(
    rdir: Path,
    out: IO[bytes],
    proc: subprocess.Popen | None = None,
    interval: float = WATCH_INTERVAL,
) -> int:
    """Write a ``KernelStatus`` line to ``out`` every ``interval`` s while the kernel in ``rdir``
    runs, and a last one when it has ended (with its exit code); return 0. Stops early, quietly,
    when ``out`` is closed (the SSH channel went away: the kernel runs on).

    The caller on the other end of the channel (the provisioner's host link) learns of the
    kernel's end at once, and of a dead connection when the lines stop coming. ``proc`` is the
    kernel when this process started it (``launch`` with ``watch``): waiting on it gives the
    exit status even after a SIGKILL; otherwise a pidfd (or /proc) tells when it ends."""
    alive_line = KernelStatus(alive=True).to_json().encode() + b"\n"
    pid = proc.pid if proc is not None else procs.owned_pid(rdir)
    pidfd = None
    if proc is None and pid is not None and hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
    try:
        while pid is not None:
            try:
                out.write(alive_line)
                out.flush()
            except (OSError, ValueError):
                return 0
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(interval)
                if proc.returncode is not None:
                    break
            elif pidfd is not None:
                if fdwait.ready([pidfd], (), interval)[0]:
                    break
            else:
                time.sleep(interval)
                if procs.owned_pid(rdir) is None:
                    break
    finally:
        if pidfd is not None:
            os.close(pidfd)
    status = kernel_status(rdir)
    if status.exit_code is None and proc is None:
        # a warm interpreter's kernel that was killed: its parent writes the status it reaped
        deadline = time.monotonic() + 2 * interval
        while status.exit_code is None and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL * 5)
            status = kernel_status(rdir)
    if status.exit_code is None and proc is not None and proc.returncode is not None:
        code = proc.returncode  # killed before it could write exit_code: -N is signal N
        status = KernelStatus(alive=False, exit_code=128 - code if code < 0 else code)
    with contextlib.suppress(OSError, ValueError):
        out.write(status.to_json().encode() + b"\n")
        out.flush()
    return 0


def fence(rdir: Path, grace: float) -> dict:
    """``ctl KERNEL_ID fence``: end the kernel in ``rdir``, letting it save first. Sends it
    ``SAVE_SIGNAL`` (it saves its namespace as soon as no cell runs, then exits with
    ``SUSPENDED_EXIT_CODE``), waits up to ``grace`` seconds for it to exit, then kills what is
    left (SIGTERM, SIGKILL). Answers ``{"alive", "exit_code", "checkpoint"}``, where
    ``checkpoint`` is ``{"path", "bytes"}`` when the kernel saved itself, else null. The runtime
    dir is kept (``cleanup`` removes it). The fencing account's command
    (``gpu_kernel.fence``) runs this."""
    pid = procs.owned_pid(rdir)
    if pid is not None:
        with contextlib.suppress(OSError):  # gone meanwhile: nothing to ask
            os.kill(pid, SAVE_SIGNAL)
        deadline = time.monotonic() + max(0.0, grace)
        while time.monotonic() < deadline and procs.owned_pid(rdir) is not None:
            time.sleep(POLL_INTERVAL * 5)
        if procs.owned_pid(rdir) is not None:
            procs.kill_group(pid)  # returns once the kernel is gone
    status = kernel_status(rdir)
    return {"alive": status.alive, "exit_code": status.exit_code, "checkpoint": status.checkpoint}


def ctl_main(
    kernel_id: str, action: str, signum: int | None, root: str | None, host_name: str
) -> KernelStatus:
    """Run one ctl action; every action answers the kernel's status afterwards."""
    rdir = runtime_dir(root, host_name, kernel_id)
    pid = procs.owned_pid(rdir)
    if action == "signal":
        if signum is None or not 0 < signum < signal.NSIG:
            raise BadRequest(f"invalid signal number {signum!r}", "e.g. 2 for SIGINT")
        if pid is not None:
            os.kill(pid, signum)
    elif action in ("kill", "cleanup"):
        if pid is not None:
            procs.kill_group(pid)
        if action == "cleanup":
            status = kernel_status(rdir)
            shutil.rmtree(rdir, ignore_errors=True)
            return status
    elif action != "status":
        raise BadRequest(
            f"unknown ctl action {action!r}", "status, signal N, kill, fence or cleanup"
        )
    return kernel_status(rdir)
