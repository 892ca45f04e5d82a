"""``LeaseKeeper``: the only holder of a kernel's lease and the only sender of its heartbeats.

``KernelSession`` (``provisioner.session``) owns one keeper. ``acquire`` asks the broker for a slot
and waits in its queue (saying where it stands, cancellable at once); from the grant on, the
keeper's own thread heartbeats every ``heartbeat_interval`` with the proxy's activity, whatever
else the session is doing (saving, copying, restoring: nothing it does blocks this thread), and
hands what the broker says to the session's ``LeaseListener``: the fresh lease (policy, quota,
queue), each order (suspend), and at once when the broker has ended the lease, after which the
keeper holds no lease: a stale "granted" copy is never used again.

Each thread that talks to the broker has its own ``BrokerClient`` (they are not thread-safe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from broker.client import BrokerClient, Lease
from broker.errors import BrokerError, BrokerRequestError, BrokerUnreachable
from gpu_kernel.cancel import Cancelled, CancelToken
from gpu_kernel.errors import SharedGPUError
from provisioner.proxy_state import Activity

log = logging.getLogger(__name__)

POLL_WAIT = 30.0  # s a queued request's long poll may wait at the broker
BROKER_RETRY = 1.0  # s between tries while the broker cannot be reached
BROKER_RESTART = 6.0  # s a new request waits for a broker that refuses connections
HUB_WAIT = 60.0  # s a new request is asked again while the broker cannot reach JupyterHub


class LeaseTimeout(SharedGPUError):
    """No slot was granted within the kernelspec's ``lease_timeout``."""


class LeaseLost(SharedGPUError):
    """The broker ended our lease or our request (expired, dropped from the queue)."""


class LeaseListener(Protocol):
    """What the keeper tells its session; each call must return at once (no network)."""

    def lease_info(self, lease: Lease) -> None: ...

    def lease_order(self, order: dict[str, Any]) -> None: ...

    def lease_ended(self, lease: Lease) -> None: ...

    def heartbeat_trouble(self, message: str | None) -> None: ...


