"""The broker's only way onto a GPU host: the fencing account's forced command.

The broker holds one key per host (``fence_key_file``) for one account (``fence_user``) whose
``authorized_keys`` line forces ``python -m gpu_kernel fence`` (``gpu_kernel.fence`` says what
it accepts and as whom it acts). So the broker never logs in as a kernel's user, and a stolen
broker key can only end and clean up kernels and read the GPU list. For ``address = "local"``
the same command runs as a subprocess (``--as-self``: as the broker's own user).

Blocking SSH work, always run in a worker thread (``HostWork``), never on the IOLoop.
``broker.service.effects`` calls ``fence_kernel`` for a slot whose lease ended without its
holder (and ``delete_checkpoint`` for old checkpoints); ``broker.hosts.discovery`` calls
``run_fence_command(host, ["probe"])``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os.path
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from broker.config.hosts import HostConfig
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.ssh import HostConnection, HostTarget, connect

log = logging.getLogger("broker.fencing")

Connect = Callable[[HostTarget], HostConnection]
Done = Callable[[bool, str], None]
COMMAND_TIMEOUT = 60.0  # a fence waits up to its grace on top of this
FORCED_COMMAND_HINT = (
    "on {host}, give the fencing account ({user}) the broker's key with "
    '`restrict,command="PYTHON -m gpu_kernel fence" KEY` in its ~/.ssh/authorized_keys, '
    'where PYTHON has jupyter-shared-gpu installed (docs/configuration.md, "Fencing")'
)


class FenceError(SharedGPUError):
    """The fencing command could not be run, or refused (the message says which and why)."""


@dataclass(frozen=True)
class FenceResult:
    """What fencing found: ``gone`` when the kernel surely no longer runs (it ended now or had
    ended, or never ran there); ``checkpoint`` ``(path, bytes)`` when it saved itself first."""

    gone: bool
    message: str
    checkpoint: tuple[str, int] | None = None


def fence_target(host: HostConfig, connect_timeout: float = 10.0) -> HostTarget:
    """The SSH target of ``host``'s fencing account (no pty: its key may not have one)."""
    return HostTarget(
        name=host.name,
        address=host.address,
        port=host.port,
        user=host.fence_user or "",
        key_file=os.path.expanduser(host.fence_key_file) if host.fence_key_file else None,
        known_hosts_file=host.fence_known_hosts_path(),
        python=host.python,
        connect_timeout=connect_timeout,
        nodelay_pty=False,
    )


def run_fence_command(
    host: HostConfig, words: list[str], timeout: float = COMMAND_TIMEOUT, connect: Connect = connect
) -> dict:
    """Run one request of the fencing command on ``host`` and return its JSON reply (``ok``
    true); FenceError when it cannot be reached, refuses, or is not set up."""
    if not host.is_local and not (host.fence_user and host.fence_key_file):
        raise FenceError(
            f"host {host.name} has no fencing account: the broker cannot reach it",
            'set fence_user and fence_key_file for it (docs/configuration.md, "Fencing")',
        )
    target = fence_target(host)
    # Over SSH only the words travel (the forced command runs; they are its
    # SSH_ORIGINAL_COMMAND); a local host runs the command itself, as the broker's user.
    argv = words
    if host.is_local:
        argv = [host.python, "-m", "gpu_kernel", "fence", "--as-self", *words]
    try:
        with connect(target) as conn:
            result = conn.run(argv, timeout=timeout)
    except SharedGPUError as exc:
        raise FenceError(f"cannot reach {host.name} to fence: {exc.message}", exc.hint) from exc
    lines = result.stdout.decode(errors="replace").strip().splitlines()
    try:
        reply = json.loads(lines[-1])
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ValueError("not a reply")
    except (ValueError, IndexError):
        stderr = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise FenceError(
            f"the fencing command on {host.name} gave no reply (exit status "
            f"{result.returncode}): {' '.join(stderr) or 'no output'}",
            FORCED_COMMAND_HINT.format(host=host.name, user=host.fence_user or "the broker"),
        ) from None
    if not reply["ok"]:
        raise FenceError(
            f"the fencing command on {host.name} refused `{' '.join(words)}`: "
            f"{reply.get('error', '')}",
            str(reply.get("hint") or ""),
        )
    return reply


def fence_kernel(
    host: HostConfig, owner: str, kernel_id: str, grace: float, keep_runtime: bool
) -> FenceResult:
    """Make sure ``owner``'s kernel ``kernel_id`` no longer runs on ``host``, giving it up to
    ``grace`` seconds to save itself first. Its runtime dir is removed unless it saved itself
    or ``keep_runtime`` (an earlier checkpoint in it is still wanted)."""
    words = ["fence", host.name, kernel_id, owner, f"{grace:g}"]
    try:
        reply = run_fence_command(host, words, timeout=COMMAND_TIMEOUT + grace)
        if reply.get("alive"):
            return FenceResult(False, f"kernel {kernel_id} on {host.name} survived SIGKILL")
        saved = reply.get("checkpoint")
        if isinstance(saved, dict):
            checkpoint = (str(saved["path"]), int(saved["bytes"]))
            return FenceResult(
                True, f"kernel {kernel_id} on {host.name} saved its state, then ended", checkpoint
            )
        if not keep_runtime and reply.get("found"):
            run_fence_command(host, ["cleanup", host.name, kernel_id, owner])
    except FenceError as exc:
        return FenceResult(False, f"cannot fence kernel {kernel_id} on {host.name}: {exc}")
    except Exception as exc:  # paramiko and OS errors not wrapped by gpu_kernel.ssh
        return FenceResult(False, f"cannot fence kernel {kernel_id} on {host.name}: {exc}")
    return FenceResult(True, f"kernel {kernel_id} is gone from {host.name}")


def delete_checkpoint(host: HostConfig, owner: str, kernel_id: str) -> tuple[bool, str]:
    """Remove ``owner``'s kernel ``kernel_id``'s runtime dir (with its checkpoint) on ``host``."""
    try:
        run_fence_command(host, ["cleanup", host.name, kernel_id, owner])
    except FenceError as exc:
        return False, f"cannot delete the checkpoint of {kernel_id} on {host.name}: {exc}"
    except Exception as exc:
        return False, f"cannot delete the checkpoint of {kernel_id} on {host.name}: {exc}"
    return True, f"checkpoint of {kernel_id} deleted on {host.name}"


class HostWork:
    """A few worker threads for blocking host jobs; results come back on the caller's loop."""

    def __init__(self, threads: int = 4) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="broker-hostwork")

    def submit(self, job: Callable[[], object], done: Callable[[object], None]) -> None:
        """Run ``job`` in a thread; call ``done(result)`` on the current event loop (or at once,
        in this thread, when no loop runs: CLI and unit tests). A job that raises reports the
        exception as its result."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            done(_safe(job))
            return
        future: Future = self._pool.submit(_safe, job)

        def finished(fut: Future) -> None:
            if fut.cancelled():  # close() dropped it before it ran: a restart fences again
                log.info("host job dropped: the broker stopped before it ran")
                return
            result = fut.result()
            try:
                loop.call_soon_threadsafe(done, result)
            except RuntimeError:  # the broker stopped meanwhile: a restart fences again
                log.info("host job finished after the broker stopped: %s", result)

        future.add_done_callback(finished)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _safe(job: Callable[[], object]) -> object:
    try:
        return job()
    except Exception as exc:  # a job must always report back
        log.exception("host job failed")
        return exc
