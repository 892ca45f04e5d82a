"""Control-channel requests from the provisioner itself to its kernel (not through the proxy).

``KernelSession`` uses one ``KernelControl`` per running kernel for ``suspend_request``,
``restore_request`` and the periodic ``shared_gpu_info`` (which also tells the kernel's orphan
watchdog that we are still here). Messages are signed with the kernel's session key.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq
from jupyter_client.session import Session

from gpu_kernel.errors import SharedGPUError


class KernelControlError(SharedGPUError):
    """The kernel did not answer a control request in time, or answered with an error."""


class KernelControl:
    """A DEALER on the kernel's control port; one request at a time (thread-safe)."""

    def __init__(self, port: int, key: bytes, signature_scheme: str = "hmac-sha256") -> None:
        self._session = Session(key=key, signature_scheme=signature_scheme, check_pid=False)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect(f"tcp://127.0.0.1:{port}")
        self._lock = threading.Lock()

    def request(
        self,
        msg_type: str,
        content: dict[str, Any],
        timeout: float,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Send ``msg_type`` and return the reply's content; raise KernelControlError on timeout
        or as soon as ``cancel`` is set (the session is closing)."""
        with self._lock:
            msg = self._session.msg(msg_type, content)
            self._session.send(self._sock, msg)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if cancel is not None and cancel.is_set():
                    raise KernelControlError(f"{msg_type} abandoned: the kernel is shutting down")
                if not self._sock.poll(int(min(left, 0.25) * 1000)):
                    continue
                _, frames = self._session.feed_identities(self._sock.recv_multipart())
                reply = self._session.deserialize(frames)
                if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    return reply["content"]
            raise KernelControlError(
                f"the kernel did not answer {msg_type} within {timeout:.0f}s",
                "the kernel may be busy or stuck; interrupt it and try again",
            )

    def close(self) -> None:
        self._sock.close(linger=0)
