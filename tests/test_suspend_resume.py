"""Suspend an idle Shared GPU kernel, resume it on the next cell: real broker, sshd hosts, torch.

The broker here suspends a kernel idle for 2 s. Each test drives jupyter_client's KernelManager
as a Jupyter server does and checks what a notebook user would see.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking import BlockingKernelClient

from broker.client import BrokerClient
from gpu_kernel.checkpoint import blob_store
from tests.pool import Pool, shut_down, vanish
from tests.sshd import ClientKeys, TestHost

STATE = r"""
import math, json
import numpy as np, pandas as pd, torch
from collections import OrderedDict
n, s, xs, d = 42, "héllo", [1, 2.5, "x", None], {"k": (1, 2), "n": {"deep": [3]}}
arr = np.arange(12, dtype=np.float32).reshape(3, 4)
df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
def area(r): return math.pi * r * r * scale
scale = 2
square = lambda v: v * v
class Point:
    def __init__(self, x, y): self.x, self.y = x, y
    def norm(self): return (self.x ** 2 + self.y ** 2) ** 0.5
p = Point(3, 4)
torch.manual_seed(0)
t = torch.randn(64, 32)
view = t[:8]
model = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loss = model(t).pow(2).mean(); loss.backward(); opt.step()
"""

FINGERPRINT = r"""
print(json.dumps({
    "n": n, "s": s, "xs": xs, "d": str(d), "arr": arr.tolist(), "df": df.to_dict(),
    "area": area(1.5), "square": square(7), "p": [type(p).__name__, p.norm()],
    "t": float(t.sum()),
    "view_shares": view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr(),
    "model": float(model(t).sum()),
    "opt_refs_model": all(
        q is r for q, r in zip(opt.param_groups[0]["params"], model.parameters())
    ),
    "momentum": float(sum(v["momentum_buffer"].sum() for v in opt.state.values())),
}, sort_keys=True))
"""


@pytest.fixture
def make_idle_pool(
    tmp_path: Path, ssh_hosts: list[TestHost], client_keys: ClientKeys, monkeypatch
) -> Iterator[Callable[..., Pool]]:
    """Start a pool like ``pool``'s whose broker suspends kernels idle for 2 s (more policy
    keys as keyword arguments); stopped at the end of the test."""
    pools: list[Pool] = []

    def make(**policy: str) -> Pool:
        pool = Pool(
            tmp_path / f"pool{len(pools)}",
            ssh_hosts,
            client_keys,
            idle_suspend_after="2s",
            idle_suspend_when_queued="2s",
            **policy,
        )
        pools.append(pool)
        pool.start()
        pool.install_spec()
        monkeypatch.setenv("SHARED_GPU_TOKEN", pool.user_token)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def idle_pool(make_idle_pool: Callable[..., Pool]) -> Pool:
    """Like ``pool``, but the broker suspends kernels idle for 2 s."""
    return make_idle_pool()


def started(pool: Pool) -> Iterator[tuple]:
    """One kernel on ``pool`` (which shuts it down at the end of the test)."""
    km, kc = pool.start_kernel()
    yield km, kc
    kc.stop_channels()


@pytest.fixture
def kernel(idle_pool: Pool):
    """A Shared GPU kernel the broker suspends after 2 s idle."""
    yield from started(idle_pool)


@pytest.fixture
def busy_kernel(pool: Pool):
    """A Shared GPU kernel that is never suspended for idleness."""
    yield from started(pool)


def run(kc: BlockingKernelClient, code: str, timeout: float = 90) -> tuple[dict, str]:
    """Execute; return the reply content and everything the cell printed (stdout)."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out)


