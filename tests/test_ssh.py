"""SSHConnection against real sshd hosts on loopback: commands, tunnels, strict keys, failures."""

from __future__ import annotations

import dataclasses
import os
import resource
import shlex
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_kernel import remote
from gpu_kernel.errors import HostKeyError, HostUnreachable, SSHAuthError
from gpu_kernel.ssh import HostTarget, SSHConnection, connect
from tests.conftest import target_for
from tests.sshd import SSH_KEYGEN, ClientKeys, TestHost, free_port, keygen
from tests.test_launcher import client_for, make_request, run_code


@pytest.fixture
def host_a(ssh_hosts: list[TestHost]) -> TestHost:
    return ssh_hosts[0]


@pytest.fixture
def target(host_a: TestHost, client_keys: ClientKeys) -> HostTarget:
    return target_for(host_a, client_keys)


def sshd_children(host: TestHost) -> list[int]:
    """Per-connection sshd processes of ``host`` (its listener's children)."""
    assert host.proc is not None
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == host.proc.pid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def transports() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "Transport" and t.is_alive()]


@pytest.fixture
def nothing_left_behind(host_a: TestHost) -> Iterator[None]:
    """After the test: no paramiko thread and no sshd session process that it started is left."""
    threads, children = set(transports()), set(sshd_children(host_a))

    def left() -> set:
        return (set(transports()) - threads) | (set(sshd_children(host_a)) - children)

    yield
    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left()


def test_run_commands(target: HostTarget, nothing_left_behind: None) -> None:
    with connect(target) as conn:
        assert isinstance(conn, SSHConnection) and conn.is_alive()
        res = conn.run(["echo", "it's a test"])
        assert (res.returncode, res.stdout, res.stderr) == (0, b"it's a test\n", b"")
        res = conn.run(["sh", "-c", "cat; echo oops >&2; exit 3"], stdin=b"x" * 200_000)
        assert (res.returncode, len(res.stdout), res.stderr) == (3, 200_000, b"oops\n")
    assert not conn.is_alive()
    conn.close()  # idempotent


def test_kernel_over_ssh_tunnel_survives_the_connection(
    target: HostTarget, tmp_path: Path, nothing_left_behind: None
) -> None:
    req = make_request(tmp_path / "rt", host_name=target.name, slot_id=f"{target.name}/0")
    conn = connect(target)
    try:
        reply = remote.launch(conn, target, req)
        local = {name: conn.forward(port) for name, port in reply.ports.items()}
        assert local != reply.ports
        kc = client_for(reply, local)
        try:
            content, out = run_code(kc, "x = 41\nimport os; print(os.environ['SHARED_GPU_HOST'])")
            assert content["status"] == "ok" and out == f"{target.name}\n"
            tunnel = round_trips(kc)
            content, out = run_code(kc, "print('y' * 3_000_000)")  # bulk output through it
            assert len(out) == 3_000_001
        finally:
            kc.stop_channels()
        direct_kc = client_for(reply)
        try:
            direct = round_trips(direct_kc)
        finally:
            direct_kc.stop_channels()
        print(
            f"\nexecute round trip median: tunnel {tunnel * 1e3:.1f} ms, "
            f"direct {direct * 1e3:.1f} ms"
        )
        conn.close()
        assert not conn.is_alive()

        conn = connect(target)  # the kernel lives on in its own session
        assert remote.status(conn, target, req.kernel_id, req.runtime_root).alive
        kc = client_for(reply, {name: conn.forward(port) for name, port in reply.ports.items()})
        try:
            content, out = run_code(kc, "print(x + 1)")
            assert out == "42\n"
        finally:
            kc.stop_channels()
        assert not remote.kill(conn, target, req.kernel_id, req.runtime_root).alive
    finally:
        remote.cleanup(conn, target, req.kernel_id, req.runtime_root)
        conn.close()


