"""Reaching a GPU host: run commands and forward ports over one SSH connection per kernel.

The only module that imports paramiko. ``connect(target)`` returns an ``SSHConnection`` (or a
``LocalConnection`` for ``address="local"``); ``remote.py`` runs the launcher through ``run``, the
provisioner tunnels the kernel's five ports through ``forward``, the broker probes and fences.
Host keys are checked strictly; authentication uses the key file only (no agent, no password).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import paramiko

from gpu_kernel import fdwait
from gpu_kernel.cancel import NEVER, CancelToken
from gpu_kernel.errors import (
    CommandTimeout,
    HostKeyError,
    HostUnreachable,
    SSHAuthError,
)
from gpu_kernel.tunnel import ForwardPump

log = logging.getLogger(__name__)
# paramiko logs every refused tunnel channel at ERROR (e.g. a client reconnecting to a kernel that
# just exited); our own errors say what matters, so its chatter goes to a quiet child logger.
TRANSPORT_LOG = f"{__name__}.transport"
logging.getLogger(TRANSPORT_LOG).setLevel(logging.CRITICAL)

DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
# known_hosts key type -> host key algorithms paramiko may negotiate for it
_HOSTKEY_ALGS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


@dataclass(frozen=True)
class HostTarget:
    """Where and how to reach one GPU host (built by the broker from its config)."""

    name: str
    address: str  # "local": no SSH, run the launcher as a subprocess
    port: int = 22
    user: str = ""
    key_file: str | None = None
    known_hosts_file: str | None = None  # None: ~/.ssh/known_hosts
    host_keys: tuple[str, ...] = ()  # "keytype base64" lines, trusted as well
    python: str = "python3"
    connect_timeout: float = 10.0
    nodelay_pty: bool = True  # keep a pty session open (TCP_NODELAY); a forced-command key has none

    @property
    def is_local(self) -> bool:
        return self.address == "local"

    @property
    def login(self) -> str:
        return f"{self.user or getpass.getuser()}@{self.address}:{self.port}"


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of one command run on a host."""

    returncode: int
    stdout: bytes
    stderr: bytes


class CommandStream:
    """A command running on a host, its stdin and stdout as binary streams (``open_stream``).

    Write to ``stdin`` and ``close_stdin()``; read ``stdout`` to its end; then ``wait()`` gives
    the exit status and stderr (collected by a thread, the last 64 KiB kept). ``close()`` ends it.
    """

    def __init__(
        self,
        stdin: IO[bytes],
        stdout: IO[bytes],
        close_stdin: Callable[[], None],
        wait: Callable[[float], int],
        close: Callable[[], None],
        read_stderr: Callable[[], bytes],
        set_timeout: Callable[[float], None] | None = None,
        ended: Callable[[], bool] | None = None,
    ) -> None:
        self.stdin, self.stdout = stdin, stdout
        self._close_stdin, self._wait, self._close = close_stdin, wait, close
        self._set_timeout = set_timeout
        self._ended = ended
        self._stderr = bytearray()
        self._stderr_thread = threading.Thread(target=self._drain, args=(read_stderr,), daemon=True)
        self._stderr_thread.start()

    def _drain(self, read: Callable[[], bytes]) -> None:
        try:
            while chunk := read():
                self._stderr += chunk
                del self._stderr[: max(0, len(self._stderr) - 65536)]
        except (OSError, EOFError, ValueError, paramiko.SSHException):
            pass

    def close_stdin(self) -> None:
        """Send EOF to the command."""
        self._close_stdin()

    def set_read_timeout(self, seconds: float) -> None:
        """From now on a read of ``stdout`` that waits ``seconds`` raises ``TimeoutError`` (over
        SSH; a local command's pipe has no timeout, and a local host never drops off the net)."""
        if self._set_timeout is not None:
            self._set_timeout(seconds)

    def ended(self) -> bool:
        """The command has exited or its channel has closed (nothing more goes in)."""
        return self._ended() if self._ended is not None else False

    def wait(self, timeout: float = 30) -> CommandResult:
        """Wait for the exit; ``stdout`` of the result is empty (it was read as a stream)."""
        code = self._wait(timeout)
        self._stderr_thread.join(timeout=5)
        return CommandResult(code, b"", bytes(self._stderr))

    def close(self) -> None:
        self._close()

    def __enter__(self) -> CommandStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quietly(end: Callable[[], None]) -> None:
    """Close or shut a channel whose connection may be gone already: paramiko then raises
    EOFError or OSError while telling the peer, and there is no peer left to tell."""
    with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
        end()


