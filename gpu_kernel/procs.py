"""Which process is a kernel's, and ending it: the GPU host's process bookkeeping (Linux /proc).

``launcher`` (launch, ``ctl``, the fence) and ``warm`` (kernels forked by a warm interpreter)
write a kernel's pid file with ``write_pid_file`` and find the kernel again with ``owned_pid``.
The pid file holds the pid and the process's start time (``/proc/PID/stat`` field 22, in clock
ticks since boot): a pid the system has since given to another process has another start time,
so no ``ctl`` ever signals a stranger. ``kill_group`` ends a kernel's whole process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

POLL_INTERVAL = 0.02
KILL_GRACE = 3.0
PID_FILE = "kernel.pid"


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])  # field 22 of stat; the text after ")" starts at field 3


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    return proc_state(pid) not in (None, "Z", "X")


def write_pid_file(rdir: Path, pid: int) -> None:
    """``kernel.pid`` in ``rdir``: "PID START_TIME" (0600, never followed through a link)."""
    started = start_time(pid)
    fd = os.open(rdir / PID_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid} {started if started is not None else ''}".rstrip() + "\n")


def recorded_pid(rdir: Path) -> int | None:
    """The pid ``rdir``'s pid file names, alive or not (None: no readable pid file)."""
    try:
        return int((rdir / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def owned_pid(rdir: Path) -> int | None:
    """The pid in ``rdir``'s pid file when that very process is alive (same start time; a pid
    file without one, from an older launcher: the command line must name the connection file)."""
    try:
        words = (rdir / PID_FILE).read_text().split()
        pid = int(words[0])
        started = int(words[1]) if len(words) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 1 or not alive(pid):
        return None
    if started is not None:
        return pid if start_time(pid) == started else None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if str(rdir / "connection.json").encode() in cmdline else None


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def kill_group(pid: int, grace: float = KILL_GRACE) -> None:
    """SIGTERM the kernel's process group, SIGKILL whatever is left after ``grace`` seconds;
    return once it is gone (or after another ``grace``)."""
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return
    group = pgid == pid  # the kernel leads its own group (start_new_session, setsid)
    send = os.killpg if group else os.kill

    def gone() -> bool:
        return not (group_alive(pid) if group else alive(pid))

    try:
        send(pid, signal.SIGTERM)
    except OSError:
        return
    for sig in (signal.SIGKILL, None):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(POLL_INTERVAL)
        if sig is not None:
            with contextlib.suppress(OSError):  # no pid reuse while its group still exists
                send(pid, sig)
