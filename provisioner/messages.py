"""Cheap, pure helpers to peek into Jupyter wire-protocol frames without re-signing them.

A message on the wire is ``[*identities, b"<IDS|MSG>", hmac, header, parent, metadata, content,
*buffers]``. The session proxy (``provisioner.proxy``) calls these on every message it forwards, so
they only look at what they must: the delimiter's position and, when asked, one JSON frame. Frames
may be ``bytes`` or ``zmq.Frame`` (received with ``copy=False``); nothing here imports zmq.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

DELIM = b"<IDS|MSG>"
_DELIM_LEN = len(DELIM)

#: offsets of the signed frames after the delimiter
HMAC, HEADER, PARENT, METADATA, CONTENT = 1, 2, 3, 4, 5


def as_bytes(frame: Any) -> bytes:
    """The frame's bytes (copies a ``zmq.Frame``; returns ``bytes`` as they are)."""
    return frame if isinstance(frame, bytes) else frame.bytes


def delim_index(frames: Sequence[Any]) -> int:
    """Index of the ``<IDS|MSG>`` delimiter, or -1 when the message has none."""
    for i, frame in enumerate(frames):
        if len(frame) == _DELIM_LEN and as_bytes(frame) == DELIM:
            return i
    return -1


def signed_frame(frames: Sequence[Any], offset: int, start: int | None = None) -> bytes | None:
    """The frame ``offset`` places after the delimiter (e.g. ``HEADER``), or None if missing.

    ``start`` is the delimiter's index when the caller already knows it.
    """
    d = delim_index(frames) if start is None else start
    if d < 0 or d + offset >= len(frames):
        return None
    return as_bytes(frames[d + offset])


def loads(frame: bytes | None) -> dict[str, Any] | None:
    """Decode a JSON frame to a dict; None when it is missing or not a JSON object."""
    if frame is None:
        return None
    try:
        value = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def header_msg_type(header: bytes | None) -> str | None:
    """``msg_type`` of a header frame, or None when the frame is not a valid header."""
    parsed = loads(header)
    if parsed is None:
        return None
    msg_type = parsed.get("msg_type")
    return msg_type if isinstance(msg_type, str) else None


def msg_type(frames: Sequence[Any]) -> str | None:
    """``msg_type`` of a whole message (parses only its header)."""
    return header_msg_type(signed_frame(frames, HEADER))


def status_state(frames: Sequence[Any], start: int) -> str | None:
    """``execution_state`` of an IOPub ``status`` message whose delimiter is at ``start``."""
    content = loads(signed_frame(frames, CONTENT, start))
    if content is None:
        return None
    state = content.get("execution_state")
    return state if isinstance(state, str) else None
