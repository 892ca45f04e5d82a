"""Idle SSH connections (``provisioner.idle_connections``) against real sshd hosts: the next
kernel on a host starts on the connection the last one left, and never on one that cannot
serve it (its host gone quiet, tunnels still open, kept too long)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from broker.client import BrokerClient
from gpu_kernel import remote
from gpu_kernel.ssh import connect
from provisioner.idle_connections import IDLE, IdleConnections, borrowed
from tests.conftest import target_for
from tests.pool import Pool, shut_down
from tests.sshd import ClientKeys, TestHost, start_hosts
from tests.test_launcher import client_for, make_request, run_code, wait_for
from tests.test_ssh import sshd_children


@pytest.fixture
def lone_host(tmp_path: Path, client_keys: ClientKeys):
    """An sshd of this test's own (the test stops its connections' processes)."""
    (host,) = start_hosts(tmp_path / "hosts", client_keys, ["lone"])
    yield host
    host.stop()


def with_descendants(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += [child for child, parent in parents.items() if parent == current]
    return found


def launchers_on(host: TestHost) -> list[int]:
    """``python -m gpu_kernel launch`` processes in ``host``'s SSH sessions."""
    found = []
    for session in sshd_children(host):
        for pid in with_descendants(session):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:4] == [b"-m", b"gpu_kernel", b"launch"]:
                found.append(pid)
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def run_in(kc, code: str) -> str:
    msg_id = kc.execute(code)
    out = ""
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return out


def test_the_next_kernel_on_a_host_starts_on_the_connection_the_last_one_left(
    pool: Pool, ssh_hosts: list[TestHost]
) -> None:
    pool.install_spec(name="eager", attach="eager")
    km = pool.kernel_manager("eager")
    km.start_kernel()
    session = km.provisioner.session
    first, target = session.link.connection, session.link.target
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    assert run_in(kc, "print(6 * 7)").strip() == "42"
    kc.stop_channels()
    shut_down(km)
    # kept (an earlier test's session may have left others to that host too), tunnels closed
    kept = IDLE.kept(target)
    assert first in kept and first.is_alive() and first.forwarding() == []

    admin = BrokerClient(pool.url, pool.admin_token)
    for host in ssh_hosts:  # the next kernel goes to the same host
        if host.name != target.name:
            admin.drain(host.name)
    again = pool.kernel_manager("eager")
    again.start_kernel()
    try:
        session = again.provisioner.session
        assert session.link.target == target
        assert session.link.connection in kept  # no new handshake
        assert session.link.connection not in IDLE.kept(target)  # and no longer shared
        kc = again.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        assert run_in(kc, "print(6 * 9)").strip() == "54"  # its tunnels work on it
        kc.stop_channels()
    finally:
        shut_down(again)
        for host in ssh_hosts:
            admin.drain(host.name, drained=False)
        admin.close()


def test_a_kept_connection_whose_host_stopped_answering_is_closed_not_used(
    lone_host: TestHost, client_keys: ClientKeys
) -> None:
    target = target_for(lone_host, client_keys)
    idle = IdleConnections(keep=60)
    conn = connect(target)
    assert conn.run(["true"]).returncode == 0  # its sshd processes are all there now
    idle.give(target, conn)
    wait_for(lambda: len(launchers_on(lone_host)) == 1)  # the launcher started ahead waits
    (session,) = sshd_children(lone_host)
    stopped: list[int] = []
    while new := [pid for pid in with_descendants(session) if pid not in stopped]:
        for pid in new:  # as a cut link: no reset, no answer
            with contextlib.suppress(ProcessLookupError):  # a shell's child that just ended
                os.kill(pid, signal.SIGSTOP)
        stopped += new
    try:
        started = time.monotonic()
        assert idle.take(target) is None
        assert time.monotonic() - started < 5  # the check's bound, not a hang
        assert not conn.is_alive() and len(idle) == 0
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    fresh = connect(target)  # the caller connects anew, and that works
    assert fresh.run(["true"]).returncode == 0
    fresh.close()


def test_a_connection_with_tunnels_or_kept_too_long_is_closed(
    lone_host: TestHost, client_keys: ClientKeys
) -> None:
    target = target_for(lone_host, client_keys)
    idle = IdleConnections(keep=0.5, per_host=1)
    tunnelled = connect(target)
    tunnelled.forward(lone_host.port)
    idle.give(target, tunnelled)  # a kernel's tunnels would outlive it
    assert not tunnelled.is_alive() and len(idle) == 0

    older, newer = connect(target), connect(target)
    idle.give(target, older)
    idle.give(target, newer)  # one per host: the older one goes
    assert not older.is_alive() and newer.is_alive() and len(idle) == 1
    deadline = time.monotonic() + 5
    while newer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not newer.is_alive() and len(idle) == 0  # the sweeper closed it after 0.5 s
    assert idle.take(target) is None


def test_a_borrowed_connection_comes_back_unless_its_errand_failed(
    lone_host: TestHost, client_keys: ClientKeys
) -> None:
    target = target_for(lone_host, client_keys)
    idle = IdleConnections(keep=60)
    with borrowed(target, idle=idle) as conn:  # none kept: a new one
        assert conn.run(["echo", "copy"]).stdout == b"copy\n"
    assert len(idle) == 1 and conn.is_alive()
    with pytest.raises(RuntimeError), borrowed(target, idle=idle) as again:
        assert again is conn  # the kept one
        raise RuntimeError("the copy broke mid-stream")
    assert not conn.is_alive() and len(idle) == 0  # not trusted again
    idle.close()


def test_a_kept_connection_has_a_launcher_waiting_that_starts_the_next_kernel(
    lone_host: TestHost, client_keys: ClientKeys, tmp_path: Path
) -> None:
    """The host's login shell and the launcher's start-up are paid while the connection waits,
    not by the next start; a launcher nobody asked for goes with its connection."""
    target = target_for(lone_host, client_keys)
    idle = IdleConnections(keep=60)
    conn = connect(target)
    idle.give(target, conn)
    wait_for(lambda: len(launchers_on(lone_host)) == 1)
    (waiting,) = launchers_on(lone_host)
    assert idle.take(target) is conn

    request = make_request(tmp_path / "rt", host_name=target.name, slot_id=f"{target.name}/0")
    reply, watch = remote.launch_watched(conn, target, request)
    try:
        assert reply.ok
        assert launchers_on(lone_host) == [waiting]  # it started the kernel, and watches it
        kc = client_for(reply, {name: conn.forward(port) for name, port in reply.ports.items()})
        content, out = run_code(kc, "import os; print(os.environ['SHARED_GPU_TEST'], 6 * 7)")
        assert content["status"] == "ok" and out.split() == ["yes", "42"]  # the request's env
        kc.stop_channels()
    finally:
        remote.cleanup(conn, target, request.kernel_id, runtime_root=request.runtime_root)
        watch.close()
    for local in conn.forwarding():
        conn.unforward(local)

    idle.give(target, conn)  # kept again: the next launcher waits
    wait_for(lambda: [pid for pid in launchers_on(lone_host) if pid != waiting] != [])
    (unused,) = [pid for pid in launchers_on(lone_host) if pid != waiting]
    idle.close()  # the connection closes: the launcher nobody asked for ends with it
    wait_for(lambda: gone(unused) and gone(waiting))