def round_trips(kc, n: int = 30) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        kc.execute_interactive("1", timeout=10, output_hook=lambda msg: None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_forward_to_a_closed_remote_port_drops_only_that_connection(
    target: HostTarget, nothing_left_behind: None
) -> None:
    with connect(target) as conn:
        dead = conn.forward(free_port())
        with socket.create_connection(("127.0.0.1", dead), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(10) == b""  # closed once the host refused the channel
        assert conn.run(["true"]).returncode == 0  # the connection itself is fine


def test_the_next_stream_is_the_command_started_ahead_while_fresh_and_running(
    target: HostTarget, tmp_path: Path, nothing_left_behind: None
) -> None:
    """``start_ahead``: the host's shell and the command start before anyone waits for them."""
    pids = tmp_path / "pids"
    argv = ["sh", "-c", f'echo $$ >> {pids}; read line; echo "$line $$"']

    def started() -> list[str]:
        deadline = time.monotonic() + 10
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        lines = pids.read_text().split()
        pids.unlink()
        return lines

    def ask(conn: SSHConnection, word: str) -> list[str]:
        with conn.open_stream(argv, timeout=10) as stream:
            stream.stdin.write(word.encode() + b"\n")
            stream.stdin.flush()
            return stream.stdout.readline().decode().split()

    with connect(target) as conn:
        assert isinstance(conn, SSHConnection)
        conn.start_ahead(argv, fresh_for=60)
        (ahead,) = started()  # it ran before anyone asked for it
        assert ask(conn, "first") == ["first", ahead]  # and it is the one handed out
        assert not pids.exists()  # no other command was started

        conn.start_ahead(argv, fresh_for=0)  # too old to trust by the time it is asked for
        (stale,) = started()
        answer = ask(conn, "second")
        (fresh,) = started()
        assert answer == ["second", fresh] and fresh != stale

        conn.start_ahead(argv, fresh_for=60)
        (ended,) = started()
        os.kill(int(ended), 9)  # gone before it is asked for
        held = conn._ahead[shlex.join(argv)].stream  # until sshd has said that it ended
        deadline = time.monotonic() + 5
        while not held.ended() and time.monotonic() < deadline:
            time.sleep(0.02)
        answer = ask(conn, "third")
        (fresh,) = started()
        assert answer == ["third", fresh] and fresh != ended


def test_streams_of_a_dropped_connection_close_quietly(
    target: HostTarget, nothing_left_behind: None
) -> None:
    """A launcher started ahead on a connection that dropped is closed by a background thread:
    closing its channel has no peer left to tell, and that must not raise there."""
    argv = ["sh", "-c", "read line"]
    with connect(target) as conn:
        assert isinstance(conn, SSHConnection)
        stream = conn.open_stream(argv, timeout=10)
        # The link breaks under the channel; paramiko's transport has not noticed yet, so a
        # close still tries to tell the host and its send fails.
        conn._transport.sock.shutdown(socket.SHUT_WR)
        stream.close_stdin()
        stream.close()  # raised EOFError from paramiko before


def test_half_close_passes_eof_both_ways(target: HostTarget, nothing_left_behind: None) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def echo_after_eof() -> None:
        c, _ = server.accept()
        data = b""
        while chunk := c.recv(65536):
            data += chunk
        got.append(data)
        c.sendall(data[::-1])
        c.close()

    threading.Thread(target=echo_after_eof, daemon=True).start()
    with connect(target) as conn, server:
        port = conn.forward(server.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            payload = bytes(range(256)) * 16000  # 4 MB: back-pressure both ways
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            back = b""
            while chunk := s.recv(65536):
                back += chunk
        assert got == [payload]
        assert back == payload[::-1]


def test_commands_and_tunnels_work_with_more_than_1024_files_open(
    target: HostTarget, nothing_left_behind: None
) -> None:
    """A Jupyter server with a few dozen kernels holds more than 1024 descriptors: the tunnel
    pump and a command's reader, waiting on descriptors past that, still work (``select()``
    raised "filedescriptor out of range", and the kernel's tunnels stopped)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if wanted < 2048:
        pytest.skip(f"the open files limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    server = socket.create_server(("127.0.0.1", 0))
    try:

        def echo() -> None:
            c, _ = server.accept()
            with c:
                while chunk := c.recv(65536):
                    c.sendall(chunk)

        threading.Thread(target=echo, daemon=True).start()
        with connect(target) as conn:
            assert conn.run(["echo", "past 1024"]).stdout == b"past 1024\n"
            port = conn.forward(server.getsockname()[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert s.fileno() > 1024
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
            assert conn.is_alive()  # the pump thread still runs
    finally:
        server.close()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_unknown_host_key_gives_the_keyscan_command(
    target: HostTarget, host_a: TestHost, tmp_path: Path, nothing_left_behind: None
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match="unknown") as info:
        connect(dataclasses.replace(target, known_hosts_file=str(empty)))
    assert info.value.hint.endswith(f"ssh-keyscan -p {host_a.port} 127.0.0.1 >> {empty}")


def test_host_keys_from_the_broker_and_hashed_known_hosts(
    target: HostTarget, host_a: TestHost, tmp_path: Path, nothing_left_behind: None
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    with connect(
        dataclasses.replace(target, known_hosts_file=str(empty), host_keys=(host_a.host_key_line,))
    ) as c:
        assert c.run(["true"]).returncode == 0
    hashed = tmp_path / "hashed"
    hashed.write_text(host_a.known_hosts_line + "\n")
    subprocess.run([SSH_KEYGEN, "-q", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert "127.0.0.1" not in hashed.read_text()
    with connect(dataclasses.replace(target, known_hosts_file=str(hashed))) as c:
        assert c.is_alive()


def test_changed_host_key_is_refused_as_a_possible_attack(
    target: HostTarget, ssh_hosts: list[TestHost], tmp_path: Path, nothing_left_behind: None
) -> None:
    host_a, host_b = ssh_hosts
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{host_a.port} {host_b.host_key_line}\n")
    with pytest.raises(HostKeyError, match=r"CHANGED.*attack"):
        connect(dataclasses.replace(target, known_hosts_file=str(wrong)))
    other_type = keygen_ecdsa(tmp_path / "ecdsa")
    wrong.write_text(f"[127.0.0.1]:{host_a.port} {other_type}\n")
    with pytest.raises(HostKeyError, match="CHANGED"):
        connect(dataclasses.replace(target, known_hosts_file=str(wrong)))


def keygen_ecdsa(path: Path) -> str:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ecdsa", "-N", "", "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def test_refused_client_key_names_login_and_key_file(
    target: HostTarget, host_a: TestHost, tmp_path: Path, nothing_left_behind: None
) -> None:
    stranger = tmp_path / "stranger"
    keygen(stranger)
    with pytest.raises(SSHAuthError) as info:
        connect(dataclasses.replace(target, key_file=str(stranger)))
    assert f"{host_a.user}@127.0.0.1:{host_a.port}" in str(info.value)
    assert str(stranger) in str(info.value)
    with pytest.raises(SSHAuthError, match="cannot load"):
        connect(dataclasses.replace(target, key_file=str(tmp_path / "missing")))


def test_closed_port_and_non_ssh_service_are_unreachable(
    target: HostTarget, nothing_left_behind: None
) -> None:
    with pytest.raises(HostUnreachable, match="cannot connect") as info:
        connect(dataclasses.replace(target, port=free_port()))
    assert "sshd" in info.value.hint
    with socket.create_server(("127.0.0.1", 0)) as server:
        closer = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
        closer.start()
        with pytest.raises(HostUnreachable, match="handshake"):
            connect(dataclasses.replace(target, port=server.getsockname()[1]))
