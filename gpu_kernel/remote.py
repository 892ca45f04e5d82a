"""The caller's side of the launch protocol: run ``python -m gpu_kernel ...`` on a host.

The provisioner calls ``launch`` (and ``signal`` for interrupts, ``kill``/``cleanup`` at shutdown);
the broker calls ``status`` and ``cleanup`` to fence a kernel whose lease expired. ``target`` is
the ``HostTarget``: its ``python`` runs the command, its ``name`` (the broker's name of the host)
picks the runtime dir ``<root>/<name>/<kernel_id>``. The HMAC key goes on the command's stdin,
never on its command line.
"""

from __future__ import annotations

import dataclasses
import json
import signal as _signal
from typing import TYPE_CHECKING

from gpu_kernel.errors import BadRequest, KernelControlError, LaunchError, ProtocolMismatch
from gpu_kernel.protocol import (
    LAUNCH_AHEAD_FRESH,
    KernelStatus,
    LaunchReply,
    LaunchRequest,
    check_host_name,
    check_kernel_id,
)

if TYPE_CHECKING:
    from gpu_kernel.ssh import CommandResult, CommandStream, HostConnection, HostTarget

LAUNCH_TIMEOUT = 60.0  # the launcher itself gives up on a kernel after 30 s
CTL_TIMEOUT = 30.0
INSTALL_HINT = (
    "install jupyter-shared-gpu on the host (`{python} -m pip install jupyter-shared-gpu`, "
    "the same version as on the Jupyter server) and set the host's `python` in the broker "
    "config to that interpreter"
)


def _python(target: HostTarget) -> str:
    return target.python


def _where(conn: HostConnection) -> str:
    return getattr(getattr(conn, "target", None), "name", "the host")


def _missing_install(res: CommandResult, python: str, conn: HostConnection) -> LaunchError | None:
    err = res.stderr.decode(errors="replace")
    if res.returncode == 127 or ("No module named" in err and "gpu_kernel" in err):
        return LaunchError(
            f"{python} -m gpu_kernel cannot run on {_where(conn)}: {_last_lines(err)}",
            INSTALL_HINT.format(python=python),
        )
    return None


def _last_lines(text: str, n: int = 5) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:]) or "(no output)"


def _reply_line(res: CommandResult) -> str:
    lines = res.stdout.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def launch(conn: HostConnection, target: HostTarget, request: LaunchRequest) -> LaunchReply:
    """Start a kernel on the host; returns the ``ok`` reply or raises LaunchError."""
    python = _python(target)
    res = conn.run(
        [python, "-m", "gpu_kernel", "launch"],
        stdin=request.to_json().encode() + b"\n",
        timeout=LAUNCH_TIMEOUT,
    )
    reply = _check_reply(conn, python, request, res)
    _check_protocol(conn, python, request, reply)
    return reply


def _check_reply(
    conn: HostConnection, python: str, request: LaunchRequest, res: CommandResult
) -> LaunchReply:
    """The launcher's ``ok`` reply in ``res``, or the LaunchError that says what went wrong."""
    missing = _missing_install(res, python, conn)
    if missing:
        raise missing
    try:
        reply = LaunchReply.from_json(_reply_line(res))
    except BadRequest as e:
        stderr = _last_lines(res.stderr.decode(errors="replace"))
        raise LaunchError(
            f"the launcher on {_where(conn)} gave no valid reply (exit status {res.returncode}): "
            f"{e.message}; its stderr ends with:\n{stderr}",
            INSTALL_HINT.format(python=python),
        ) from e
    if not reply.ok:
        cls = ProtocolMismatch if reply.code == "protocol" else LaunchError
        raise cls(f"launch on {_where(conn)} failed ({reply.code}): {reply.error}", reply.hint)
    return reply


def _check_protocol(
    conn: HostConnection, python: str, request: LaunchRequest, reply: LaunchReply
) -> None:
    if reply.protocol != request.protocol:
        raise ProtocolMismatch(
            f"{_where(conn)} answered with launch protocol {reply.protocol}, "
            f"this side speaks {request.protocol}",
            INSTALL_HINT.format(python=python),
        )


def _launch_argv(target: HostTarget) -> list[str]:
    return [_python(target), "-m", "gpu_kernel", "launch"]


def prepare_launch(conn: HostConnection, target: HostTarget) -> None:
    """Start a launcher on ``conn`` ahead of the next kernel there, which ``launch_watched``
    hands it: the host's login shell (sshd runs every command through it, and a `conda init` or
    `pyenv init` in ``~/.bashrc`` costs ~0.1 s) and the launcher's imports are paid while no one
    waits. The launcher waits for its request ``LAUNCH_AHEAD_WAIT`` s, then exits; returns at
    once."""
    conn.start_ahead(_launch_argv(target), LAUNCH_AHEAD_FRESH)


