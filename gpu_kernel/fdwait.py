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

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL
_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL


def _fd(obj: Any) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def ready(
    readers: Sequence[Any], writers: Sequence[Any] = (), timeout: float | None = None
) -> tuple[list[Any], list[Any]]:
    """The objects of ``readers`` ready to read and of ``writers`` ready to write (a descriptor
    or anything with ``fileno()``), waiting up to ``timeout`` s (None: until one is).
    ``select`` first (the cheaper call for the few a tunnel pump watches, and no extra work on
    its hot path); ``poll`` when a descriptor is past select's limit and it refuses."""
    try:
        r, w, _ = select.select(readers, writers, [], timeout)
        return r, w
    except ValueError:  # "filedescriptor out of range in select()"
        pass
    read_fds = [_fd(obj) for obj in readers]
    write_fds = [_fd(obj) for obj in writers]
    wanted: dict[int, int] = {}
    for fd in read_fds:
        wanted[fd] = wanted.get(fd, 0) | select.POLLIN | select.POLLPRI
    for fd in write_fds:
        wanted[fd] = wanted.get(fd, 0) | select.POLLOUT
    poller = select.poll()
    for fd, mask in wanted.items():
        poller.register(fd, mask)
    events = dict(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))
    return (
        [obj for obj, fd in zip(readers, read_fds, strict=True) if events.get(fd, 0) & _READ],
        [obj for obj, fd in zip(writers, write_fds, strict=True) if events.get(fd, 0) & _WRITE],
    )
