"""GPU hosts behind a network link the tests can take down: network namespaces with veth pairs.

``NetNamespace`` makes ``ip netns`` namespace with one veth pair (10.231.X.1 here, 10.231.X.2
there); ``TestHost(..., netns=ns)`` runs its sshd inside, listening on the namespace's address,
so everything that reaches that host (the provisioner's SSH connection and tunnels, the broker's
fencing) crosses the link, and ``link_down()`` is a real outage (``ip link set ... down``: the
route goes away, packets stop, nothing is reset) rather than a killed process. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess

IP = shutil.which("ip") or "/usr/sbin/ip"


def available() -> str | None:
    """None when namespaces can be made here, else why not (for a skip message)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists(IP):
        return "iproute2 (`ip`) is not installed"
    probe = f"sgpu-probe-{os.getpid()}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    argv = [IP, "netns", "exec", ns, IP, *args] if ns else [IP, *args]
    subprocess.run(argv, check=True, capture_output=True, text=True)


class NetNamespace:
    """One namespace and the veth pair that links it to this one."""

    def __init__(self, index: int) -> None:
        tag = f"{os.getpid() % 10000}{index}"
        self.name = f"sgpu-{tag}"
        self.host_if = f"sgh{tag}"[:15]
        self.ns_if = f"sgn{tag}"[:15]
        subnet = 100 + (os.getpid() * 7 + index) % 150
        self.host_ip = f"10.231.{subnet}.1"
        self.address = f"10.231.{subnet}.2"  # where the host's sshd listens

    def create(self) -> None:
        self.delete()
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("addr", "add", f"{self.address}/30", "dev", self.ns_if, ns=self.name)
        _ip("link", "set", self.ns_if, "up", ns=self.name)
        _ip("link", "set", "lo", "up", ns=self.name)

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return [IP, "netns", "exec", self.name, *argv]

    def link_down(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def link_up(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def delete(self) -> None:
        """Remove the namespace (and its veth pair); end whatever still runs in it."""
        pids = subprocess.run(
            [IP, "netns", "pids", self.name], capture_output=True, text=True
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run([IP, "netns", "del", self.name], capture_output=True)
        subprocess.run([IP, "link", "del", self.host_if], capture_output=True)
