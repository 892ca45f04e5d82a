"""The cells the session proxy has sent to its kernel, and which one runs (pure).

``SessionProxy`` feeds ``Executions`` with what it sees: an ``execute_request`` sent upstream, its
``execute_reply``, and every IOPub ``status`` with its parent. From that it knows

- ``busy``: a frontend's cell is executing, from its ``busy`` status to its ``idle`` status (the
  kernel's statuses for other requests, and for the provisioner's own control requests, do not
  count: the broker's idle rules and JupyterLab's indicator must agree with the user's cells);
- ``take_unanswered``: the cells sent but never answered, in order, for a kernel that suspends
  (they go to the resumed one) or a connection that dropped (their replies were lost);
- ``mark``/``unanswered_before``: which cells were sent before a probe request, so that once the
  probe's reply comes back (the kernel handles shell requests in order) the proxy knows every
  earlier cell without a reply lost it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Executions:
    """Bookkeeping of execute requests by msg_id; no I/O, no clock."""

    _sent: dict[str, tuple[int, str, list[bytes]]] = field(default_factory=dict)
    _running: set[str] = field(default_factory=set)
    _seq: int = 0

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def pending(self) -> int:
        """How many cells were sent and not answered."""
        return len(self._sent)

    def sent(self, msg_id: str, channel: str, frames: list[bytes]) -> None:
        self._seq += 1
        self._sent[msg_id] = (self._seq, channel, frames)

    def replied(self, msg_id: str) -> bool:
        """The reply of ``msg_id`` came; True when it was one of ours to track."""
        return self._sent.pop(msg_id, None) is not None

    def status(self, state: str, parent_msg_id: str, parent_is_execute: bool) -> None:
        """An IOPub status of the kernel, for the request ``parent_msg_id``."""
        if not parent_is_execute:
            return
        if state == "busy":
            self._running.add(parent_msg_id)
        elif state == "idle":
            self._running.discard(parent_msg_id)

    def running_frames(self) -> list[bytes] | None:
        """The request of the cell running now (the earliest if several), or None."""
        sent = [(self._sent[mid][0], mid) for mid in self._running if mid in self._sent]
        return self._sent[min(sent)[1]][2] if sent else None

    def mark(self) -> int:
        """A point in the order of sent cells (see ``unanswered_before``)."""
        return self._seq

    def unanswered_before(self, mark: int) -> list[tuple[str, list[bytes]]]:
        """Remove and return the cells sent up to ``mark`` that have no reply, in order."""
        lost = sorted((seq, mid) for mid, (seq, _, _) in self._sent.items() if seq <= mark)
        out = []
        for _, msg_id in lost:
            _, channel, frames = self._sent.pop(msg_id)
            self._running.discard(msg_id)
            out.append((channel, frames))
        return out

    def take_unanswered(self) -> list[tuple[str, list[bytes]]]:
        """Remove and return every unanswered cell, in the order it was sent."""
        taken = self.unanswered_before(self._seq)
        self._running.clear()
        return taken

    def forget(self) -> None:
        """The kernel process is gone for good (restart): its cells went with it."""
        self._sent.clear()
        self._running.clear()
