"""What the session proxy says itself while no kernel process exists, and to the waiting cell.

``SessionProxy`` (``provisioner.proxy``) owns one ``Frontend`` (its five bound sockets and the
signer made from the kernel's key) and one ``StandIn``, and calls them from its own thread only.
``StandIn.handle`` decides, for one request arriving while the proxy stands in for a kernel that
has no process (not started yet, or suspended), whether the proxy answers it alone
(``local_replies``), queues it for the kernel to come, or wakes the session (the first
``execute_request``). While the session brings a kernel, ``progress`` and ``status_line`` show
lines in the cell that woke it; ``fail`` answers the waiting cells when that did not work.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

import zmq
from jupyter_client.session import Session

from . import local_replies
from . import messages as m

log = logging.getLogger("provisioner.proxy")


class Frontend:
    """The proxy's frontend sockets and the signer for messages the proxy writes itself."""

    def __init__(self, sockets: dict[str, zmq.Socket]) -> None:
        self.sockets = sockets
        self.signer: Session | None = None  # configure() gives it the kernel's key

    def configure(self, key: bytes, signature_scheme: str) -> None:
        self.signer = Session(
            key=key, signature_scheme=signature_scheme, username="shared-gpu", check_pid=False
        )

    def reply(
        self, channel: str, idents: list[bytes], msg_type: str, content: dict, parent: dict
    ) -> None:
        assert self.signer is not None
        self.signer.send(self.sockets[channel], msg_type, content, parent, ident=idents)

    def publish(
        self,
        msg_type: str,
        content: dict[str, Any],
        parent: dict | None,
        transient: dict | None = None,
    ) -> None:
        assert self.signer is not None
        if transient is not None:
            content = {**content, "transient": transient}
        self.signer.send(self.sockets["iopub"], msg_type, content, parent, ident=msg_type.encode())

    def verify(
        self, frames: list[bytes], replayed: bool = False
    ) -> tuple[list[bytes], dict[str, Any]]:
        """(identities, message) of a request, its signature checked; raises when it is bad.
        ``replayed``: the proxy's own held copy of a request it may have checked already (a
        cell a saving kernel dropped): checked again, but not refused as a replay."""
        assert self.signer is not None
        idents, rest = self.signer.feed_identities(frames)
        if replayed and rest:
            self.signer.digest_history.discard(rest[0])
        return idents, self.signer.deserialize(rest)


class Decision(Enum):
    ANSWERED = "answered"
    QUEUE = "queue"  # keep it for the kernel to come
    WAKE = "wake"  # keep it, and wake the session: a cell wants a kernel
    DROP = "drop"


class StandIn:
    """Answers for a kernel that has no process, and talks to the cell that woke the session."""

    def __init__(self, front: Frontend) -> None:
        self.front = front
        self.kernel_info: dict[str, Any] | None = None  # content of the last real reply
        self.waking: dict[str, Any] | None = None  # the cell that woke the session
        self._line_id: str | None = None  # display_id of the updatable status line

    def handle(self, channel: str, frames: list[bytes], replayed: bool = False) -> Decision:
        """Answer, keep, or wake on one request that arrived while no kernel process exists
        (``replayed``: one the proxy held, see ``Frontend.verify``)."""
        if channel not in ("shell", "control"):
            return Decision.DROP  # stdin: no kernel asked for input
        try:
            idents, msg = self.front.verify(frames, replayed)
        except Exception as exc:  # bad signature or not a Jupyter message: drop it
            log.warning("session proxy: dropped a %s message it could not verify: %s", channel, exc)
            return Decision.DROP
        msg_type = msg["header"].get("msg_type", "")
        if msg_type == local_replies.RESUMES:
            return Decision.WAKE
        if msg_type == "kernel_info_request":
            local = ("kernel_info_reply", self.kernel_info or local_replies.default_kernel_info())
        else:
            local = local_replies.local_reply(msg_type, msg.get("content") or {})
        if local is None:
            return Decision.QUEUE
        # as a kernel does: busy, the reply, idle (clients check IOPub flows this way)
        self.front.publish("status", {"execution_state": "busy"}, msg)
        self.front.reply(channel, idents, local[0], local[1], msg)
        self.front.publish("status", {"execution_state": "idle"}, msg)
        return Decision.ANSWERED

    def begin_wake(self, frames: list[bytes]) -> None:
        """The cell in ``frames`` woke the session: it shows busy and the progress from now."""
        header = m.loads(m.signed_frame(frames, m.HEADER)) or {}
        self.waking = {"header": header}
        self._line_id = None
        self.front.publish("status", {"execution_state": "busy"}, self.waking)

    def progress(self, text: str) -> None:
        """A line of output in the waking cell (no-op when none waits)."""
        if self.waking is not None:
            content = {"name": "stdout", "text": text.rstrip("\n") + "\n"}
            self.front.publish("stream", content, self.waking)

    def status_line(self, text: str) -> None:
        """One line in the waking cell that each call replaces (queue position, copy progress)."""
        if self.waking is None:
            return
        data = {"data": {"text/plain": text}, "metadata": {}}
        if self._line_id is None:
            self._line_id = uuid.uuid4().hex
            self.front.publish("display_data", data, self.waking, {"display_id": self._line_id})
        else:
            self.front.publish(
                "update_display_data", data, self.waking, {"display_id": self._line_id}
            )

    def clear(self) -> None:
        """Remove what the waking cell shows of the wait (a first start leaves nothing behind:
        the cell's output is the cell's own)."""
        if self.waking is not None and self._line_id is not None:
            self.front.publish("clear_output", {"wait": False}, self.waking)
            self._line_id = None

    def end_wake(self) -> None:
        self.waking = None
        self._line_id = None

    def fail(
        self, held: Iterable[tuple[str, list[bytes]]], text: str, ename: str
    ) -> list[tuple[str, list[bytes]]]:
        """Answer every waiting cell in ``held`` with an error saying ``text``; return the other
        requests (they wait for the next kernel)."""
        keep = []
        for channel, frames in held:
            d = m.delim_index(frames)
            header = m.loads(m.signed_frame(frames, m.HEADER, d))  # verified when it arrived
            if header is None or header.get("msg_type") != local_replies.RESUMES:
                keep.append((channel, frames))
                continue
            self.answer_with_error(channel, frames[:d], header, text, ename)
        self.end_wake()
        return keep

    def answer_with_error(
        self, channel: str, idents: list[bytes], header: dict, text: str, ename: str
    ) -> None:
        """End one cell with an error reply (and its error output and idle status)."""
        msg = {"header": header}
        reply = local_replies.error_reply(text, ename)
        self.front.publish("error", {k: reply[k] for k in ("ename", "evalue", "traceback")}, msg)
        self.front.reply(channel, idents, "execute_reply", reply, msg)
        self.front.publish("status", {"execution_state": "idle"}, msg)


def kernel_info_content(frames: list[bytes]) -> dict[str, Any] | None:
    """The content of a real ``kernel_info_reply`` (kept to answer while standing in)."""
    return m.loads(m.signed_frame(frames, m.CONTENT))


WakeCallback = Callable[[], None]
