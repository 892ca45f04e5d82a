"""Expiry and fencing with a real sshd: the broker kills an expired lease's kernel over SSH before
it grants the slot again; with the sshd stopped the slot stays "unreachable" until the host
answers again or an admin resets it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.client import BrokerClient
from broker.config.loader import load_config
from broker.daemon import BrokerServer
from broker.http.auth import create_token
from broker.store.sqlite import Store
from gpu_kernel import remote
from gpu_kernel.ssh import HostTarget, connect
from tests.conftest import target_for
from tests.sshd import ClientKeys, TestHost, start_hosts
from tests.test_launcher import make_request


@pytest.fixture
def fence_host(tmp_path: Path, client_keys: ClientKeys) -> Iterator[TestHost]:
    """An sshd of this test's own (the test stops and starts it)."""
    (host,) = start_hosts(tmp_path / "hosts", client_keys, ["hostF"])
    yield host
    host.stop()


def config(host: TestHost, keys: ClientKeys) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0
database = "broker.sqlite"
[policy]
heartbeat_interval = "0.1s"
heartbeat_timeout = "1s"
fence_retry = "0.3s"
[[hosts]]
name = "{host.name}"
address = "127.0.0.1"
port = {host.port}
user = "{host.user}"
key_file = "{keys.key_file}"
known_hosts = "{keys.known_hosts}"
python = "{sys.executable}"
fence_user = "{host.user}"
fence_key_file = "{keys.fence_key_file}"
[[hosts.slots]]
id = "f/0"
device = "0"
kind = "sim"
simulated = true
"""


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def launch(target: HostTarget) -> str:
    """Start a real kernel on the host (default runtime root there); return its id."""
    request = make_request(
        Path("unused"),
        runtime_root=None,
        host_name=target.name,
        slot_id=f"{target.name}/0",
        owner=target.user,  # the broker user who leases it (the test's user)
    )
    with connect(target) as conn:
        remote.launch(conn, target, request)
    return request.kernel_id


def alive(target: HostTarget, kernel_id: str) -> bool:
    with connect(target) as conn:
        return remote.status(conn, target, kernel_id).alive


def test_expired_lease_is_fenced_and_unreachable_host_keeps_slot_out(
    tmp_path: Path, fence_host: TestHost, client_keys: ClientKeys
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(config(fence_host, client_keys))
    store = Store(load_config(path).server.database)
    user, admin = create_token(store, fence_host.user)[0], create_token(store, "root", "admin")[0]
    store.close()
    server = BrokerServer(load_config(path), port=0, tick_interval=0.05)
    url = server.start_in_thread()
    target = target_for(fence_host, client_keys)
    me, root = BrokerClient(url, user), BrokerClient(url, admin)
    kernels: list[str] = []

    def slot_state() -> str:
        return root.status()["slots"][0]["state"]

    try:
        # 1. a lease without heartbeats expires; its kernel is killed over SSH; slot free again
        kernels.append(launch(target))
        lease = me.request_lease("sim", kernels[-1])
        assert lease.state == "granted" and alive(target, kernels[-1])
        wait_for(lambda: me.get_lease(lease.id).state == "expired")
        wait_for(lambda: slot_state() == "free")
        assert not alive(target, kernels[-1])
        # 2. sshd stopped: fencing fails, the slot stays out of the pool ...
        kernels.append(launch(target))
        lease = me.request_lease("sim", kernels[-1])
        fence_host.stop()
        wait_for(lambda: slot_state() == "unreachable")
        waiting = me.request_lease("sim", "next-kernel")
        assert waiting.state == "queued"
        time.sleep(0.8)  # several fence retries, all failing
        assert slot_state() == "unreachable"
        assert me.get_lease(waiting.id).state == "queued"
        assert "gpu_broker_fencing_failures_total 0" not in root.metrics()
        # ... until the host answers again: the kernel is killed, the queued request granted
        fence_host.start()
        wait_for(lambda: me.get_lease(waiting.id).state == "granted")
        # released at once: it sends no heartbeats and would expire (and be fenced) after 1 s
        me.release(waiting.id)  # a release needs no fencing: the holder says the kernel is gone
        assert slot_state() == "free"
        assert not alive(target, kernels[-1])
        # 3. or until an admin resets the slot
        lease = me.request_lease("sim", "k2")
        fence_host.stop()
        wait_for(lambda: me.get_lease(lease.id).state == "expired")
        wait_for(lambda: slot_state() == "unreachable")
        assert root.reset_slot("f/0")["state"] == "free"
        assert me.request_lease("sim", "k3").state == "granted"
    finally:
        if fence_host.proc is None:
            fence_host.start()
        for kernel_id in kernels:
            with connect(target) as conn:
                remote.cleanup(conn, target, kernel_id)
        me.close()
        root.close()
        server.stop_thread()
