"""Shared fixtures: real sshd test hosts on loopback and the client key they accept."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_kernel.ssh import HostTarget
from tests.pool import Pool
from tests.sshd import (
    ClientKeys,
    TestHost,
    clear_stale_pyenv_lock,
    end_warm_interpreters,
    start_hosts,
)


def target_for(host: TestHost, keys: ClientKeys, python: str = sys.executable) -> HostTarget:
    """A HostTarget that reaches ``host`` with strict host-key checking and the test key."""
    return HostTarget(
        name=host.name,
        address=host.address,
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


@pytest.fixture
def pool(
    tmp_path: Path, ssh_hosts: list[TestHost], client_keys: ClientKeys, monkeypatch
) -> Iterator[Pool]:
    """A running broker over the two sshd hosts (one "sim" slot each), a "Shared GPU" kernelspec
    pointing at it, and this test's Jupyter user holding a user token (SHARED_GPU_TOKEN)."""
    pool = Pool(tmp_path / "pool", ssh_hosts, client_keys)
    pool.start()
    pool.install_spec()
    monkeypatch.setenv("SHARED_GPU_TOKEN", pool.user_token)
    monkeypatch.setenv("SHARED_GPU_RUNTIME_ROOT", str(tmp_path / "kernels"))
    yield pool
    pool.close()


@pytest.fixture(scope="session", autouse=True)
def _no_warm_interpreters_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Warm interpreters started on the test hosts end with the test session."""
    yield
    end_warm_interpreters(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def _no_stale_pyenv_lock() -> None:
    """Logins on the test hosts must not wait on a lock a killed login left (see sshd.py)."""
    clear_stale_pyenv_lock()