def launch_watched(
    conn: HostConnection, target: HostTarget, request: LaunchRequest
) -> tuple[LaunchReply, CommandStream]:
    """Start a kernel and keep the launcher's channel open as its watch: after the reply, the
    stream's stdout carries a ``KernelStatus`` line a second while the kernel runs and a last one
    with its exit code (``launcher.watch``). Raises as ``launch`` does; the caller closes the
    stream (the kernel runs on). The launcher is the one ``prepare_launch`` started on ``conn``,
    when it is still there."""
    python = _python(target)
    request = dataclasses.replace(request, watch=True)
    stream = conn.open_stream(_launch_argv(target), timeout=LAUNCH_TIMEOUT)
    try:
        stream.stdin.write(request.to_json().encode() + b"\n")
        stream.stdin.flush()
        stream.close_stdin()
        line = stream.stdout.readline(1 << 20)
        try:
            reply = LaunchReply.from_json(line)
        except BadRequest:
            reply = None
        if reply is None or not reply.ok:
            from gpu_kernel.ssh import CommandResult  # paramiko only where a caller needs it

            rest = stream.stdout.read()
            res = stream.wait(CTL_TIMEOUT)
            res = CommandResult(res.returncode, line + rest, res.stderr)
            _check_reply(conn, python, request, res)  # raises: no valid or no ok reply
        assert reply is not None
        _check_protocol(conn, python, request, reply)
    except BaseException:
        stream.close()
        raise
    return reply, stream


def watch(conn: HostConnection, target: HostTarget, kernel_id: str) -> CommandStream:
    """``ctl watch``: the watch stream of a kernel already running (after a reconnect)."""
    argv = [_python(target), "-m", "gpu_kernel", "ctl", check_kernel_id(kernel_id), "watch"]
    argv += ["--host", check_host_name(target.name)]
    return conn.open_stream(argv, timeout=CTL_TIMEOUT)


def _ctl(
    conn: HostConnection,
    target: HostTarget,
    kernel_id: str,
    action: list[str],
    runtime_root: str | None,
) -> KernelStatus:
    python = _python(target)
    argv = [python, "-m", "gpu_kernel", "ctl", check_kernel_id(kernel_id), *action]
    argv += ["--host", check_host_name(target.name)]
    if runtime_root:
        argv += ["--runtime-root", runtime_root]
    res = conn.run(argv, timeout=CTL_TIMEOUT)
    missing = _missing_install(res, python, conn)
    if missing:
        raise missing
    line = _reply_line(res)
    try:
        return KernelStatus.from_json(line)
    except BadRequest:
        pass
    try:
        data = json.loads(line)
        message, hint = str(data["error"]), str(data.get("hint", ""))
    except (ValueError, KeyError, TypeError):
        message = _last_lines(res.stderr.decode(errors="replace") or line)
        hint = INSTALL_HINT.format(python=python)
    raise KernelControlError(
        f"`gpu_kernel ctl {kernel_id} {' '.join(action)}` on {_where(conn)} failed: {message}",
        hint,
    )


def status(
    conn: HostConnection,
    target: HostTarget,
    kernel_id: str,
    runtime_root: str | None = None,
) -> KernelStatus:
    """Is the kernel alive, and its exit code if it wrote one."""
    return _ctl(conn, target, kernel_id, ["status"], runtime_root)


def signal(
    conn: HostConnection,
    target: HostTarget,
    kernel_id: str,
    signum: int = _signal.SIGINT,
    runtime_root: str | None = None,
) -> KernelStatus:
    """Send ``signum`` to the kernel process (SIGINT interrupts the running cell)."""
    return _ctl(conn, target, kernel_id, ["signal", str(int(signum))], runtime_root)


def kill(
    conn: HostConnection,
    target: HostTarget,
    kernel_id: str,
    runtime_root: str | None = None,
) -> KernelStatus:
    """SIGTERM the kernel's process group, SIGKILL after a 3 s grace; keeps its runtime dir."""
    return _ctl(conn, target, kernel_id, ["kill"], runtime_root)


def cleanup(
    conn: HostConnection,
    target: HostTarget,
    kernel_id: str,
    runtime_root: str | None = None,
) -> KernelStatus:
    """Kill the kernel if alive and remove its runtime dir (returns the status before removal)."""
    return _ctl(conn, target, kernel_id, ["cleanup"], runtime_root)