class HostConnection:
    """A way to run commands on a host and reach its loopback ports."""

    target: HostTarget

    def run(self, argv: list[str], stdin: bytes = b"", timeout: float = 30) -> CommandResult:
        raise NotImplementedError

    def open_stream(self, argv: list[str], timeout: float = 60) -> CommandStream:
        """Start ``argv`` with streamed stdin/stdout; a read waiting over ``timeout`` s fails."""
        raise NotImplementedError

    def start_ahead(self, argv: list[str], fresh_for: float) -> None:
        """Start ``argv`` now, for the next ``open_stream(argv)`` to take within ``fresh_for``
        seconds: the host's login shell and the command's own start-up happen while nobody
        waits. Only for a command that does nothing until it reads its stdin, and that exits by
        itself some time after ``fresh_for`` when nothing comes. Returns at once; a connection
        without a shell to save (``LocalConnection``) starts nothing."""

    def forward(self, remote_port: int) -> int:
        """A 127.0.0.1 port here that reaches 127.0.0.1:``remote_port`` on the host."""
        raise NotImplementedError

    def unforward(self, local_port: int) -> None:
        """Stop forwarding ``local_port`` (from ``forward``) and close its connections."""
        raise NotImplementedError

    def is_alive(self) -> bool:
        raise NotImplementedError

    def responds(self, timeout: float) -> bool:
        """Whether the host answers within ``timeout`` s (a round trip, where there is one)."""
        return self.is_alive()

    def forwarding(self) -> list[int]:
        """Local ports this connection forwards now."""
        return []

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> HostConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(target: HostTarget, cancel: CancelToken = NEVER) -> HostConnection:
    """Open a connection to ``target``; raises HostUnreachable, HostKeyError or SSHAuthError,
    or ``Cancelled`` as soon as ``cancel`` is cancelled during the TCP or SSH handshake."""
    return LocalConnection(target) if target.is_local else SSHConnection(target, cancel)


class LocalConnection(HostConnection):
    """The "GPU host" is this machine: commands are subprocesses, ports are used as they are."""

    def __init__(self, target: HostTarget) -> None:
        self.target = target

    def run(self, argv: list[str], stdin: bytes = b"", timeout: float = 30) -> CommandResult:
        try:
            p = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CommandTimeout(f"`{shlex.join(argv)}` did not finish in {timeout:g} s") from e
        except OSError as e:  # missing interpreter: same status a shell would give
            return CommandResult(127, b"", str(e).encode())
        return CommandResult(p.returncode, p.stdout, p.stderr)

    def open_stream(self, argv: list[str], timeout: float = 60) -> CommandStream:
        p = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        err = p.stderr

        def wait(limit: float) -> int:
            try:
                return p.wait(limit)
            except subprocess.TimeoutExpired as e:
                raise CommandTimeout(f"`{shlex.join(argv)}` did not finish in {limit:g} s") from e

        def close() -> None:
            for f in (p.stdin, p.stdout):
                with contextlib.suppress(OSError):
                    f.close()
            if p.poll() is None:
                p.kill()
            p.wait()
            err.close()

        def close_stdin() -> None:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]

        return CommandStream(
            p.stdin,
            p.stdout,
            close_stdin,
            wait,
            close,
            lambda: err.read1(65536),
            ended=lambda: p.poll() is not None,
        )

    def forward(self, remote_port: int) -> int:
        return remote_port

    def unforward(self, local_port: int) -> None:
        pass  # nothing listens here on the kernel's behalf

    def is_alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _load_host_keys(target: HostTarget) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    path = Path(target.known_hosts_file or "~/.ssh/known_hosts").expanduser()
    if path.exists():
        try:
            keys.load(str(path))
        except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as e:
            raise HostKeyError(f"cannot read known_hosts file {path}: {e}") from e
    for line in target.host_keys:
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(f"{_host_id(target)} {line}")
        except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError) as e:
            raise HostKeyError(f"host {target.name}: cannot parse host key {line[:40]!r}") from e
        if entry is None or entry.key is None:
            raise HostKeyError(f"host {target.name}: cannot parse host key {line[:40]!r}")
        keys.add(_host_id(target), entry.key.get_name(), entry.key)
    return keys


