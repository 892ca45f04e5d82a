"""Fencing without a login as each user, with two real Unix users on a real sshd (issue 9).

The host runs kernels as ``sgtann`` and ``sgtben`` (made with ``useradd`` here, removed after);
the broker's key is in root's ``authorized_keys`` as ``restrict,command="... -m gpu_kernel
fence"`` and sshd has ``PermitRootLogin forced-commands-only``. That key opens no shell, runs no
other command, gets no pty and no forwarding, reads nobody's files, acts as the kernel's owner
only (never as root), and still fences both users' kernels: they save themselves first, the
checkpoint is theirs, and the broker records it for its owner. Needs root (CI runs as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from broker.client import BrokerClient
from broker.config.loader import parse_config
from broker.daemon import BrokerServer
from broker.http.auth import create_token
from broker.store.sqlite import Store
from gpu_kernel import remote
from gpu_kernel.protocol import SUSPENDED_EXIT_CODE
from gpu_kernel.ssh import HostTarget, SSHConnection, connect
from tests.sshd import ClientKeys, TestHost, keygen
from tests.test_launcher import make_request

USERS = ("sgtann", "sgtben")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class UserHost:
    host: TestHost
    keys: ClientKeys
    python: str  # an interpreter every test user can run, with this checkout on its path
    fence_key: Path
    homes: dict[str, Path]

    def target(self, user: str, key: Path | None = None) -> HostTarget:
        fence = key is not None
        return HostTarget(
            name=self.host.name,
            address="127.0.0.1",
            port=self.host.port,
            user=user,
            key_file=str(key or self.keys.key_file),
            known_hosts_file=str(self.keys.known_hosts),
            python=self.python,
            connect_timeout=5.0,
            nodelay_pty=not fence,
        )

    def fence_target(self) -> HostTarget:
        return self.target("root", self.fence_key)

    def launch(self, user: str) -> str:
        """A real kernel of ``user``, launched the way the provisioner does (as ``user``)."""
        request = make_request(
            Path("unused"),
            runtime_root=None,
            host_name=self.host.name,
            slot_id=f"{self.host.name}/0",
            owner=user,
        )
        target = self.target(user)
        with connect(target) as conn:
            remote.launch(conn, target, request)
        return request.kernel_id

    def runtime_dir(self, user: str, kernel_id: str) -> Path:
        base = self.homes[user] / ".local/share/jupyter-shared-gpu/kernels"
        return base / self.host.name / kernel_id


def _user_python(shared: Path) -> str | None:
    """A wrapper around a system interpreter of this Python's version (the virtualenv's may sit
    under a home the test users cannot enter), with this checkout and its packages on the path."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/bin:/usr/local/bin")
    if system is None:
        return None
    wrapper = shared / "python"
    paths = f"{ROOT}:{sysconfig.get_paths()['purelib']}"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={paths} exec {system} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _as(user: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["su", "-s", "/bin/sh", user, "-c", command], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def user_host() -> Iterator[UserHost]:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd (two real Unix users)")
    shared = Path(tempfile.mkdtemp(prefix="sg-fence-", dir="/tmp"))
    shared.chmod(0o755)
    homes = {}
    try:
        for user in USERS:
            subprocess.run(["userdel", "-r", "-f", user], capture_output=True)
            subprocess.run(
                # "*": no password, but not locked ("!"), which sshd without PAM refuses
                ["useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", user],
                check=True,
                capture_output=True,
            )
            homes[user] = Path(os.path.expanduser(f"~{user}"))
        python = _user_python(shared)
        if python is None or _as(USERS[0], f"{python} -c 'import gpu_kernel'").returncode:
            pytest.skip("no interpreter the test users can run this checkout with")
        (shared / "client").mkdir(mode=0o700)
        keys = ClientKeys(shared / "client")
        fence_key = shared / "client" / "broker_fence_ed25519"
        fence_public = keygen(fence_key)
        # each user's own authorized_keys (sshd reads it as that user): the client key for the
        # users, the fencing key with its forced command for root
        for user in USERS:
            path = shared / "keys" / user / "authorized_keys"
            path.parent.mkdir(parents=True)
            path.write_text(keys.public + "\n")
            path.parent.chmod(0o755)
            path.chmod(0o644)
        root_keys = shared / "keys" / "root" / "authorized_keys"
        root_keys.parent.mkdir(parents=True)
        root_keys.write_text(f'restrict,command="{python} -m gpu_kernel fence" {fence_public}\n')
        (shared / "keys").chmod(0o755)
        host = TestHost(
            name="hostU",
            dir=shared / "host",
            keys=keys,
            users=("root", *USERS),
            authorized_keys_file=str(shared / "keys" / "%u" / "authorized_keys"),
            extra_config=("PermitRootLogin forced-commands-only",),
        )
        host.start()
        keys.known_hosts.write_text(host.known_hosts_line + "\n")
        yield UserHost(host, keys, python, fence_key, homes)
        host.stop()
    finally:
        for user in USERS:
            subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
            subprocess.run(["userdel", "-r", "-f", user], capture_output=True)
        shutil.rmtree(shared, ignore_errors=True)


def fence_run(uh: UserHost, *words: str) -> tuple[int, str]:
    target = uh.fence_target()
    with connect(target) as conn:
        result = conn.run(list(words), timeout=60)
    return result.returncode, result.stdout.decode() + result.stderr.decode()


def test_the_fencing_key_opens_no_shell_and_reads_no_files(user_host: UserHost) -> None:
    uh = user_host
    kernel = uh.launch("sgtann")
    secret = uh.runtime_dir("sgtann", kernel) / "connection.json"
    for words in (["id"], ["sh", "-c", "id"], ["cat", str(secret)], ["bash", "-i"]):
        code, out = fence_run(uh, *words)
        assert code == 1 and '"ok": false' in out and "uid=" not in out, (words, out)
        assert '"key"' not in out
    target = uh.fence_target()
    with connect(target) as conn:
        assert isinstance(conn, SSHConnection)
        transport = conn._transport
        shell = transport.open_session(timeout=5)  # an interactive shell: the command runs
        shell.invoke_shell()
        shell.sendall(b"id; cat /etc/shadow\n")
        out = b""
        deadline = time.monotonic() + 10
        while not shell.exit_status_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        while shell.recv_ready():
            out += shell.recv(65536)
        assert b"no shell" in out and b"uid=" not in out and b"root:" not in out
        with pytest.raises(paramiko.SSHException):
            transport.open_session(timeout=5).get_pty()  # restrict: no pty
        with pytest.raises(paramiko.ChannelException):  # restrict: no forwarding
            transport.open_channel("direct-tcpip", ("127.0.0.1", uh.host.port), ("127.0.0.1", 0))
    # root itself and system accounts: refused, nothing looked at
    code, out = fence_run(uh, "status", uh.host.name, kernel, "root")
    assert code == 1 and "system_user" in out
    code, out = fence_run(uh, "fence", uh.host.name, kernel, "daemon", "1")
    assert code == 1 and "system_user" in out
    # naming the other user: the command acts as sgtben and finds nothing of sgtann's
    code, out = fence_run(uh, "fence", uh.host.name, kernel, "sgtben", "1")
    assert code == 0 and '"found":false' in out
    code, out = fence_run(uh, "status", uh.host.name, kernel, "sgtann")
    assert code == 0 and '"alive":true' in out  # untouched
    fence_run(uh, "cleanup", uh.host.name, kernel, "sgtann")
    assert not uh.runtime_dir("sgtann", kernel).exists()


def test_fencing_still_ends_both_users_kernels(user_host: UserHost) -> None:
    uh = user_host
    for user in USERS:
        kernel = uh.launch(user)
        code, out = fence_run(uh, "fence", uh.host.name, kernel, user, "30")
        assert code == 0 and '"alive":false' in out and f'"exit_code":{SUSPENDED_EXIT_CODE}' in out
        checkpoint = uh.runtime_dir(user, kernel) / "checkpoint"
        assert (checkpoint / "manifest.json").is_file()
        owner = uh.homes[user].stat().st_uid
        assert all(f.stat().st_uid == owner for f in checkpoint.rglob("*"))  # made as the user
        code, _ = fence_run(uh, "cleanup", uh.host.name, kernel, user)
        assert code == 0 and not checkpoint.exists()


def test_the_broker_fences_through_the_forced_command_and_keeps_the_save(
    user_host: UserHost, tmp_path: Path
) -> None:
    uh = user_host
    config = parse_config(
        f"""
[server]
host = "127.0.0.1"
port = 0
database = "{tmp_path / "broker.sqlite"}"
[policy]
heartbeat_interval = "0.2s"
heartbeat_timeout = "1s"
[[hosts]]
name = "{uh.host.name}"
address = "127.0.0.1"
port = {uh.host.port}
known_hosts = "{uh.keys.known_hosts}"
python = "{uh.python}"
fence_user = "root"
fence_key_file = "{uh.fence_key}"
[[hosts.slots]]
kind = "sim"
simulated = true
count = 1
""",
        tmp_path / "broker.toml",
    )
    store = Store(config.server.database)
    token = create_token(store, "sgtben")[0]
    store.close()
    server = BrokerServer(config, port=0, tick_interval=0.05)
    client = BrokerClient(server.start_in_thread(), token)
    try:
        kernel = uh.launch("sgtben")
        lease = client.request_lease("sim", kernel)  # then no heartbeats: its Jupyter died
        deadline = time.monotonic() + 30
        while not client.checkpoints(kernel):
            assert time.monotonic() < deadline, client.status()
            time.sleep(0.1)
        (row,) = client.checkpoints(kernel)
        assert row["user"] == "sgtben" and row["state"] == "kept"
        assert row["path"] == str(uh.runtime_dir("sgtben", kernel) / "checkpoint")
        assert client.get_lease(lease.id).state == "expired"
        assert (uh.runtime_dir("sgtben", kernel) / "exit_code").read_text().strip() == "75"
        assert client.status()["slots"][0]["state"] == "free"
        fence_run(uh, "cleanup", uh.host.name, kernel, "sgtben")
    finally:
        client.close()
        server.stop_thread()
