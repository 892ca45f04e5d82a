"""Shared fixtures: real sshd test hosts on loopback and the client key they accept."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_kernel.ssh import HostTarget
from tests.sshd import ClientKeys, TestHost, start_hosts


def target_for(host: TestHost, keys: ClientKeys, python: str = sys.executable) -> HostTarget:
    """A HostTarget that reaches ``host`` with strict host-key checking and the test key."""
    return HostTarget(
        name=host.name,
        address="127.0.0.1",
        port=host.port,
        user=host.user,
        key_file=str(keys.key_file),
        known_hosts_file=str(keys.known_hosts),
        python=python,
        connect_timeout=5.0,
    )


@pytest.fixture(scope="session")
def client_keys(tmp_path_factory: pytest.TempPathFactory) -> ClientKeys:
    """The one client key pair (and known_hosts file) shared by every test host."""
    return ClientKeys(tmp_path_factory.mktemp("ssh-client"))


@pytest.fixture(scope="session")
def ssh_hosts(
    tmp_path_factory: pytest.TempPathFactory, client_keys: ClientKeys
) -> Iterator[list[TestHost]]:
    """Two running sshd hosts, "hostA" and "hostB"; stopped at the end of the session."""
    base: Path = tmp_path_factory.mktemp("ssh-hosts")
    hosts = start_hosts(base, client_keys, ["hostA", "hostB"])
    yield hosts
    for host in hosts:
        host.stop()
