"""What the session proxy does while no kernel process exists: stand in for it, then resume.

``SessionProxy`` inherits this; every method runs in the proxy's thread and uses its sockets,
queue and state (declared below). Requests are answered, held or turn into a resume according
to ``local_replies``; progress lines go to the cell that triggered the resume.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import zmq
from jupyter_client.session import Session

from . import local_replies
from . import messages as m
from .proxy_state import QUEUED_CHANNELS, Activity, ProxyState

log = logging.getLogger("provisioner.proxy")


class StandInMixin:
    """The suspended half of ``SessionProxy`` (which owns every attribute declared here)."""

    _state: ProxyState
    _session: Session | None
    _front: dict[str, zmq.Socket]
    _queued: deque[tuple[str, list[bytes]]]
    _inflight: dict[str, tuple[str, list[bytes]]]
    _activity: Activity
    _on_resume: Callable[[], None] | None
    _resume_parent: dict[str, Any] | None
    kernel_info_reply: list[bytes] | None
    kernel_suspended_hook: Callable[[dict[str, Any]], None] | None
    # and SessionProxy's _close_upstream() and _queue(channel, frames)

    def _do_suspend(self, on_resume: Callable[[], None]) -> None:
        self._close_upstream()
        self._state = ProxyState.SUSPENDED
        self._on_resume = on_resume
        self._activity = replace(self._activity, attached=False, busy=False, execution_state="idle")
        # unanswered cells first (the saving kernel dropped them), then what waited here
        held = deque([*self._inflight.values(), *self._queued])
        self._inflight.clear()
        self._queued = deque()
        for channel, frames in held:  # a cell run while we suspended resumes at once
            self._stand_in(channel, frames)

    def _stand_in(self, channel: str, frames: list[bytes]) -> None:
        """Answer, hold, or resume on one request that arrives while no kernel process exists."""
        assert self._session is not None
        if channel not in QUEUED_CHANNELS:
            return  # stdin: no kernel asked for input
        try:
            idents, rest = self._session.feed_identities(frames)
            msg = self._session.deserialize(rest)
        except Exception as exc:  # bad signature or not a Jupyter message: drop it
            log.warning("session proxy: dropped a %s message it could not verify: %s", channel, exc)
            return
        msg_type = msg["header"].get("msg_type", "")
        sock = self._front[channel]
        if msg_type == "kernel_info_request":
            self._session.send(sock, "kernel_info_reply", self._kernel_info(), msg, ident=idents)
            return
        local = local_replies.local_reply(msg_type, msg.get("content") or {})
        if local is not None and msg_type != local_replies.RESUMES:
            self._session.send(sock, local[0], local[1], msg, ident=idents)
            return
        self._queue(channel, frames)
        if msg_type == local_replies.RESUMES:
            self._activity = replace(self._activity, last_activity=time.time())
            if self._state is ProxyState.SUSPENDED:
                self._start_resume(msg)

    def _kernel_info(self) -> dict[str, Any]:
        content = None
        if self.kernel_info_reply is not None:
            content = m.loads(m.signed_frame(self.kernel_info_reply, m.CONTENT))
        return content or local_replies.default_kernel_info()

    def _start_resume(self, parent: dict[str, Any]) -> None:
        self._state = ProxyState.RESUMING
        self._resume_parent = parent
        self._publish("status", {"execution_state": "busy"}, parent)
        on_resume = self._on_resume
        if on_resume is None:
            self._do_resume_failed("this kernel cannot be resumed (no session to resume it)")
            return
        threading.Thread(target=on_resume, name="session-resume", daemon=True).start()

    def _publish(self, msg_type: str, content: dict[str, Any], parent: dict | None) -> None:
        assert self._session is not None
        self._session.send(self._front["iopub"], msg_type, content, parent, ident=msg_type.encode())

    def _publish_progress(self, text: str) -> None:
        if self._resume_parent is not None and self._session is not None:
            content = {"name": "stdout", "text": text.rstrip("\n") + "\n"}
            self._publish("stream", content, self._resume_parent)

    def _do_resume_failed(self, text: str) -> None:
        assert self._session is not None
        held, self._queued = self._queued, deque()
        for channel, frames in held:
            d = m.delim_index(frames)
            header = m.loads(m.signed_frame(frames, m.HEADER, d))  # verified when it arrived
            if header is None or header.get("msg_type") != local_replies.RESUMES:
                continue  # requests that only wait for a kernel are dropped with the cells
            msg = {"header": header}
            reply = local_replies.resume_failed_reply(text)
            self._publish("error", {k: reply[k] for k in ("ename", "evalue", "traceback")}, msg)
            self._session.send(self._front[channel], "execute_reply", reply, msg, ident=frames[:d])
            self._publish("status", {"execution_state": "idle"}, msg)
        self._state = ProxyState.SUSPENDED
        self._resume_parent = None

    def _on_suspended_notice(self, frames: list[Any], d: int) -> None:
        if m.header_msg_type(m.signed_frame(frames, m.HEADER, d)) != "shared_gpu_suspended":
            return
        if self._state is ProxyState.ATTACHED:
            self._state = ProxyState.HOLDING  # the next cell waits for the resume
        content = m.loads(m.signed_frame(frames, m.CONTENT, d)) or {}
        hook = self.kernel_suspended_hook
        if hook is not None:
            threading.Thread(target=hook, args=(content,), daemon=True).start()
