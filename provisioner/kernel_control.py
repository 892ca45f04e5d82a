"""Control-channel requests from the provisioner itself to its kernel (not through the proxy).

``KernelSession`` keeps one ``KernelControl`` per running kernel for ``suspend_request``,
``restore_request``, the periodic ``shared_gpu_info`` (which also tells the kernel's orphan
watchdog that we are still here) and ``interrupt_request``. Messages are signed with the kernel's
session key. The statuses the kernel publishes for these requests carry ``session_ids`` as their
parent's session: the proxy keeps them from the frontends (they are not the user's activity).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from jupyter_client.session import Session

from gpu_kernel.cancel import NEVER, CancelToken
from gpu_kernel.errors import SharedGPUError


class KernelControlError(SharedGPUError):
    """The kernel did not answer a control request in time, or answered with an error."""


class ControlBusy(KernelControlError):
    """Another request of ours is still waiting for its reply (``try_request``)."""


class KernelControl:
    """A DEALER on the kernel's control port for requests, one at a time, and a second one for
    requests whose reply nobody waits for (``send``: an interrupt must not queue behind a save)."""

    def __init__(self, port: int, key: bytes, signature_scheme: str = "hmac-sha256") -> None:
        self._session = Session(key=key, signature_scheme=signature_scheme, check_pid=False)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect(f"tcp://127.0.0.1:{port}")
        self._fire = self._ctx.socket(zmq.DEALER)
        self._fire.linger = 0
        self._fire.rcvhwm = 16  # replies nobody reads: a few, then dropped
        self._fire.connect(f"tcp://127.0.0.1:{port}")
        self._fire_lock = threading.Lock()
        self._lock = threading.Lock()

    @property
    def session_id(self) -> str:
        """The session id in the header of every message this client sends."""
        return str(self._session.session)

    def request(
        self,
        msg_type: str,
        content: dict[str, Any],
        timeout: float,
        cancel: CancelToken = NEVER,
        stop: Callable[[], str | None] | None = None,
    ) -> dict[str, Any]:
        """Send ``msg_type`` and return the reply's content. Raises KernelControlError on timeout
        or when ``stop()`` returns a reason (the kernel exited), ``Cancelled`` as soon as
        ``cancel`` is cancelled."""
        with self._lock:
            return self._request(msg_type, content, timeout, cancel, stop)

    def _closed_error(self, msg_type: str, exc: zmq.ZMQError) -> KernelControlError:
        return KernelControlError(f"{msg_type}: the control client closed meanwhile ({exc})")

    def try_request(
        self, msg_type: str, content: dict[str, Any], timeout: float, cancel: CancelToken = NEVER
    ) -> dict[str, Any]:
        """``request``, or ControlBusy at once while another request waits for its reply."""
        if not self._lock.acquire(blocking=False):
            raise ControlBusy(f"{msg_type} skipped: another control request is under way")
        try:
            return self._request(msg_type, content, timeout, cancel, None)
        finally:
            self._lock.release()

    def _request(
        self,
        msg_type: str,
        content: dict[str, Any],
        timeout: float,
        cancel: CancelToken,
        stop: Callable[[], str | None] | None,
    ) -> dict[str, Any]:
        msg = self._session.msg(msg_type, content)
        try:
            self._session.send(self._sock, msg)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                cancel.check()
                why = stop() if stop is not None else None
                if why:
                    raise KernelControlError(f"no reply to {msg_type}: {why}")
                if not self._sock.poll(int(min(left, 0.1) * 1000)):
                    continue
                _, frames = self._session.feed_identities(self._sock.recv_multipart())
                reply = self._session.deserialize(frames)
                if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    return reply["content"]
        except zmq.ZMQError as exc:  # closed by the session meanwhile (the kernel went away)
            raise self._closed_error(msg_type, exc) from exc
        raise KernelControlError(
            f"the kernel did not answer {msg_type} within {timeout:.0f}s",
            "the kernel may be busy or stuck; interrupt it and try again",
        )

    def send(self, msg_type: str, content: dict[str, Any]) -> None:
        """Send without waiting for the reply (``interrupt_request``)."""
        with self._fire_lock:
            try:
                while self._fire.poll(0):
                    self._fire.recv_multipart()  # replies to earlier sends: nobody wants them
                self._session.send(self._fire, msg_type, content)
            except zmq.ZMQError as exc:
                raise self._closed_error(msg_type, exc) from exc

    def close(self) -> None:
        """Close both sockets (a request under way in another thread fails with
        KernelControlError)."""
        with self._fire_lock:
            self._fire.close(linger=0)
        self._sock.close(linger=0)