def wait_suspended(pool: Pool, kernel_id: str, timeout: float = 40) -> dict:
    """Until the broker lists the kernel's checkpoint and no slot is held for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = pool.status()
        held = [
            lease
            for lease in status["leases"]
            if lease["kernel_id"] == kernel_id and lease["state"] == "granted"
        ]
        kept = [c for c in status.get("checkpoints", []) if c["kernel_id"] == kernel_id]
        if kept and not held:
            return kept[0]
        time.sleep(0.3)
    raise AssertionError(f"kernel {kernel_id} was not suspended within {timeout}s")


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_idle_kernel_frees_its_slot_and_resumes_elsewhere_with_every_variable(idle_pool, kernel):
    km, kc = kernel
    content, _ = run(kc, STATE)
    assert content["status"] == "ok"
    before = last_line(run(kc, FINGERPRINT)[1])
    first_host = last_line(run(kc, "import os; print(os.environ['SHARED_GPU_HOST'])")[1])
    count_before = run(kc, "1")[0]["execution_count"]

    checkpoint = wait_suspended(idle_pool, km.kernel_id)
    assert checkpoint["host"] == first_host and checkpoint["bytes"] > 0
    assert not any(idle_pool.slot_users().values()), "the suspended kernel still holds a slot"
    assert km.is_alive(), "Jupyter must still see the kernel alive"
    # the CLI shows it too
    table = idle_pool.cli("status", "--url", idle_pool.url, token=idle_pool.admin_token).stdout
    assert km.kernel_id[:8] in table or "suspended" in table

    # someone else takes the slot on the kernel's host
    other = BrokerClient(idle_pool.url, idle_pool.token("someone-else"))
    taken = other.request_lease("sim", "other-kernel")
    assert taken.state == "granted" and taken.host.name == first_host

    content, printed = run(kc, FINGERPRINT)
    assert content["status"] == "ok"
    assert content["execution_count"] == count_before + 1  # the counter goes on
    assert "Resumed on" in printed and "restored" in printed
    second_host = last_line(run(kc, "import os; print(os.environ['SHARED_GPU_HOST'])")[1])
    assert second_host != first_host
    assert last_line(printed) == before  # every variable came back equal
    other.release(taken.id)


def test_unsaveable_objects_are_named_and_the_rest_comes_back(idle_pool, kernel):
    km, kc = kernel
    run(kc, "f = open('/dev/null'); g = (i for i in range(3)); keep = [1, 2, 3]")
    wait_suspended(idle_pool, km.kernel_id)
    content, printed = run(kc, "print(sum(keep)); print('f' in dir(), 'g' in dir())")
    assert content["status"] == "ok"
    assert "6" in printed.splitlines()
    assert "False False" in printed
    assert "f: open file (io.TextIOWrapper) cannot be saved" in printed
    assert "g: generator cannot be saved" in printed


def test_a_tampered_checkpoint_is_refused_with_a_clear_message(idle_pool, kernel):
    km, kc = kernel
    run(kc, "secret = 'x' * 1000")
    checkpoint = wait_suspended(idle_pool, km.kernel_id)
    body = json.loads((Path(checkpoint["path"]) / "manifest.json").read_bytes())["manifest"]
    store = blob_store(Path(checkpoint["path"]), body["store"])  # the owner's blobs on that host
    digest, _ = max(body["blobs"], key=lambda b: b[1])
    victim = store.path(digest)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    content, _ = run(kc, "print(secret)")
    assert content["status"] == "error" and content["ename"] == "ResumeFailed"
    assert "integrity" in content["evalue"]
    assert not any(idle_pool.slot_users().values()), "a refused resume must give its slot back"


def test_interrupt_restart_and_shutdown_while_suspended(idle_pool, kernel):
    km, kc = kernel
    run(kc, "kept = 1")
    checkpoint = wait_suspended(idle_pool, km.kernel_id)
    km.interrupt_kernel()  # nothing runs: harmless
    assert km.is_alive()
    km.restart_kernel()
    kc.wait_for_ready(timeout=30)
    content, _ = run(kc, "kept")
    assert content["status"] == "error" and content["ename"] == "NameError"  # fresh kernel
    assert not Path(checkpoint["path"]).exists(), "restart must drop the saved state"

    run(kc, "again = 2")
    checkpoint = wait_suspended(idle_pool, km.kernel_id)
    kc.stop_channels()
    shut_down(km)
    assert not Path(checkpoint["path"]).exists(), "shutdown must delete the checkpoint"
    status = idle_pool.status()
    assert not [c for c in status.get("checkpoints", []) if c["kernel_id"] == km.kernel_id]
    assert not any(idle_pool.slot_users().values())


def test_a_cut_ssh_connection_loses_nothing(busy_kernel):
    km, kc = busy_kernel
    run(kc, "state = {'a': 1}")
    session = km.provisioner.session
    dead = session.link.connection
    dead._transport.sock.shutdown(2)  # the TCP connection dies under us
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        conn = session.link.connection
        if conn is not None and conn is not dead and conn.is_alive():
            break
        time.sleep(0.05)
    assert session.link.connection is not dead, "the provisioner did not reconnect"
    content, printed = run(kc, "state['a'] += 1; print(state)", timeout=60)
    assert content["status"] == "ok"
    assert "{'a': 2}" in printed


def test_a_kernel_whose_jupyter_server_vanished_saves_itself_and_frees_its_slot(
    idle_pool: Pool,
):
    idle_pool.install_spec(orphan_grace="3s")
    km, kc = idle_pool.start_kernel()
    run(kc, "precious = 41 + 1")
    pid = int(last_line(run(kc, "import os; print(os.getpid())")[1]))
    # the Jupyter server dies: no more heartbeats, no more proxy, no more SSH connection
    vanish(km.provisioner.session)
    km.provisioner.session = None
    kc.stop_channels()

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.5)
    assert not os.path.exists(f"/proc/{pid}"), "the orphaned kernel kept running"
    saved = [
        path
        for host in idle_pool.hosts
        for path in host.runtime_root.glob(f"{host.name}/{km.kernel_id}/checkpoint/manifest.json")
    ]
    assert saved, "the orphaned kernel did not save its state"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(idle_pool.slot_users().values()):
        time.sleep(0.5)
    assert not any(idle_pool.slot_users().values()), "the orphan's slot was not freed"
    # freeing the slot fenced the kernel's host: what the kernel saved there is still there
    assert all(path.exists() for path in saved), "fencing deleted the orphan's checkpoint"


def test_a_shared_checkpoint_dir_resumes_elsewhere_without_a_copy(tmp_path: Path, make_idle_pool):
    shared = tmp_path / "shared-checkpoints"  # both test hosts see this path, as an NFS mount
    pool = make_idle_pool(checkpoint_dir=str(shared))
    for km, kc in started(pool):
        run(kc, "kept = {'x': [1, 2, 3]}")
        first = last_line(run(kc, "import os; print(os.environ['SHARED_GPU_HOST'])")[1])
        checkpoint = wait_suspended(pool, km.kernel_id)
        assert checkpoint["path"].startswith(str(shared))
        other = BrokerClient(pool.url, pool.token("someone-else"))
        taken = other.request_lease("sim", "other-kernel")
        assert taken.host.name == first
        content, printed = run(kc, "print(kept, os.environ['SHARED_GPU_HOST'])")
        assert content["status"] == "ok"
        assert "Copying" not in printed  # every host reads the shared directory
        assert last_line(printed).startswith("{'x': [1, 2, 3]}")
        assert not last_line(printed).endswith(first)
        assert not Path(checkpoint["path"]).exists()  # consumed by the resume
        other.release(taken.id)


def test_an_expired_checkpoint_is_explained_on_the_next_cell(make_idle_pool):
    pool = make_idle_pool(checkpoint_max_age="3s")
    for km, kc in started(pool):
        run(kc, "kept = 1")
        checkpoint = wait_suspended(pool, km.kernel_id)
        me = BrokerClient(pool.url, pool.user_token)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if me.checkpoints(km.kernel_id)[0]["state"] == "expired":
                break
            time.sleep(0.3)
        assert me.checkpoints(km.kernel_id)[0]["state"] == "expired"
        assert not Path(checkpoint["path"]).exists(), "the broker did not delete it"
        content, _ = run(kc, "kept")
        assert content["status"] == "error" and content["ename"] == "ResumeFailed"
        assert "expired after 3s and was deleted" in content["evalue"]
        assert "restart the kernel" in content["evalue"]


def test_hosts_sharing_a_home_directory_keep_a_resumed_kernel_alive(
    tmp_path: Path, client_keys: ClientKeys, monkeypatch
):
    """Two hosts with one runtime root (an NFS home): resuming on the other host and cleaning
    up the one it left must not touch the resumed kernel (its files are that host's own)."""
    from tests.sshd import start_hosts

    shared = tmp_path / "nfs-home-kernels"
    hosts = start_hosts(tmp_path / "hosts", client_keys, ["nfsA", "nfsB"], runtime_root=shared)
    pool = Pool(tmp_path / "pool", hosts, client_keys)
    try:
        pool.start()
        pool.install_spec()
        monkeypatch.setenv("SHARED_GPU_TOKEN", pool.user_token)
        km, kc = pool.start_kernel()
        run(kc, "kept = [1, 2, 3]")
        first = last_line(run(kc, "import os; print(os.environ['SHARED_GPU_HOST'])")[1])
        session = km.provisioner.session
        assert session.request_suspend("test")
        wait_suspended(pool, km.kernel_id)
        other = BrokerClient(pool.url, pool.token("someone-else"))
        taken = other.request_lease("sim", "other-kernel")
        assert taken.host.name == first
        content, printed = run(kc, "print(sum(kept), os.environ['SHARED_GPU_HOST'], os.getpid())")
        assert content["status"] == "ok" and "Copying the saved state" in printed
        total, host, pid = last_line(printed).split()
        assert total == "6" and host != first
        old = shared / first / km.kernel_id
        deadline = time.monotonic() + 30  # the old host's clean-up follows the resume
        while old.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not old.exists(), "the old host's files stayed"
        assert os.path.exists(f"/proc/{pid}"), "cleaning up the old host killed the new kernel"
        assert last_line(run(kc, "print(len(kept))")[1]) == "3"
        assert (shared / host / km.kernel_id / "connection.json").exists()
        other.release(taken.id)
    finally:
        pool.close()
        for host in hosts:
            host.stop()
