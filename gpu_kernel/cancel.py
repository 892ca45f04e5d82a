"""Cancelling blocking work from another thread: ``CancelToken``.

The provisioner's session runs one operation at a time (wait in the broker's queue, connect over
SSH, copy a checkpoint, restore it) in a worker thread; a shutdown or an interrupt arriving from
Jupyter's thread cancels it with ``token.cancel(reason)``. A blocking wait cannot see a flag, so
whoever starts one registers how to break it (``on_cancel``: close the socket, end the SSH
channel); the wait then fails at once and the operation calls ``check()``, which raises
``Cancelled``. ``gpu_kernel.ssh.connect`` takes a token for the TCP and SSH handshake.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gpu_kernel.errors import SharedGPUError


class Cancelled(SharedGPUError):
    """The operation was cancelled (shutdown, interrupt, restart); ``message`` says by what."""


class CancelToken:
    """A one-way flag with callbacks that break blocking waits; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._reason = ""
        self._hooks: dict[int, Callable[[], None]] = {}
        self._next = 0

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str:
        return self._reason

    def cancel(self, reason: str) -> None:
        """Set the flag and run every registered hook once (errors in hooks are ignored)."""
        with self._lock:
            if self._event.is_set():
                return
            self._reason = reason
            self._event.set()
            hooks, self._hooks = list(self._hooks.values()), {}
        for hook in hooks:
            with contextlib.suppress(Exception):  # a hook breaks a wait; its failure is moot
                hook()

    def check(self) -> None:
        """Raise ``Cancelled`` when the token was cancelled."""
        if self._event.is_set():
            raise Cancelled(self._reason or "cancelled")

    def wait(self, timeout: float | None) -> bool:
        """Sleep up to ``timeout`` s; True when cancelled meanwhile."""
        return self._event.wait(timeout)

    @contextmanager
    def hook(self, fn: Callable[[], None]) -> Iterator[None]:
        """Run ``fn`` if the token is cancelled while the ``with`` block runs (at once if it
        already is); an error out of the block once cancelled (the wait ``fn`` broke) becomes
        ``Cancelled``, and so does a block that ends normally after the cancel."""
        with self._lock:
            key = self._next
            self._next += 1
            already = self._event.is_set()
            if not already:
                self._hooks[key] = fn
        if already:
            fn()
        try:
            yield
        except Cancelled:
            raise
        except BaseException as exc:
            if self._event.is_set():
                raise Cancelled(self._reason or "cancelled") from exc
            raise
        finally:
            with self._lock:
                self._hooks.pop(key, None)
        self.check()


NEVER = CancelToken()  # for callers that never cancel
