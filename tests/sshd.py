"""Real OpenSSH servers on loopback ports, standing in for GPU hosts in the tests.

Each ``TestHost`` runs its own ``sshd`` with its own host key; all of them accept one client key.
``known_hosts`` lists every started host, so clients can (and must) check host keys strictly.
Used by the fixtures in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.netns import NetNamespace

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, for a server a test starts later (sshd, a hub, a broker).

    Taken below the kernel's ephemeral range where there is room: a port from that range is
    free only until the next socket that binds port 0 (every ZMQ kernel on the other test
    worker does), and a hub once lost its port that way ("Address already in use"). Below
    it, only a bind that names its port can take one: each is handed out once per process,
    and checked by a bind.
    """
    low = _EPHEMERAL_LOW
    if low >= 20000:
        for _ in range(200):
            port = random.randrange(low - 10000, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_stale_pyenv_lock(max_age: float = 30.0) -> None:
    """Remove pyenv's rehash lock if a killed login left it behind.

    Logins on the test hosts run ~/.bashrc, which on machines set up with pyenv runs
    `pyenv rehash`; a session killed mid-rehash (tests stop sshd on purpose) leaves the lock
    file, and from then on every login waits for it and prints an error on stderr. The lock is
    normally held for milliseconds, so one older than ``max_age`` seconds is stale.
    """
    lock = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser() / "shims" / ".pyenv-shim"
    try:
        if time.time() - lock.stat().st_mtime > max_age:
            lock.unlink()
    except OSError:
        pass


def keygen(path: Path) -> str:
    """Make an ed25519 key pair at ``path``; return the public key line."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True
    )
    return path.with_suffix(".pub").read_text().strip()


FENCE_COMMAND = f"{sys.executable} -m gpu_kernel fence --as-self"


@dataclass
class ClientKeys:
    """The one client key every test host accepts, and the known_hosts file for them; plus the
    broker's fencing key (``fence_key_file``), which runs only ``FENCE_COMMAND`` (the hosts run
    their kernels as the test's own user, so the fencing command acts as itself)."""

    dir: Path
    key_file: Path = field(init=False)
    public: str = field(init=False)
    known_hosts: Path = field(init=False)
    fence_key_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.key_file = self.dir / "id_ed25519"
        self.public = keygen(self.key_file)
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text("")
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.write_text(self.public + "\n")
        self.fence_key_file = self.forced_key("fence_ed25519", FENCE_COMMAND)

    def forced_key(self, name: str, command: str) -> Path:
        """A new key that the test hosts accept only to run ``command`` (sshd's forced command,
        with ``restrict``: no pty, no forwarding), as a fencing account's key is set up."""
        path = self.dir / name
        public = keygen(path)
        with self.authorized_keys.open("a") as f:
            f.write(f'restrict,command="{command}" {public}\n')
        return path


@dataclass
class TestHost:
    """One sshd on 127.0.0.1:``port`` with a host key of its own."""

    __test__ = False  # not a pytest test class

    name: str
    dir: Path
    keys: ClientKeys
    port: int = 0
    proc: subprocess.Popen | None = None
    netns: NetNamespace | None = None  # run sshd in this namespace, on its address
    runtime_root: Path | None = None  # default: <dir>/kernels (a shared one: an NFS home)
    # Hosts with real Unix users: who may log in, where each one's authorized_keys is (sshd's
    # %u pattern), extra sshd_config lines, and no shared runtime root (each user's home).
    users: tuple[str, ...] = ()
    authorized_keys_file: str | None = None
    extra_config: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key = self.dir / "ssh_host_ed25519_key"
        pub = keygen(self.host_key).split()
        self.host_key_line = f"{pub[0]} {pub[1]}"
        self.address = self.netns.address if self.netns else "127.0.0.1"
        self.port = self.port or (22 if self.netns else free_port())
        self.user = getpass.getuser()
        if not self.users:
            self.runtime_root = self.runtime_root or self.dir / "kernels"

    @property
    def known_hosts_line(self) -> str:
        where = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{where} {self.host_key_line}"

    def _write_config(self) -> Path:
        config = self.dir / "sshd_config"
        # A session killed mid-`pyenv rehash` (from ~/.bashrc) leaves a lock that makes every
        # later login wait 60 s; with PYENV_REHASH_TIMEOUT it waits 1 s at most. Each test host
        # keeps its kernels (and checkpoints) apart, as separate machines would.
        env = "SetEnv PYENV_REHASH_TIMEOUT=1"
        if self.runtime_root is not None:
            env += f" SHARED_GPU_RUNTIME_ROOT={self.runtime_root}"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.address}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys_file or self.keys.authorized_keys}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    *(self.extra_config or ["PermitRootLogin prohibit-password"]),
                    f"AllowUsers {' '.join(self.users or (self.user,))}",
                    "MaxSessions 64",
                    "MaxStartups 64",
                    "LogLevel ERROR",
                    env,
                    "",
                ]
            )
        )
        return config

    def start(self) -> None:
        """Start sshd (again, after ``stop``) and wait until it accepts connections."""
        clear_stale_pyenv_lock()
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = self._write_config()
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 - lives as long as the process
        argv = [SSHD, "-D", "-e", "-f", str(config)]
        if self.netns is not None:
            argv = self.netns.exec_argv(argv)
        self.proc = subprocess.Popen(argv, stderr=log, stdout=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()}")
            try:
                with socket.create_connection((self.address, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


def end_warm_interpreters(under: Path) -> None:
    """Stop the warm interpreters that launches on test hosts left under ``under`` (they would
    idle out a minute later; a test session ends them at once)."""
    needle = f"--host-dir\0{under}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"gpu_kernel\0warm\0" in cmdline and needle in cmdline:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGTERM)


def start_hosts(
    base: Path, keys: ClientKeys, names: list[str], **options: object
) -> list[TestHost]:
    """Start one sshd per name and add each host key to ``keys.known_hosts``; ``options``
    go to each ``TestHost`` (``netns`` takes a list, one namespace per host)."""
    hosts = []
    namespaces = options.pop("netns", None)
    for i, name in enumerate(names):
        extra = dict(options)
        if namespaces is not None:
            extra["netns"] = namespaces[i]  # type: ignore[index]
        host = TestHost(name=name, dir=base / name, keys=keys, **extra)  # type: ignore[arg-type]
        host.start()
        hosts.append(host)
    with keys.known_hosts.open("a") as f:
        for host in hosts:
            f.write(host.known_hosts_line + "\n")
    return hosts