def _host_id(target: HostTarget) -> str:
    return target.address if target.port == 22 else f"[{target.address}]:{target.port}"


def _load_key(target: HostTarget) -> paramiko.PKey:
    if target.key_file:
        candidates = [Path(target.key_file).expanduser()]
    else:
        candidates = [p for p in map(Path, DEFAULT_IDENTITIES) if p.expanduser().exists()]
        candidates = [p.expanduser() for p in candidates]
    if not candidates:
        raise SSHAuthError(
            f"no SSH key for {target.login}",
            "set key_file for this host in the broker config (agents and passwords are not used)",
        )
    path = candidates[0]
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException as e:
        raise SSHAuthError(
            f"the SSH key {path} for {target.login} is encrypted",
            "use a key without a passphrase, readable only by the server's user",
        ) from e
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise SSHAuthError(f"cannot load the SSH key {path} for {target.login}: {e}") from e


AHEAD_OPEN_TIMEOUT = 10.0  # s for a channel started ahead to open (nobody waits on it)


@dataclass
class _Ahead:
    """A command ``start_ahead`` started, waiting for ``open_stream`` to take it."""

    stream: CommandStream
    fresh_until: float  # time.monotonic() after which it is not handed out

    def usable(self) -> bool:
        """Still fresh, and still running: it will read the stdin it is given."""
        return time.monotonic() < self.fresh_until and not self.stream.ended()