class LeaseKeeper:
    """Requests, keeps (heartbeats) and releases the lease of one kernel id."""

    def __init__(
        self,
        make_client: Callable[[], BrokerClient],
        kernel_id: str,
        kind: str,
        activity: Callable[[], Activity],
        listener: LeaseListener,
    ) -> None:
        self._make_client = make_client
        self.kernel_id = kernel_id
        self.kind = kind
        self._activity = activity
        self._listener = listener
        self._lease: Lease | None = None  # granted, as the broker last said
        self._queued: Lease | None = None  # our request while it waits in the queue
        self._lock = threading.Lock()  # guards the two above; never held over the network
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat_client = make_client()

    # ---- what the session reads ----------------------------------------------------------------

    @property
    def _slot_words(self) -> str:
        return "GPU slot" if self.kind == "any" else f"{self.kind!r} GPU slot"

    @property
    def lease(self) -> Lease | None:
        """The granted lease (None when we hold none)."""
        return self._lease

    @property
    def queued(self) -> Lease | None:
        """Our request while it waits in the broker's queue (position, queue length)."""
        return self._queued

    # ---- acquire -------------------------------------------------------------------------------

    def acquire(
        self,
        cancel: CancelToken,
        timeout: float,
        say: Callable[[str], None],
        resume_from: str | None = None,
    ) -> Lease:
        """Ask for a slot and wait in the queue until granted; raise ``LeaseTimeout`` after
        ``timeout`` s, ``LeaseLost`` when the broker drops the request, ``Cancelled`` at once when
        ``cancel`` is cancelled. A request given up on is withdrawn."""
        client = self._make_client()
        request: Lease | None = None
        deadline = time.monotonic() + timeout
        # a broker that does not answer the request at all is waited for briefly (a restart
        # takes seconds); once our request is in its queue, it is on its disk: wait it out
        ask_until = min(deadline, time.monotonic() + BROKER_RESTART)
        hub_until: float | None = None  # from the first "cannot reach JupyterHub"
        try:
            with cancel.hook(client.abort):
                while request is None:
                    try:
                        request = client.request_lease(
                            self.kind, self.kernel_id, resume_from=resume_from
                        )
                    except BrokerUnreachable as err:
                        # refused: the request never reached it (a restart): ask again
                        if "connection refused" not in err.message:
                            raise
                        self._wait_for_broker(err, cancel, ask_until, say)
                    except BrokerRequestError as err:
                        # the broker could not ask JupyterHub who we are (a hub busy spawning
                        # a class's servers times out): nothing was queued, ask again briefly
                        if err.code != "hub_unreachable":
                            raise
                        if hub_until is None:
                            hub_until = min(deadline, time.monotonic() + HUB_WAIT)
                        self._wait_for_broker(err, cancel, hub_until, say)
                request = self._wait_in_queue(client, request, cancel, deadline, say)
        except BaseException:
            with self._lock:
                self._queued = None
            if request is not None and request.state == "queued":
                self._withdraw(request.id)
            raise
        finally:
            client.close()
        with self._lock:
            self._queued = None
            self._lease = request
        assert request.slot is not None and request.host is not None
        self._start_heartbeats()
        return request

    def _wait_for_broker(
        self,
        err: BrokerUnreachable | BrokerRequestError,
        cancel: CancelToken,
        deadline: float,
        say: Callable[[str], None],
    ) -> None:
        """The broker is down (restarting?): say so, wait a little, or give up at ``deadline``."""
        if time.monotonic() + BROKER_RETRY > deadline:
            raise err
        say(f"Waiting for the broker: {err.message}; retrying")
        if cancel.wait(BROKER_RETRY):
            cancel.check()

    def _wait_in_queue(
        self,
        client: BrokerClient,
        lease: Lease,
        cancel: CancelToken,
        deadline: float,
        say: Callable[[str], None],
    ) -> Lease:
        last = None
        while lease.state == "queued":
            with self._lock:
                self._queued = lease
            line = waiting_line(lease, self._slot_words, time.time())
            if line != last:
                say(line)
                last = line
            remaining = deadline - time.monotonic()
            cancel.check()
            if remaining <= 0:
                raise LeaseTimeout(
                    f"no {self._slot_words} was free in time (position {lease.position} of "
                    f"{lease.queue_length} when we gave up)",
                    "try again later, choose a kernel with another slot kind, or raise "
                    "lease_timeout with `jupyter shared-gpu install --lease-timeout ...`",
                )
            try:
                lease = client.get_lease(lease.id, wait=min(remaining, POLL_WAIT))
            except BrokerUnreachable as err:  # the queue is on the broker's disk: wait for it
                self._wait_for_broker(err, cancel, deadline, say)
                last = None
        if lease.state != "granted":
            raise LeaseLost(
                f"the broker ended our request for a GPU slot ({lease.state}"
                + (f": {lease.end_reason}" if lease.end_reason else "")
                + ")",
                "run the cell again; if it keeps happening ask the admin about the broker's "
                "queue_timeout",
            )
        return lease

    def verify(self) -> Lease | None:
        """Ask the broker whether the lease we hold is still granted to us (before launching on
        it again: a restart); drop it when it is not. Raises ``BrokerError`` when the broker
        cannot say: launching on a slot that may be someone else's is not an option."""
        lease = self._lease
        if lease is None:
            return None
        client = self._make_client()
        try:
            current = client.get_lease(lease.id)
        finally:
            client.close()
        with self._lock:
            if self._lease is None or self._lease.id != lease.id:
                return self._lease
            self._lease = current if current.state == "granted" else None
            if self._lease is None:
                log.warning("lease %s had ended (%s); asking for another", lease.id, current.state)
            return self._lease

    def adopt(self, lease: Lease) -> None:
        """Keep a lease another process of ours took (a Jupyter server restarted)."""
        with self._lock:
            self._lease = lease
        self._start_heartbeats()

    # ---- release -------------------------------------------------------------------------------

    def release(
        self, reason: str = "released", checkpoint: dict[str, Any] | None = None
    ) -> Lease | None:
        """End the lease we hold (no-op without one); heartbeats for it stop first. Failures are
        logged: an unreleased lease expires, and the broker fences its slot."""
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is None:
            return None
        client = self._make_client()
        try:
            return client.release(lease.id, reason=reason, checkpoint=checkpoint)
        except BrokerError as err:
            log.warning("could not release lease %s (%s): %s", lease.id, reason, err)
            return None
        finally:
            client.close()

    def _withdraw(self, lease_id: str) -> None:
        client = self._make_client()
        try:
            client.release(lease_id)
        except BrokerError as err:
            log.warning("could not withdraw the request %s: %s", lease_id, err)
        finally:
            client.close()

    # ---- heartbeats ----------------------------------------------------------------------------

    def beat_now(self) -> None:
        """Send a heartbeat without waiting for the interval (after a grant or an adoption)."""
        self._wake.set()

    def _start_heartbeats(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name=f"lease-{self.kernel_id[:8]}", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        """Heartbeat while a lease is held; never dies on an error (it says so, and goes on)."""
        while not self._closed.is_set():
            lease = self._lease
            interval = lease.heartbeat_interval if lease is not None else 5.0
            self._wake.wait(interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self._beat()
            except Exception as exc:  # a bug must not stop the heartbeats: say it, go on
                log.exception("heartbeat of kernel %s failed", self.kernel_id)
                self._listener.heartbeat_trouble(f"heartbeats failed: {exc}")

    def _beat(self) -> None:
        lease = self._lease
        if lease is None:
            return
        activity = self._activity()
        try:
            reply = self._heartbeat_client.heartbeat(
                lease.id, busy=activity.busy, last_activity=activity.last_activity
            )
        except BrokerError as err:
            log.warning("heartbeat for lease %s failed: %s", lease.id, err)
            self._listener.heartbeat_trouble(f"cannot reach the broker: {err.message}")
            return
        with self._lock:
            if self._lease is None or self._lease.id != lease.id:
                return  # released meanwhile: whatever the broker says of it is old news
            ended = reply.lease.state != "granted"
            self._lease = None if ended else reply.lease
        self._listener.heartbeat_trouble(None)
        if ended:
            log.warning("the broker ended lease %s (%s)", lease.id, reply.lease.state)
            self._listener.lease_ended(reply.lease)
            return
        self._listener.lease_info(reply.lease)
        for order in reply.orders:
            self._listener.lease_order(order)

    def close(self) -> None:
        """Stop the heartbeats (the caller releases the lease first, if it should)."""
        self._closed.set()
        self._wake.set()
        self._heartbeat_client.abort()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self._heartbeat_client.close()


__all__ = ["Cancelled", "LeaseKeeper", "LeaseListener", "LeaseLost", "LeaseTimeout"]


def waiting_line(lease: Lease, slot_words: str, now: float) -> str:
    """The waiting cell's line: the queue position and the broker's reason, with the time
    until a slot is expected when the broker knows it (``broker.core.waiting``)."""
    line = f"Waiting for a free {slot_words}: position {lease.position} of {lease.queue_length}"
    line += " in the queue"
    waiting = lease.waiting if isinstance(lease.waiting, dict) else {}
    message = waiting.get("message")
    if isinstance(message, str) and message:
        line += f" ({message}"
        until = waiting.get("until")
        if waiting.get("code") == "busy" and isinstance(until, int | float) and until > now:
            line += f"; a slot is expected in about {_about(until - now)}"
        line += ")"
    return line


def _about(seconds: float) -> str:
    """Rounded for a reader: 42 -> "45 s", 200 -> "4 min", 5400 -> "1 h 30 min"."""
    if seconds < 60:
        return f"{max(5, 5 * round(seconds / 5))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h" + (f" {minutes} min" if minutes else "")
