"""What the session proxy answers itself while no kernel process exists (pure).

``provisioner.stand_in.StandIn`` calls ``local_reply`` for each request that arrives while the
kernel has no process (not started yet, or suspended). Only an ``execute_request`` wakes the
session (a notebook opened or a tab pressed takes no GPU); ``kernel_info`` comes from the last real
reply; completion, inspection and friends get empty but valid answers so the UI never hangs;
anything else waits for the kernel.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from gpu_kernel import __version__

RESUMES = "execute_request"


def default_kernel_info() -> dict[str, Any]:
    """A kernel_info_reply content for a kernel we have not heard from yet."""
    return {
        "status": "ok",
        "protocol_version": "5.3",
        "implementation": "gpu_kernel",
        "implementation_version": __version__,
        "language_info": {
            "name": "python",
            "version": platform.python_version(),
            "mimetype": "text/x-python",
            "file_extension": ".py",
            "pygments_lexer": "ipython3",
            "codemirror_mode": {"name": "ipython", "version": sys.version_info[0]},
            "nbconvert_exporter": "python",
        },
        "banner": "Shared GPU kernel (no GPU held until a cell runs)",
        "help_links": [],
    }


def local_reply(msg_type: str, content: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(reply type, reply content) for a request the proxy answers alone, or None to hold it."""
    cursor = content.get("cursor_pos", 0) if isinstance(content, dict) else 0
    if msg_type == "complete_request":
        return "complete_reply", {
            "status": "ok",
            "matches": [],
            "cursor_start": cursor,
            "cursor_end": cursor,
            "metadata": {},
        }
    if msg_type == "inspect_request":
        return "inspect_reply", {"status": "ok", "found": False, "data": {}, "metadata": {}}
    if msg_type == "is_complete_request":
        return "is_complete_reply", {"status": "unknown"}
    if msg_type == "history_request":
        return "history_reply", {"status": "ok", "history": []}
    if msg_type == "comm_info_request":
        return "comm_info_reply", {"status": "ok", "comms": {}}
    if msg_type == "interrupt_request":
        return "interrupt_reply", {"status": "ok"}  # nothing runs: nothing to interrupt
    if msg_type == "shutdown_request":
        restart = bool(content.get("restart")) if isinstance(content, dict) else False
        return "shutdown_reply", {"status": "ok", "restart": restart}
    if msg_type == "usage_request":
        return "usage_reply", {"status": "ok", "shared_gpu": {"state": "suspended"}}
    return None


def error_reply(text: str, ename: str = "ResumeFailed") -> dict[str, Any]:
    """execute_reply content for a cell the proxy ends itself: the kernel could not be started
    (``StartFailed``) or resumed (``ResumeFailed``), the wait was interrupted
    (``KeyboardInterrupt``), or the connection dropped while it ran (``ConnectionLost``)."""
    return {
        "status": "error",
        "ename": ename,
        "evalue": text,
        "traceback": [f"{ename}: Shared GPU: {text}"],
        "execution_count": None,
    }
