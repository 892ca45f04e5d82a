"""Faults a kernel session must survive, on loopback sshd hosts (``test_faults_link.py`` cuts real
network links). Each test drives jupyter_client's KernelManager as a Jupyter server does, injects
one fault, and asserts what a user would notice: what the cell says, that no variable is lost,
that Jupyter's calls are answered promptly; and, throughout, that no slot ever has two live
kernels (``SlotChecker``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from broker.client import BrokerClient
from provisioner import saved_state
from provisioner.session_state import Phase
from tests.faults import SlotChecker, report, run, slow_load, slow_save, wait_until
from tests.pool import Pool
from tests.sshd import ClientKeys, TestHost, start_hosts


@pytest.fixture
def checker(ssh_hosts: list[TestHost]) -> Iterator[SlotChecker]:
    with SlotChecker([host.runtime_root for host in ssh_hosts]) as c:
        yield c
    assert c.samples > 0
    assert not c.violations, c.violations


@pytest.fixture
def fault_pool(
    tmp_path: Path, ssh_hosts: list[TestHost], client_keys: ClientKeys, monkeypatch
) -> Iterator[Pool]:
    """A pool whose leases expire after 3 s without heartbeats (heartbeats every 0.5 s)."""
    pool = Pool(
        tmp_path / "pool",
        ssh_hosts,
        client_keys,
        heartbeat_interval="500ms",
        heartbeat_timeout="3s",
    )
    pool.start()
    pool.install_spec(link_timeout="2s")
    monkeypatch.setenv("SHARED_GPU_TOKEN", pool.user_token)
    yield pool
    pool.close()


def phase_of(km) -> Phase:
    return km.provisioner.session.phase


def test_a_save_and_a_copy_longer_than_the_heartbeat_timeout_lose_nothing(
    fault_pool: Pool, checker: SlotChecker, tmp_path: Path
):
    """Heartbeats go on while the kernel saves (4 s) and while the checkpoint is copied (a
    destination that takes 4 s to start): neither lease expires, every variable comes back."""
    slow_python = tmp_path / "slow-import-python"
    slow_python.write_text(
        f'#!/bin/sh\ncase "$*" in *import-checkpoint*) sleep 4;; esac\nexec {sys.executable} "$@"\n'
    )
    slow_python.chmod(0o755)
    config = fault_pool.config.read_text()
    fault_pool.config.write_text(
        config.replace(f'python = "{sys.executable}"', f'python = "{slow_python}"')
    )
    fault_pool.stop()
    fault_pool.start()
    km, kc = fault_pool.start_kernel()
    content, _, _ = run(kc, slow_save(4) + "kept = list(range(10))")
    assert content["status"] == "ok"
    first = run(kc, "import os; print(os.environ['SHARED_GPU_HOST'])")[1].strip()
    session = km.provisioner.session
    lease_id = session.lease.id
    assert session.request_suspend("test")
    wait_until(lambda: phase_of(km) is Phase.SUSPENDED, 30, "the suspend")
    me = BrokerClient(fault_pool.url, fault_pool.user_token)
    assert me.get_lease(lease_id).end_reason != "expired"
    other = BrokerClient(fault_pool.url, fault_pool.token("someone-else"))
    taken = other.request_lease("sim", "other-kernel")
    assert taken.host.name == first  # the resume must copy to the other host
    started = time.monotonic()
    content, out, _ = run(kc, "print(sum(kept), slow.seconds, os.environ['SHARED_GPU_HOST'])")
    assert content["status"] == "ok", content
    report(
        "a save (4 s) and a copy (4 s) longer than the heartbeat timeout (3 s)",
        "no lease expired; every variable back on the other host",
        time.monotonic() - started,
    )
    assert "Copying the saved state" in out
    assert out.strip().splitlines()[-1] != f"45 4 {first}"
    assert out.strip().splitlines()[-1].startswith("45 4 ")
    new_lease = session.lease
    assert me.get_lease(new_lease.id).state == "granted"
    other.release(taken.id)


def test_a_failed_first_reconnect_is_retried_until_the_host_is_back(
    fault_pool: Pool, checker: SlotChecker
):
    km, kc = fault_pool.start_kernel()
    run(kc, "state = {'a': 1}")
    host_name = run(kc, "import os; print(os.environ['SHARED_GPU_HOST'])")[1].strip()
    host = next(h for h in fault_pool.hosts if h.name == host_name)
    session = km.provisioner.session
    host.stop()  # the next connect is refused
    try:
        session.link.connection._transport.sock.shutdown(2)  # and the connection dies
        wait_until(lambda: phase_of(km) is Phase.RECONNECTING, 10, "the drop to be seen")
        msg_id = kc.execute("state['a'] += 1; print(state)")  # a cell sent meanwhile waits
        time.sleep(3)  # several reconnects fail
        assert phase_of(km) is Phase.RECONNECTING
        assert "cannot reach" in (session.message or "")
    finally:
        host.start()
    back = time.monotonic()
    wait_until(lambda: phase_of(km) is Phase.RUNNING, 30, "the reconnect")
    report(
        "the SSH connection dies and the first reconnects fail (sshd down)",
        "reconnected when sshd was back; the waiting cell ran; state kept",
        time.monotonic() - back,
    )
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok"
    assert run(kc, "print(state['a'])")[1].strip() == "2"
    assert km.is_alive()


def test_shutdown_and_interrupt_are_answered_at_once_in_the_queue_and_while_resuming(
    fault_pool: Pool, checker: SlotChecker
):
    km, kc = fault_pool.start_kernel()
    run(kc, slow_load(8) + "kept = 42")
    session = km.provisioner.session
    assert session.request_suspend("test")
    wait_until(lambda: phase_of(km) is Phase.SUSPENDED, 30, "the suspend")
    holders = [BrokerClient(fault_pool.url, fault_pool.token(f"holder{i}")) for i in range(2)]
    held = [c.request_lease("sim", f"held-{i}") for i, c in enumerate(holders)]
    assert all(lease.state == "granted" for lease in held)

    # queued: an interrupt withdraws the request and ends the cell at once
    msg_id = kc.execute("print(kept)")
    wait_until(lambda: fault_pool.queued() == 1, 10, "the queued request")
    started = time.monotonic()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=10)
    answered = time.monotonic() - started
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    # "at once": not after the lease it waited for, which the holders never give back (a loose
    # bound, so that a busy machine does not fail it; bench/ has the timings)
    assert answered < 5.0, f"interrupt answered after {answered:.2f}s"
    report("interrupt while queued", "request withdrawn, cell ends KeyboardInterrupt", answered)
    assert fault_pool.queued() == 0, "the request was not withdrawn"

    # resuming (restoring a state that takes 8 s to load): a shutdown is answered at once
    holders[0].release(held[0].id)
    kc.execute("print(kept)")
    wait_until(lambda: phase_of(km) is Phase.RESUMING and session.kernel, 30, "the restore")
    time.sleep(0.5)
    kc.stop_channels()
    started = time.monotonic()
    km.shutdown_kernel()
    took = time.monotonic() - started
    assert took < 4.0, f"shutdown during a resume took {took:.2f}s (the restore takes 8 s)"
    report("shutdown while restoring", "answered at once; kernel ended, slot freed", took)
    wait_until(
        lambda: (
            not any(
                fault_pool.slot_users().get(s["id"]) == os.environ.get("USER", "tester")
                for s in fault_pool.status()["slots"]
            )
        ),
        10,
        "the slot back",
    )
    holders[1].release(held[1].id)


def test_a_restart_after_the_lease_expired_takes_a_new_lease(
    fault_pool: Pool, checker: SlotChecker
):
    km, kc = fault_pool.start_kernel()
    run(kc, "x = 1")
    session = km.provisioner.session
    old = session.lease
    beat = session.keeper._beat
    session.keeper._beat = lambda: None  # the heartbeats stop getting through
    me = BrokerClient(fault_pool.url, fault_pool.user_token)
    wait_until(lambda: me.get_lease(old.id).state == "expired", 20, "the lease to expire")
    session.keeper._beat = beat  # they would get through again, but the lease is gone
    wait_until(lambda: not km.is_alive() or phase_of(km) is not Phase.RUNNING, 20, "the fence")
    started = time.monotonic()
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=30)
    content, out, _ = run(kc, "print('fresh')")
    assert content["status"] == "ok" and out.strip() == "fresh"
    assert session.lease is not None and session.lease.id != old.id
    report(
        "restart after the lease expired",
        "a new lease (the ended one never reused); a fresh kernel",
        time.monotonic() - started,
    )


def test_a_kernel_killed_on_its_host_is_seen_at_once_and_restarts_on_its_slot(
    fault_pool: Pool, checker: SlotChecker
):
    km, kc = fault_pool.start_kernel()
    pid = int(run(kc, "import os; print(os.getpid())")[1])
    slot = km.provisioner.session.lease.slot.id
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not km.is_alive(), 5, "Jupyter to see the kernel dead")
    report(
        "the kernel process SIGKILLed on its host",
        "seen at once, restarted on its slot (a killed process cannot save)",
        time.monotonic() - killed,
    )
    assert "SIGKILL" in (km.provisioner.session.message or "")
    assert fault_pool.slot_users()[slot] is not None  # the slot is still ours
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=30)
    content, out, _ = run(kc, "import os; print(os.environ['SHARED_GPU_SLOT'])")
    assert content["status"] == "ok" and out.strip() == slot


def test_a_kernel_killed_while_restoring_is_explained_at_once_and_the_state_kept(
    fault_pool: Pool, checker: SlotChecker
):
    km, kc = fault_pool.start_kernel()
    run(kc, slow_load(8) + "kept = 'me'")
    session = km.provisioner.session
    assert session.request_suspend("test")
    wait_until(lambda: phase_of(km) is Phase.SUSPENDED, 30, "the suspend")
    msg_id = kc.execute("print(kept)")
    wait_until(lambda: phase_of(km) is Phase.RESUMING and session.kernel, 30, "the restore")
    time.sleep(0.5)  # the restore is under way (it takes 8 s)
    os.kill(session.kernel.reply.pid, signal.SIGKILL)
    killed = time.monotonic()
    reply = kc.get_shell_msg(timeout=30)
    seen = time.monotonic() - killed
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "ResumeFailed", reply["content"]
    assert "the kernel died while restoring" in reply["content"]["evalue"]
    assert "SIGKILL" in reply["content"]["evalue"]
    assert seen < 5, f"the cell learned of the death after {seen:.1f}s"
    report(
        "the kernel SIGKILLed while it restores",
        "the cell says the kernel died while restoring; the next cell resumed whole",
        seen,
    )
    content, out, _ = run(kc, "print(kept)", timeout=90)  # the checkpoint was kept
    assert content["status"] == "ok", content
    assert out.strip().splitlines()[-1] == "me"


def test_the_broker_killed_during_a_queue_wait_and_a_resume_loses_nothing(
    fault_pool: Pool, checker: SlotChecker
):
    km, kc = fault_pool.start_kernel()
    run(kc, slow_load(3) + "kept = 'me'")
    session = km.provisioner.session
    assert session.request_suspend("test")
    wait_until(lambda: phase_of(km) is Phase.SUSPENDED, 30, "the suspend")
    holders = [BrokerClient(fault_pool.url, fault_pool.token(f"holder{i}")) for i in range(2)]
    held = [c.request_lease("sim", f"held-{i}") for i, c in enumerate(holders)]
    result: dict = {}

    def cell() -> None:
        result["out"] = run(kc, "print(kept)", timeout=90)

    waiter = threading.Thread(target=cell, daemon=True)
    waiter.start()
    wait_until(lambda: fault_pool.queued() == 1, 10, "the queued request")
    fault_pool.stop(signal.SIGKILL)  # while the cell waits in the queue
    time.sleep(1.5)
    fault_pool.start()
    holders[0].release(held[0].id)
    wait_until(lambda: phase_of(km) is Phase.RESUMING and session.kernel, 30, "the restore")
    fault_pool.stop(signal.SIGKILL)  # while the kernel restores
    time.sleep(1.0)
    fault_pool.start()
    restarted = time.monotonic()
    waiter.join(60)
    content, out, _ = result["out"]
    assert content["status"] == "ok", content
    report(
        "the broker SIGKILLed during a queue wait, then during the resume",
        "the cell waited through both restarts and ran; the lease survived",
        time.monotonic() - restarted,
    )
    assert out.strip().splitlines()[-1] == "me"
    assert fault_pool.status()["leases"]  # the lease survived both restarts
    holders[1].release(held[1].id)


def test_a_suspend_on_a_full_disk_says_so_and_the_kernel_keeps_running(
    tmp_path: Path, client_keys: ClientKeys, monkeypatch
):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small-disk"
    small.mkdir()
    import subprocess

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    hosts = start_hosts(tmp_path / "hosts", client_keys, ["tinyhost"], runtime_root=small)
    pool = Pool(tmp_path / "pool", hosts, client_keys)
    try:
        pool.start()
        pool.install_spec()
        monkeypatch.setenv("SHARED_GPU_TOKEN", pool.user_token)
        km, kc = pool.start_kernel()
        assert run(kc, "import os; big = os.urandom(8 << 20); kept = 7")[0]["status"] == "ok"
        session = km.provisioner.session
        assert session.request_suspend("idle")
        wait_until(
            lambda: phase_of(km) is Phase.RUNNING and "space" in (session.message or ""),
            30,
            "the failed save",
        )
        content, out, err = run(kc, "print(kept, len(big))")
        assert content["status"] == "ok" and out.strip() == f"7 {8 << 20}"
        assert "No space left on device" in err and "keeps running" in err
        report("the checkpoint disk is full", "the next cell says why; kernel runs on", None)
        assert any(pool.slot_users().values())  # still on its GPU
        kc.stop_channels()
    finally:
        pool.close()
        for host in hosts:
            host.stop()
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_the_first_cell_after_a_resume_is_running_while_the_old_checkpoint_is_cleaned_up(
    fault_pool: Pool, checker: SlotChecker, monkeypatch: pytest.MonkeyPatch
):
    """A resume attaches the kernel (the waiting cell runs), then tells the broker that the old
    checkpoint is gone. While that answer is slow the kernel runs already: Stop reaches the
    cell, and a suspend order is taken (both were dropped in that window: an interrupt went to
    the finished slot request, a suspend found the kernel "not running")."""
    km, kc = fault_pool.start_kernel()
    run(kc, "kept = 5")
    session = km.provisioner.session
    assert session.request_suspend("test")
    wait_until(lambda: phase_of(km) is Phase.SUSPENDED, 30, "the suspend")

    answer = threading.Event()
    real_forget = saved_state.forget

    def slow_forget(client: BrokerClient, kernel_id: str) -> None:  # the broker answers late
        answer.wait(60)
        real_forget(client, kernel_id)

    monkeypatch.setattr(saved_state, "forget", slow_forget)
    try:
        msg_id = kc.execute("import time\nprint('started', flush=True)\ntime.sleep(60)")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=60)
            if msg["msg_type"] == "stream" and "started" in msg["content"]["text"]:
                break
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=15)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        assert session.request_suspend("test"), "a suspend order was refused"
    finally:
        answer.set()
    wait_until(lambda: phase_of(km) is Phase.SUSPENDED, 30, "the suspend after the resume")
    content, out, _ = run(kc, "print(kept)", timeout=90)
    assert content["status"] == "ok" and out.splitlines()[-1] == "5", out  # after resume lines
    report(
        "Stop and a suspend order while the broker is slow to forget the old checkpoint",
        "the resumed cell is interrupted; the suspend is taken; the state comes back",
        None,
    )


def listening_sockets() -> int:
    me = psutil.Process()
    return sum(1 for c in me.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)


@pytest.mark.timeout(300)
def test_listening_sockets_stay_the_same_across_restarts_and_resumes(
    fault_pool: Pool, checker: SlotChecker
):
    km, kc = fault_pool.start_kernel()
    run(kc, "n = 0")
    session = km.provisioner.session
    before = listening_sockets()
    for _ in range(10):
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=30)
        run(kc, "n = 0")
    wait_until(lambda: listening_sockets() == before, 2, "the old tunnels to close")
    after_restarts = listening_sockets()
    for _ in range(10):
        assert session.request_suspend("test")
        wait_until(lambda: phase_of(km) is Phase.SUSPENDED, 30, "the suspend")
        content, _, _ = run(kc, "n += 1")
        assert content["status"] == "ok"
    assert run(kc, "print(n)")[1].strip() == "10"
    assert after_restarts == before
    wait_until(lambda: listening_sockets() == before, 2, "the old tunnels to close")
    report("10 restarts and 10 resumes", f"listening sockets stay {before}", None)


JUPYTER_SERVER = """
import asyncio, json, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
km = KernelManager(
    kernel_name="shared-gpu", kernel_spec_manager=KernelSpecManager(kernel_dirs=[sys.argv[1]])
)
km.start_kernel()
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=60)
reply = kc.execute_interactive(
    "precious = {'a': 41 + 1}", timeout=60, output_hook=lambda msg: None
)
assert reply["content"]["status"] == "ok"
info = asyncio.run(km.provisioner.get_provisioner_info())
print(json.dumps({"info": info, "key": km.session.key.decode()}, default=bytes.decode), flush=True)
sys.stdin.read()  # until killed
"""


def test_a_jupyter_server_killed_with_sigkill_loses_no_variable(
    fault_pool: Pool, checker: SlotChecker, tmp_path: Path
):
    """The Jupyter server dies (SIGKILL) with the kernelspec's default orphan grace: the broker
    expires the lease and fences the kernel, which saves itself first (SAVE_SIGNAL); a new
    server re-attaches to the saved state and the next cell resumes it."""
    import json
    import subprocess

    from jupyter_client.provisioning import KernelProvisionerFactory

    script = tmp_path / "jupyter_server.py"
    script.write_text(JUPYTER_SERVER)
    server = subprocess.Popen(
        [sys.executable, str(script), str(fault_pool.kernels_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line, "the Jupyter server process did not start its kernel"
        started = json.loads(line)
    finally:
        server.kill()
        server.wait(10)
    info = started["info"]
    kernel_id = info["kernel_id"]
    me = BrokerClient(fault_pool.url, fault_pool.user_token)
    killed = time.monotonic()
    wait_until(
        lambda: any(c.get("state") != "expired" for c in me.checkpoints(kernel_id)),
        40,
        "the fence to save the orphaned kernel and the broker to record it",
    )
    saved_after = time.monotonic() - killed
    assert not any(fault_pool.slot_users().values()), "the orphan's slot was not freed"

    km = fault_pool.kernel_manager()
    km.kernel_id = kernel_id
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        kernel_id, km.kernel_spec, parent=km
    )
    import asyncio

    asyncio.run(provisioner.load_provisioner_info(info))
    km.provisioner = provisioner
    km.load_connection_info({**provisioner.connection_info, "key": started["key"].encode()})
    fault_pool.managers.append(km)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    assert provisioner.session.phase is Phase.SUSPENDED
    content, out, _ = run(kc, "print(precious['a'])")
    assert content["status"] == "ok", content
    assert out.strip().splitlines()[-1] == "42"
    report(
        "the Jupyter server SIGKILLed (heartbeat timeout 3 s, default orphan grace 120 s)",
        "fenced with a save first; a new server resumed every variable",
        saved_after,
    )
    kc.stop_channels()


def test_max_lease_ends_a_busy_kernel_with_a_notice_an_interrupt_and_a_suspend(
    tmp_path: Path, ssh_hosts: list[TestHost], client_keys: ClientKeys, monkeypatch
):
    """A forced order (max_lease; quota works the same) reaches a kernel running a cell: the
    cell says what will happen, is interrupted after the grace, the kernel suspends with its
    variables, and the next cell resumes them."""
    pool = Pool(
        tmp_path / "pool",
        ssh_hosts,
        client_keys,
        heartbeat_interval="500ms",
        max_lease="6s",
        busy_grace="2s",
    )
    try:
        pool.start()
        pool.install_spec()
        monkeypatch.setenv("SHARED_GPU_TOKEN", pool.user_token)
        km, kc = pool.start_kernel()
        run(kc, "kept = [1, 2, 3]")
        started = time.monotonic()
        content, _, err = run(kc, "import time\nfor _ in range(600): time.sleep(0.1)", timeout=60)
        assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt"
        assert "held its GPU for the longest time the pool allows" in err
        assert "interrupted in" in err and "suspended" in err
        wait_until(lambda: phase_of(km) is Phase.SUSPENDED, 30, "the suspend after the interrupt")
        report(
            "max_lease reached while a cell runs (grace 2 s)",
            "notice in the cell, interrupted, suspended; variables kept",
            time.monotonic() - started,
        )
        assert not any(pool.slot_users().values())
        content, out, _ = run(kc, "print(sum(kept))")
        assert content["status"] == "ok" and out.strip().splitlines()[-1] == "6"
        kc.stop_channels()
    finally:
        pool.close()
