"""``ready``: ``select.select`` without its limit of file descriptors below 1024 (``poll(2)``).

A Jupyter server with a few dozen kernels holds more than 1024 descriptors (each kernel's ZMQ
sockets, tunnels, SSH channels), and ``select.select`` then raises "filedescriptor out of range"
for the newer ones: a tunnel pump that selects on them would stop. The tunnel pump, the SSH
command reader, the warm interpreter and the launcher's watch wait here instead.
"""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Any

FD_SETSIZE = 1024  # select()'s limit on a descriptor's number
_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL
_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL


def _fd(obj: Any) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def ready(
    readers: Sequence[Any], writers: Sequence[Any] = (), timeout: float | None = None
) -> tuple[list[Any], list[Any]]:
    """The objects of ``readers`` ready to read and of ``writers`` ready to write (a descriptor
    or anything with ``fileno()``), waiting up to ``timeout`` s (None: until one is).
    ``select`` while every descriptor is below its limit (it is the cheaper call for the few a
    tunnel pump watches), ``poll`` past it."""
    if all(_fd(obj) < FD_SETSIZE for obj in (*readers, *writers)):
        r, w, _ = select.select(readers, writers, [], timeout)
        return r, w
    poller = select.poll()
    wanted: dict[int, int] = {}
    for obj in readers:
        fd = _fd(obj)
        wanted[fd] = wanted.get(fd, 0) | select.POLLIN | select.POLLPRI
    for obj in writers:
        fd = _fd(obj)
        wanted[fd] = wanted.get(fd, 0) | select.POLLOUT
    for fd, mask in wanted.items():
        poller.register(fd, mask)
    events = dict(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))
    return (
        [obj for obj in readers if events.get(_fd(obj), 0) & _READ],
        [obj for obj in writers if events.get(_fd(obj), 0) & _WRITE],
    )
