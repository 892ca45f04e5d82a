"""Reaching a GPU host from the broker: fence a kernel whose lease ended badly, delete old
checkpoints. Blocking SSH work, always run in a worker thread (``HostWork``), never on the IOLoop.

``BrokerService`` (``broker.service.service``) calls ``HostWork.submit(job, done)`` on a
``FenceNeeded`` decision with ``fence_kernel`` (kill the lease's kernel; remove its runtime dir
unless a checkpoint in it is still wanted) and, for checkpoints older than
``policy.checkpoint_max_age``, with ``delete_checkpoint`` (``python -m gpu_kernel ctl KERNEL_ID
cleanup``). ``done(ok, message)`` is called back on the broker's IOLoop, where the service reports
``Fenced(slot, ok)`` to the scheduler or marks the checkpoint expired.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from broker.config.hosts import HostConfig
from gpu_kernel import remote
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.protocol import SUSPENDED_EXIT_CODE
from gpu_kernel.ssh import HostConnection, HostTarget, connect

log = logging.getLogger("broker.fencing")

Connect = Callable[[HostTarget], HostConnection]
Done = Callable[[bool, str], None]


def host_target(host: HostConfig, user: str, connect_timeout: float = 10.0) -> HostTarget:
    """The SSH target for ``host`` as the Jupyter user ``user`` (templates filled, "~" expanded).
    ``address = "local"`` gives a target that ``connect`` runs as subprocesses."""
    return HostTarget(
        name=host.name,
        address=host.address,
        port=host.port,
        user=host.ssh_user(user),
        key_file=host.key_path(user),
        known_hosts_file=host.known_hosts_path(user),
        python=host.python,
        connect_timeout=connect_timeout,
    )


def fence_kernel(
    host: HostConfig, user: str, kernel_id: str, keep_runtime: bool, connect: Connect = connect
) -> tuple[bool, str]:
    """Make sure kernel ``kernel_id`` no longer runs on ``host``. True when it is gone (killed
    now, or already dead); False with the reason when the host could not be asked."""
    target = host_target(host, user)
    try:
        with connect(target) as conn:
            status = remote.kill(conn, target, kernel_id)
            if status.alive:
                return False, f"kernel {kernel_id} on {host.name} survived SIGKILL"
            if status.exit_code == SUSPENDED_EXIT_CODE:  # it saved its state (orphan watchdog)
                return True, f"kernel {kernel_id} saved its state on {host.name}; kept there"
            if not keep_runtime:
                remote.cleanup(conn, target, kernel_id)
    except SharedGPUError as exc:
        return False, f"cannot fence kernel {kernel_id} on {host.name}: {exc.message}"
    except Exception as exc:  # paramiko and OS errors not wrapped by gpu_kernel.ssh
        return False, f"cannot fence kernel {kernel_id} on {host.name}: {exc}"
    return True, f"kernel {kernel_id} is gone from {host.name}"


def delete_checkpoint(
    host: HostConfig, user: str, kernel_id: str, connect: Connect = connect
) -> tuple[bool, str]:
    """Remove kernel ``kernel_id``'s runtime dir (with its checkpoint) on ``host``."""
    target = host_target(host, user)
    try:
        with connect(target) as conn:
            remote.cleanup(conn, target, kernel_id)
    except SharedGPUError as exc:
        return False, f"cannot delete the checkpoint of {kernel_id} on {host.name}: {exc.message}"
    except Exception as exc:
        return False, f"cannot delete the checkpoint of {kernel_id} on {host.name}: {exc}"
    return True, f"checkpoint of {kernel_id} deleted on {host.name}"


class HostWork:
    """A few worker threads for blocking host jobs; results come back on the caller's loop."""

    def __init__(self, threads: int = 4) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="broker-hostwork")

    def submit(self, job: Callable[[], tuple[bool, str]], done: Done) -> None:
        """Run ``job`` in a thread; call ``done(ok, message)`` on the current event loop (or at
        once, in this thread, when no loop runs: CLI and unit tests)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            done(*_safe(job))
            return
        future: Future = self._pool.submit(_safe, job)

        def finished(fut: Future) -> None:
            ok, message = fut.result()
            try:
                loop.call_soon_threadsafe(done, ok, message)
            except RuntimeError:  # the broker stopped meanwhile: a restart fences again
                log.info("host job finished after the broker stopped: %s", message)

        future.add_done_callback(finished)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _safe(job: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    try:
        return job()
    except Exception as exc:  # a job must always report back
        log.exception("host job failed")
        return False, str(exc)