class SSHConnection(HostConnection):
    """One paramiko Transport to a host; all forwards share it and one pump thread."""

    def __init__(self, target: HostTarget, cancel: CancelToken = NEVER) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._closed = False
        self._pump: ForwardPump | None = None
        self._sock: socket.socket | None = None
        self._ahead: dict[str, _Ahead] = {}  # command line -> a channel started ahead
        self._opening: set[str] = set()  # command lines whose channel start_ahead is opening
        with cancel.hook(self._abort_handshake):
            self._handshake()
        self._transport.set_keepalive(15)

    def _abort_handshake(self) -> None:
        """Break a connect or handshake under way (from another thread): close its socket."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _handshake(self) -> None:
        self._transport = self._open_transport()
        try:
            self._check_host_key()
            self._authenticate()
            # sshd sets TCP_NODELAY on its side only once a session with a pty runs a command;
            # without it small ZMQ replies stall on Nagle + delayed ACK (~48 ms vs ~8 ms).
            self._pty: paramiko.Channel | None = None
            try:
                if self.target.nodelay_pty:
                    self._pty = self._transport.open_session(timeout=self.target.connect_timeout)
                    self._pty.get_pty()
                    self._pty.exec_command("cat")
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise self._lost(e) from e
        except BaseException:
            self._transport.close()
            raise

    def _tcp_connect(self) -> socket.socket:
        """``socket.create_connection``, keeping each socket where ``_abort_handshake`` sees it."""
        t = self.target
        error: OSError | None = None
        for family, kind, proto, _, addr in socket.getaddrinfo(
            t.address, t.port, type=socket.SOCK_STREAM
        ):
            sock = self._sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(t.connect_timeout)
                sock.connect(addr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error or OSError(f"no address for {t.address}")

    def _open_transport(self) -> paramiko.Transport:
        t = self.target
        try:
            sock = self._tcp_connect()
        except socket.gaierror as e:
            raise HostUnreachable(
                f"cannot resolve host {t.name} ({t.address}): {e}", "check its address"
            ) from e
        except OSError as e:
            raise HostUnreachable(
                f"cannot connect to {t.name} at {t.address}:{t.port}: {e.strerror or e}",
                "is the host up and sshd listening on that port?",
            ) from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.set_log_channel(TRANSPORT_LOG)
        known = self._known = _load_host_keys(t).lookup(_host_id(t))
        if known:  # ask for a key type we know, as OpenSSH does
            algs = [a for k in known for a in _HOSTKEY_ALGS.get(k, (k,))]
            opts = transport.get_security_options()
            opts.key_types = [a for a in algs if a in opts.key_types] or opts.key_types
        try:
            transport.start_client(timeout=t.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            transport.close()
            if known and "host key" in str(e).lower():
                raise self._changed(f"offers none of the known key types ({e})") from e
            raise HostUnreachable(
                f"SSH handshake with {t.name} at {t.address}:{t.port} failed: {e}",
                "is sshd (and not another service) listening on that port?",
            ) from e
        return transport

    def _changed(self, what: str) -> HostKeyError:
        t = self.target
        return HostKeyError(
            f"the SSH host key of {t.name} ({_host_id(t)}) has CHANGED: it {what}; "
            "this may be an attack (someone intercepting the connection), or the host was "
            "reinstalled",
            f"if the change is expected, remove the old line for {_host_id(t)} from "
            f"{t.known_hosts_file or '~/.ssh/known_hosts'} (or host_keys) and add the new key",
        )

    def _check_host_key(self) -> None:
        t = self.target
        key = self._transport.get_remote_server_key()
        if not self._known:
            file = t.known_hosts_file or "~/.ssh/known_hosts"
            raise HostKeyError(
                f"the SSH host key of {t.name} ({_host_id(t)}) is unknown "
                f"({key.get_name()} {key.fingerprint})",
                f"check the key, then trust it with: ssh-keyscan -p {t.port} {t.address} >> {file}",
            )
        if self._known.get(key.get_name()) != key:
            raise self._changed(f"now presents {key.get_name()} {key.fingerprint}")

    def _authenticate(self) -> None:
        t = self.target
        pkey = _load_key(t)
        user = t.user or getpass.getuser()
        try:
            self._transport.auth_publickey(user, pkey)
        except paramiko.SSHException as e:  # AuthenticationException, BadAuthenticationType
            raise SSHAuthError(
                f"{t.login} refused the SSH key {t.key_file or '(default identity)'}: {e}",
                f"add the key's public half to ~{user}/.ssh/authorized_keys on {t.address}",
            ) from e
        if not self._transport.is_authenticated():
            raise SSHAuthError(f"{t.login} did not accept the SSH key {t.key_file}")

    def run(self, argv: list[str], stdin: bytes = b"", timeout: float = 30) -> CommandResult:
        """Run ``argv`` (joined with shlex for the remote shell) on a fresh channel."""
        deadline = time.monotonic() + timeout
        try:
            chan = self._transport.open_session(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._lost(e) from e
        out, err = bytearray(), bytearray()
        try:
            chan.exec_command(shlex.join(argv))
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            # sshd may send the exit status before the last output: the end is EOF + status.
            while True:
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                remaining = deadline - time.monotonic()
                drained = not (chan.recv_ready() or chan.recv_stderr_ready())
                ended = (chan.eof_received or chan.closed) and drained
                if ended and chan.status_event.wait(max(remaining, 0)):
                    break
                if remaining <= 0:
                    where = self.target.name
                    raise CommandTimeout(
                        f"`{shlex.join(argv)}` on {where}: no end in {timeout:g} s"
                    )
                if chan.closed and not self._transport.is_active():
                    raise self._lost(EOFError("connection closed"))
                fdwait.ready([chan], (), min(remaining, 0.2))
            return CommandResult(chan.recv_exit_status(), bytes(out), bytes(err))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._lost(e) from e
        finally:
            _quietly(chan.close)

    def open_stream(self, argv: list[str], timeout: float = 60) -> CommandStream:
        """Run ``argv`` on a channel whose stdin/stdout are file objects: the one
        ``start_ahead(argv)`` started, when it is still fresh and running; else a new one."""
        with self._lock:
            ahead = self._ahead.pop(shlex.join(argv), None)
        if ahead is not None:
            if ahead.usable():
                ahead.stream.set_read_timeout(timeout)
                return ahead.stream
            ahead.stream.close()
        return self._new_stream(argv, timeout)

    def start_ahead(self, argv: list[str], fresh_for: float) -> None:
        key = shlex.join(argv)
        with self._lock:
            if self._closed or key in self._opening:
                return
            held = self._ahead.get(key)
            if held is not None and held.usable():
                return
            self._opening.add(key)
        threading.Thread(
            target=self._open_ahead,
            args=(argv, key, fresh_for),
            name=f"ssh-ahead-{self.target.name}",
            daemon=True,
        ).start()

    def _open_ahead(self, argv: list[str], key: str, fresh_for: float) -> None:
        """``start_ahead``'s thread: open the channel (a round trip or two), then keep it."""
        stream: CommandStream | None = None
        try:
            stream = self._new_stream(argv, AHEAD_OPEN_TIMEOUT)
        except Exception as e:  # the next open_stream opens one itself, and says what fails
            log.info("starting `%s` ahead on %s failed: %s", key, self.target.name, e)
        with self._lock:
            self._opening.discard(key)
            old = self._ahead.pop(key, None)
            if stream is not None and not self._closed:
                self._ahead[key] = _Ahead(stream, time.monotonic() + fresh_for)
                stream = None
        for unused in (old.stream if old is not None else None, stream):
            if unused is not None:
                unused.close()

    def _new_stream(self, argv: list[str], timeout: float) -> CommandStream:
        try:
            chan = self._transport.open_session(timeout=timeout)
            chan.settimeout(timeout)
            chan.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._lost(e) from e

        def wait(limit: float) -> int:
            if not chan.status_event.wait(limit):
                where = self.target.name
                raise CommandTimeout(f"`{shlex.join(argv)}` on {where}: no end in {limit:g} s")
            return chan.recv_exit_status()

        def read_stderr() -> bytes:
            while True:  # the channel's read timeout is for stdout; stderr may stay quiet
                try:
                    return chan.recv_stderr(65536)
                except TimeoutError:
                    if chan.closed:
                        return b""

        return CommandStream(
            chan.makefile_stdin("wb"),
            chan.makefile("rb"),
            lambda: _quietly(chan.shutdown_write),
            wait,
            lambda: _quietly(chan.close),
            read_stderr,
            chan.settimeout,
            lambda: chan.closed or chan.eof_received or chan.exit_status_ready(),
        )

    def _lost(self, e: BaseException) -> HostUnreachable:
        t = self.target
        return HostUnreachable(
            f"the SSH connection to {t.name} ({t.address}:{t.port}) failed: {e}",
            "the host or its sshd may have gone away; reconnect",
        )

    def forward(self, remote_port: int) -> int:
        with self._lock:
            if self._closed:
                raise self._lost(EOFError("connection closed"))
            if self._pump is None:
                self._pump = ForwardPump(self._transport, self.target.name)
            return self._pump.listen(remote_port)

    def unforward(self, local_port: int) -> None:
        with self._lock:
            pump = self._pump
        if pump is not None:
            pump.unlisten(local_port)

    def forwarding(self) -> list[int]:
        pump = self._pump
        return pump.listening if pump is not None else []

    def responds(self, timeout: float) -> bool:
        """An SSH keep-alive request answered within ``timeout`` s (any answer will do: sshd
        refuses the request, and the refusal is the round trip). A transport that looks up but
        whose host is gone (a cut link sends no reset) does not answer."""
        if not self.is_alive():
            return False
        answered = threading.Event()

        def ask() -> None:
            with contextlib.suppress(Exception):
                self._transport.global_request("keepalive@openssh.com", wait=True)
                answered.set()

        threading.Thread(target=ask, name=f"ssh-check-{self.target.name}", daemon=True).start()
        return answered.wait(timeout) and self.is_alive()

    def is_alive(self) -> bool:
        """The transport is up and, once a forward exists, its pump thread still runs."""
        pump = self._pump
        alive = not self._closed and self._transport.is_active()
        return alive and (pump is None or pump.alive)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pump = self._pump
            ahead, self._ahead = list(self._ahead.values()), {}
        for held in ahead:
            held.stream.close()
        if pump is not None:
            pump.stop()
        if self._pty is not None:
            _quietly(self._pty.close)
        self._transport.close()  # also ends a channel open the pump may be waiting on
        if pump is not None:
            pump.join()
