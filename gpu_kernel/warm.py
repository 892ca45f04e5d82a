"""Warm interpreters: a kernel start or resume that does not pay for Python's, IPython's and torch's
imports. ``python -m gpu_kernel warm`` on a GPU host.

A warm interpreter serves one broker user on one host (``<runtime root>/<host>/.warm/<owner>.sock``,
a Unix socket in a 0700 directory, so only its Unix user can reach it). It has imported IPython,
ipykernel, ``gpu_kernel.kernelapp`` and the modules it was asked to preload (torch, by default,
when installed; CUDA is not initialised, so it holds no GPU memory and no device), and waits.
The launcher (``launcher.start_kernel``) hands it a kernel's identity (the runtime dir, whose
0600 connection file holds the key, the environment with ``CUDA_VISIBLE_DEVICES``) over that
socket, never on a command line; the interpreter forks, and the child becomes the kernel: its
own session, the environment given, ``kernelapp.run``. The interpreter stays warm for the next
one, reaps its children (writing the exit status of one that was killed before it could), and
exits by itself after ``idle`` seconds without a launch.

It refuses (``refused``, the launcher then starts the kernel the cold way): a peer that is not
its own Unix user, a version other than its own, a kernel of another broker user than the one it
serves (several users share one Unix account in a teaching lab), a runtime dir outside its host's.

The launcher starts one (``ensure``) after a launch found none: the next start on that host is
warm. ``launch`` returns the kernel's pid, or None when no warm interpreter answered.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gpu_kernel import __version__, fdwait, procs
from gpu_kernel.protocol import PROTOCOL_VERSION as PROTOCOL
from gpu_kernel.protocol import check_user_name

log = logging.getLogger("gpu_kernel.warm")

CONNECT_TIMEOUT = 0.5  # a warm interpreter answers at once, or it is not there
REPLY_TIMEOUT = 10.0
MAX_MESSAGE = 1 << 20
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# What a kernel's start imports beyond ``ipykernel.kernelapp`` (found with ``sys.modules`` before
# and after ``GPUKernelApp.initialize``): the debugger (debugpy alone is ~0.25 s), IPython's pdb,
# psutil (the connection file's interfaces), sqlite3 (the history). Each is optional.
KERNEL_MODULES = (
    "ipykernel.debugger",
    "IPython.core.debugger",
    "IPython.core.completerlib",
    "IPython.core.oinspect",
    "IPython.extensions.storemagic",
    "jupyter_client.localinterfaces",
    "psutil",
    "sqlite3",
    "tornado.platform.asyncio",
    "tornado.queues",
)


class Refused(Exception):
    """A warm interpreter would not start this kernel (the reason is for the kernel's log)."""


class _Probe(Exception):
    """A connection that sent nothing: ``ensure`` checking that the interpreter answers."""


def warm_dir(host_dir: Path) -> Path:
    """``<runtime root>/<host>/.warm`` (not a kernel id: those never start with a dot)."""
    return host_dir / ".warm"


def socket_path(host_dir: Path, owner: str) -> Path:
    return warm_dir(host_dir) / f"{check_user_name(owner)}.sock"


SUN_PATH_MAX = 107  # bytes of an AF_UNIX socket path, less the NUL (Linux)


@contextlib.contextmanager
def sock_name(path: Path) -> Iterator[str]:
    """A name for ``bind``/``connect`` that reaches ``path`` even when its runtime dir is too
    deep for AF_UNIX (108 bytes): through ``/proc/self/fd`` and a descriptor of its folder."""
    if len(os.fsencode(str(path))) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def check_modules(names: list[str]) -> list[str]:
    """Module names to preload, each checked (they become ``import`` statements)."""
    for name in names:
        if not isinstance(name, str) or not _MODULE_RE.fullmatch(name):
            raise ValueError(f"not a module name: {name!r}")
    return list(names)


# -- the launcher's side -----------------------------------------------------------------------


def _message(sock: socket.socket, data: dict) -> dict:
    sock.sendall(json.dumps(data).encode() + b"\n")
    buf = b""
    deadline = time.monotonic() + REPLY_TIMEOUT
    while not buf.endswith(b"\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk or len(buf) > MAX_MESSAGE:
            raise OSError("the warm interpreter closed the connection")
        buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise OSError("the warm interpreter's reply is not an object")
    return reply


def launch(host_dir: Path, owner: str, rdir: Path, env: dict[str, str], cwd: str) -> int | None:
    """Ask the owner's warm interpreter on this host to fork the kernel of runtime dir ``rdir``
    (its connection file written); its pid, or None when none answered or it refused."""
    path = socket_path(host_dir, owner)
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        with sock_name(path) as name:
            sock.connect(name)
        reply = _message(
            sock,
            {
                "protocol": PROTOCOL,
                "version": __version__,
                "owner": owner,
                "rdir": str(rdir),
                "env": env,
                "cwd": cwd,
            },
        )
    except (OSError, ValueError) as exc:
        log.info("no warm interpreter at %s: %s", path, exc)
        return None
    finally:
        sock.close()
    if not reply.get("ok") or type(reply.get("pid")) is not int:
        log.info("the warm interpreter refused: %s", reply.get("error"))
        return None
    return int(reply["pid"])


def ensure(host_dir: Path, owner: str, idle: float, preload: list[str]) -> None:
    """Start a warm interpreter for ``owner`` on this host unless one answers; returns at once
    (it imports in the background, in a session of its own)."""
    path = socket_path(host_dir, owner)
    if path.exists():
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(CONNECT_TIMEOUT)
            with sock_name(path) as name:
                probe.connect(name)
            return
    wdir = warm_dir(host_dir)
    wdir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(wdir, 0o700)
    argv = [sys.executable, "-m", "gpu_kernel", "warm", "--host-dir", str(host_dir)]
    argv += ["--owner", owner, "--idle", f"{idle:g}"]
    for name in check_modules(preload):
        argv += ["--preload", name]
    fd = os.open(wdir / "warm.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "ab") as out:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


# -- the warm interpreter ------------------------------------------------------------------------


class WarmInterpreter:
    """The serving loop (``python -m gpu_kernel warm``); one per broker user and host."""

    def __init__(self, host_dir: Path, owner: str, idle: float) -> None:
        self.host_dir = host_dir.absolute()
        self.owner = check_user_name(owner)
        self.idle = idle
        self.path = socket_path(self.host_dir, owner)
        self.children: dict[int, Path] = {}  # pid -> runtime dir

    def preload(self, names: list[str]) -> None:
        """Import what every kernel needs, and what it was asked to (CUDA stays untouched)."""
        import ipykernel.ipkernel
        import ipykernel.kernelapp  # noqa: F401
        import IPython  # noqa: F401

        import gpu_kernel.kernelapp  # noqa: F401

        for name in KERNEL_MODULES:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
        for name in check_modules(names):
            try:
                importlib.import_module(name)
            except Exception as exc:  # an optional module: the kernel imports it itself
                print(f"warm: not preloaded: {name}: {exc}", flush=True)

    def serve(self) -> int:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with sock_name(tmp) as name:
            listener.bind(name)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)  # the newest warm interpreter takes over the name
        fd = os.open(self._marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        listener.listen(16)
        print(f"warm: serving {self.owner} at {self.path} (pid {os.getpid()})", flush=True)
        last = time.monotonic()
        try:
            while time.monotonic() - last < self.idle:
                self._reap()
                if not fdwait.ready([listener], (), 1.0)[0]:
                    if not self._still_ours():
                        break  # another warm interpreter took the name: leave
                    continue
                conn, _ = listener.accept()
                with conn:
                    if self._handle(conn):
                        last = time.monotonic()
        finally:
            listener.close()
            if self._still_ours():
                for path in (self.path, self._marker):
                    with contextlib.suppress(OSError):
                        path.unlink()
        print(f"warm: idle for {self.idle:g} s; exiting", flush=True)
        return 0

    @property
    def _marker(self) -> Path:
        """``<owner>.sock.pid``: which interpreter bound the socket's name last."""
        return self.path.with_name(self.path.name + ".pid")

    def _still_ours(self) -> bool:
        """Whether the socket's name is still this process's (a newer one may have taken it)."""
        try:
            return int(self._marker.read_text()) == os.getpid()
        except (OSError, ValueError):
            return False

    def _handle(self, conn: socket.socket) -> bool:
        """One launch request: fork the kernel or say why not; True when a kernel started."""
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != os.getuid():
                raise Refused(f"peer uid {uid} is not this interpreter's user")
            conn.settimeout(REPLY_TIMEOUT)
            request = self._read(conn)
            rdir, env, cwd = self._check(request)
            pid = self._fork(rdir, env, cwd)
        except _Probe:
            return False
        except Refused as exc:
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
            print(f"warm: refused a launch: {exc}", flush=True)
            return False
        except (OSError, ValueError) as exc:
            print(f"warm: a launch request failed: {exc}", flush=True)
            return False
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"ok": True, "pid": pid}).encode() + b"\n")
        return True

    @staticmethod
    def _read(conn: socket.socket) -> dict:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk and not buf:
                raise _Probe  # a launcher checking that this interpreter answers
            if not chunk or len(buf) > MAX_MESSAGE:
                raise Refused("incomplete request")
            buf += chunk
        request = json.loads(buf)
        if not isinstance(request, dict):
            raise Refused("the request is not an object")
        return request

    def _check(self, request: dict) -> tuple[Path, dict[str, str], str]:
        if request.get("protocol") != PROTOCOL or request.get("version") != __version__:
            raise Refused(
                f"version {request.get('version')!r} (protocol {request.get('protocol')!r}), "
                f"this interpreter runs {__version__} (protocol {PROTOCOL})"
            )
        if request.get("owner") != self.owner:
            raise Refused(f"a kernel of {request.get('owner')!r}; this one serves {self.owner!r}")
        rdir = Path(str(request.get("rdir", ""))).absolute()
        if rdir.parent != self.host_dir or rdir.name.startswith(".") or rdir.is_symlink():
            raise Refused(f"runtime dir {rdir} is not one of {self.host_dir}")
        record = rdir / "launch.json"
        try:
            owner = json.loads(record.read_text()).get("owner")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner != self.owner or not (rdir / "connection.json").is_file():
            raise Refused(f"runtime dir {rdir} is not a launch of {self.owner!r}")
        env = request.get("env")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise Refused("bad environment")
        cwd = request.get("cwd")
        if not isinstance(cwd, str):
            raise Refused("bad working directory")
        return rdir, env, cwd

    def _fork(self, rdir: Path, env: dict[str, str], cwd: str) -> int:
        log_fd = os.open(
            rdir / "kernel.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600
        )
        pid = os.fork()
        if pid == 0:  # the kernel
            code = 1
            try:
                os.setsid()
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                os.environ.clear()
                os.environ.update(env)
                os.chdir(cwd)
                from gpu_kernel.kernelapp import run

                code = run(str(rdir / "connection.json"), [])
            finally:
                os._exit(code)
        os.close(log_fd)
        self.children[pid] = rdir
        return pid

    def _reap(self) -> None:
        """Collect ended kernels; a kernel killed before it wrote its exit code gets one."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            rdir = self.children.pop(pid, None)
            if rdir is None or (rdir / "exit_code").exists():
                continue
            if procs.recorded_pid(rdir) != pid:
                continue  # the dir is a newer incarnation's (a resume on this host): not ours
            code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            with contextlib.suppress(OSError):
                (rdir / "exit_code").write_text(f"{code}\n")


def main(host_dir: str, owner: str, idle: float, preload: list[str]) -> int:
    """``python -m gpu_kernel warm``: preload, then serve until idle."""
    warm = WarmInterpreter(Path(host_dir), owner, idle)
    warm.preload(preload)
    return warm.serve()
