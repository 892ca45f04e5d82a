"""A whole pool for end-to-end tests: a real broker process, real sshd hosts, a kernelspec.

``Pool`` writes a broker config for the given test hosts, starts ``gpu-broker serve`` as a
subprocess, creates tokens with the CLI, and installs "Shared GPU" kernelspecs in a temporary
Jupyter data dir. Used by the end-to-end tests through the ``pool`` fixture in conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from tests.sshd import ClientKeys, TestHost, free_port, start_hosts

BIN = Path(sys.executable).parent


def broker_config(port: int, hosts: list[TestHost], keys: ClientKeys, **policy: str) -> str:
    """TOML for a broker on ``port`` whose pool is one simulated slot per test host."""
    lines = [
        "[server]",
        f'listen = "127.0.0.1:{port}"',
        'database = "broker.sqlite"',
        "",
        "[policy]",
        *(
            f'{key} = "{value}"'
            for key, value in {
                "heartbeat_interval": "1s",
                "heartbeat_timeout": "10s",
                "idle_suspend_after": "1h",
                "idle_suspend_when_queued": "1h",
                **policy,
            }.items()
        ),
    ]
    for index, host in enumerate(hosts):
        lines += ["", *host_table(host, keys), f'  device = "{index}"', "  simulated = true"]
    return "\n".join(lines) + "\n"


def host_table(host: TestHost, keys: ClientKeys) -> list[str]:
    """The ``[[hosts]]`` table of a test host, through to the start of its one
    ``[[hosts.slots]]`` of kind "sim" (the caller adds the slot's other keys)."""
    return [
        "[[hosts]]",
        f'name = "{host.name}"',
        f'address = "{host.address}"',
        f"port = {host.port}",
        f'user = "{host.user}"',
        f'key_file = "{keys.key_file}"',
        f'known_hosts = "{keys.known_hosts}"',
        f'python = "{sys.executable}"',
        f'fence_user = "{host.user}"',
        f'fence_key_file = "{keys.fence_key_file}"',
        "  [[hosts.slots]]",
        '  kind = "sim"',
    ]


def loopback_pool(base: Path, names: list[str], **policy: str) -> tuple[list[TestHost], Pool]:
    """sshd hosts ``names`` on loopback (their keys trusted) and a ``Pool`` over them, all under
    ``base``; for the benches (the tests build theirs from fixtures). Start the pool, stop it
    and the hosts when done."""
    (base / "keys").mkdir()
    keys = ClientKeys(base / "keys")
    hosts = start_hosts(base / "hosts", keys, names)
    return hosts, Pool(base / "pool", hosts, keys, **policy)


def shut_down(km: KernelManager, timeout: float = 15.0) -> None:
    """Shut the kernel down as Jupyter does, then wait for the session's clean-up on the hosts
    and at the broker (it runs after Jupyter has its answer)."""
    session = getattr(km.provisioner, "session", None)
    km.shutdown_kernel()
    if session is not None:
        assert session.closed.wait(timeout), "the kernel's clean-up did not finish"


def vanish(session) -> None:
    """As if the Jupyter server process died: the session's heartbeats, proxy and SSH
    connection vanish, without a shutdown; the lease and the kernel on its host stay."""
    session.keeper.close()
    session.link.close()
    session.proxy.close()


class Pool:
    """A running broker over some test hosts, and kernelspecs that point at it."""

    def __init__(self, base: Path, hosts: list[TestHost], keys: ClientKeys, **policy: str) -> None:
        self.base = base
        self.hosts = hosts
        self.keys = keys
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        self.config = base / "broker.toml"
        self.config.write_text(broker_config(self.port, hosts, keys, **policy))
        self.proc: subprocess.Popen | None = None
        self.kernels_dir = base / "jupyter" / "kernels"
        self.admin_token = ""
        self.user_token = ""
        self.managers: list[KernelManager] = []  # kernels start_kernel started

    def cli(
        self, *args: str, token: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("SHARED_GPU_TOKEN", None)
        if token is not None:
            env["SHARED_GPU_TOKEN"] = token
        return subprocess.run(
            [str(BIN / "gpu-broker"), *args], capture_output=True, text=True, env=env, check=check
        )

    def start(self) -> None:
        log = open(self.base / "broker.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [str(BIN / "gpu-broker"), "serve", "--config", str(self.config)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.base / "broker.log").read_text())
            try:
                urllib.request.urlopen(self.url + "/api/v1/whoami", timeout=1)
            except urllib.error.HTTPError:
                break  # 401: it is up
            except OSError:
                time.sleep(0.1)
        if not self.admin_token:
            self.admin_token = self.token("admin", role="admin")
            self.user_token = self.token(os.environ.get("USER", "tester") or "tester")

    def token(self, user: str, role: str = "user") -> str:
        out = self.cli(
            "token", "create", "--config", str(self.config), "--user", user, "--role", role
        )
        return out.stdout.strip().split()[-1]

    def start_kernel(self, name: str = "shared-gpu") -> tuple[KernelManager, BlockingKernelClient]:
        """Start a kernel of kernelspec ``name`` and a client that has seen it ready;
        ``close`` shuts it down if the test did not."""
        km = self.kernel_manager(name)
        self.managers.append(km)
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        return km, kc

    def close(self) -> None:
        """Shut down the kernels still running, wait for their clean-up, stop the broker."""
        sessions = []
        for km in self.managers:
            if km.has_kernel:
                sessions.append(getattr(km.provisioner, "session", None))
                km.shutdown_kernel(now=True)
        for session in sessions:
            if session is not None:
                session.closed.wait(15)
        self.stop()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def status(self) -> dict:
        return json.loads(
            self.cli("status", "--json", "--url", self.url, token=self.admin_token).stdout
        )

    def queued(self) -> int:
        """How many lease requests wait in the broker's queue."""
        return sum(1 for lease in self.status()["leases"] if lease["state"] == "queued")

    def slot_users(self) -> dict[str, str | None]:
        """slot id -> user holding it (None when free), from `gpu-broker status --json`."""
        status = self.status()
        holders = {slot["id"]: None for slot in status["slots"]}
        for lease in status["leases"]:
            if lease["state"] == "granted" and lease.get("slot"):
                holders[lease["slot"]["id"]] = lease["user"]
        return holders

    def install_spec(self, name: str = "shared-gpu", **config: str) -> None:
        args = [
            "install",
            "--prefix",
            str(self.base / "prefix"),
            "--name",
            name,
            "--broker-url",
            config.pop("broker_url", self.url),
            "--lease-timeout",
            config.pop("lease_timeout", "60s"),
            # warm interpreters on the test hosts, without torch preloaded (each would hold
            # ~400 MB and seconds of CPU) and gone a minute after the tests
            "--warm",
            config.pop("warm", "60s"),
            "--warm-preload",
            config.pop("warm_preload", ""),
        ]
        for key, value in config.items():
            args += [f"--{key.replace('_', '-')}", value]
        from provisioner.install import main

        assert main(args) == 0
        self.kernels_dir = self.base / "prefix" / "share" / "jupyter" / "kernels"

    def kernel_manager(self, name: str = "shared-gpu") -> KernelManager:
        ksm = KernelSpecManager(kernel_dirs=[str(self.kernels_dir)])
        return KernelManager(kernel_name=name, kernel_spec_manager=ksm)
