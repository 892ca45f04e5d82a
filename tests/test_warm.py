"""Warm interpreters (``gpu_kernel.warm``): the second start on a host skips the imports, the
kernel it forks is whole, the interpreter holds no GPU, exits when unused, and refuses any
identity that is not its own user's. Real launcher, real kernels, on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpu_kernel import __version__, remote, warm
from gpu_kernel.protocol import PROTOCOL_VERSION, LaunchReply, LaunchRequest
from gpu_kernel.ssh import HostConnection, connect
from tests import fake_nvml
from tests.test_kernel_control import control
from tests.test_launcher import LOCAL, client_for, make_request, run_code, wait_for

Launch = Callable[..., tuple[LaunchRequest, LaunchReply]]


@pytest.fixture
def conn() -> Iterator[HostConnection]:
    with connect(LOCAL) as c:
        yield c


@pytest.fixture
def launch(conn: HostConnection, tmp_path: Path) -> Iterator[Launch]:
    started: list[LaunchRequest] = []

    def _launch(**kw: object) -> tuple[LaunchRequest, LaunchReply]:
        kw.setdefault("warm", 30.0)
        req = make_request(tmp_path / "rt", **kw)
        started.append(req)
        return req, remote.launch(conn, LOCAL, req)

    yield _launch
    for req in started:
        remote.cleanup(conn, LOCAL, req.kernel_id, runtime_root=req.runtime_root)
    host_dir = tmp_path / "rt" / LOCAL.name
    pid_file = warm.socket_path(host_dir, "tester").with_suffix(".sock.pid")
    if pid_file.exists():
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


def host_dir_of(req: LaunchRequest) -> Path:
    return Path(req.runtime_root or "") / req.host_name


def interpreter_pid(req: LaunchRequest) -> int:
    path = warm.socket_path(host_dir_of(req), req.owner)
    wait_for(lambda: path.exists() and path.with_suffix(".sock.pid").exists(), timeout=30)
    return int(path.with_suffix(".sock.pid").read_text())


def test_the_second_start_is_warm_and_its_kernel_is_whole(launch: Launch) -> None:
    first, reply = launch()
    assert not reply.warm  # nobody warm yet: a new interpreter, and a warm one for next time
    interpreter_pid(first)
    req, reply = launch(cuda_visible_devices="MIG-7777")
    assert reply.warm
    kc = client_for(reply)
    try:
        content, out = run_code(
            kc,
            "import os, sys\nx = 6 * 7\n"
            "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['SHARED_GPU_KERNEL_ID'], "
            "os.getuid(), os.getsid(0) == os.getpid(), x)",
        )
    finally:
        kc.stop_channels()
    assert content["status"] == "ok"
    assert out.split() == ["MIG-7777", req.kernel_id, str(os.getuid()), "True", "42"]


def test_a_runtime_dir_too_deep_for_a_unix_socket_still_starts_warm(
    launch: Launch, tmp_path: Path
) -> None:
    # a home directory deep enough that <runtime>/<host>/.warm/<user>.sock passes AF_UNIX's
    # 108 bytes: the interpreter was left unable to listen, and every start was cold
    root = tmp_path / ("d" * 60) / ("e" * 60) / "rt"
    first, reply = launch(runtime_root=str(root))
    assert not reply.warm
    assert len(str(warm.socket_path(host_dir_of(first), first.owner))) > 108
    pid = interpreter_pid(first)
    try:
        _, reply = launch(runtime_root=str(root))
        assert reply.warm
    finally:
        os.kill(pid, signal.SIGTERM)


def test_a_kernel_forked_warm_is_watched_killed_and_reports_its_end(
    launch: Launch, conn: HostConnection
) -> None:
    first, _ = launch()
    interpreter_pid(first)
    req = make_request(Path(first.runtime_root or ""), warm=30.0)
    reply, stream = remote.launch_watched(conn, LOCAL, req)
    try:
        assert reply.warm
        os.kill(reply.pid, signal.SIGKILL)
        lines = [json.loads(line) for line in stream.stdout]
    finally:
        stream.close()
        remote.cleanup(conn, LOCAL, req.kernel_id, runtime_root=req.runtime_root)
    assert lines[-1] == {"alive": False, "exit_code": 128 + signal.SIGKILL}


def test_the_warm_interpreter_holds_no_gpu(
    launch: Launch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "nvml.json"
    gpu = fake_nvml.a100()
    for name, value in fake_nvml.write_config(config, [gpu]).items():
        monkeypatch.setenv(name, value)  # the launcher's environment: the interpreter's too
    first, _ = launch(warm_preload=("torch",))
    pid = interpreter_pid(first)
    _, reply = launch(cuda_visible_devices=gpu["uuid"])
    assert reply.warm
    kc = client_for(reply)
    try:
        assert control(kc, "usage_request", {})["gpu"] is not None  # the kernel reads NVML
    finally:
        kc.stop_channels()
    inits = {int(line) for line in Path(f"{config}.inits").read_text().split()}
    assert reply.pid in inits
    assert pid not in inits, "the warm interpreter touched the GPU"
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libcuda" not in maps and "libnvidia-ml" not in maps
    assert "torch" in maps  # preloaded, as asked


def test_a_warm_interpreter_left_unused_exits_by_itself(launch: Launch) -> None:
    req, _ = launch(warm=1.5)
    pid = interpreter_pid(req)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=15)
    assert not warm.socket_path(host_dir_of(req), req.owner).exists()


def ask(path: Path, request: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(sock.makefile().readline())


def test_an_identity_not_from_its_user_is_refused(launch: Launch) -> None:
    req, _ = launch()
    interpreter_pid(req)
    path = warm.socket_path(host_dir_of(req), req.owner)
    rdir = host_dir_of(req) / req.kernel_id
    good = {
        "protocol": PROTOCOL_VERSION,
        "version": __version__,
        "owner": req.owner,
        "rdir": str(rdir),
        "env": {},
        "cwd": "/",
    }
    other = host_dir_of(req) / "someone-elses"
    other.mkdir(mode=0o700)
    (other / "connection.json").write_text("{}")
    (other / "launch.json").write_text(json.dumps({"owner": "mallory"}))
    for change, words in [
        ({"owner": "mallory"}, "serves 'tester'"),
        ({"version": "0.0.1"}, "version '0.0.1'"),
        ({"rdir": "/etc"}, "is not one of"),
        ({"rdir": str(other)}, "is not a launch of 'tester'"),
        ({"env": {"A": 1}}, "bad environment"),
    ]:
        reply = ask(path, {**good, **change})
        assert reply["ok"] is False and words in reply["error"], (change, reply)
    assert not (other / "kernel.log").exists(), "a refused identity must start nothing"


def test_a_late_reap_never_writes_into_a_newer_incarnations_dir(tmp_path: Path) -> None:
    # a kernel suspends (exit 75) and resumes on this host in the same runtime dir before the
    # warm interpreter reaps the first process: that reap must not leave "75" in the new
    # kernel's dir (its death by SIGKILL was then reported as "exit code 75")
    code = f"""
import os, sys, time
from pathlib import Path
from gpu_kernel import procs
from gpu_kernel.warm import WarmInterpreter
rdir = Path({str(tmp_path)!r}) / "rt" / "k1"
rdir.mkdir(parents=True)
w = WarmInterpreter(Path({str(tmp_path)!r}) / "rt", "tester", 60)
first = os.fork()
if first == 0:
    time.sleep(0.5)
    os._exit(75)
w.children[first] = rdir
procs.write_pid_file(rdir, os.getpid())  # the newer incarnation's pid file
time.sleep(1.0)
w._reap()
print("written" if (rdir / "exit_code").exists() else "clean")
second = os.fork()  # the same kernel's own dir: its end is recorded
if second == 0:
    time.sleep(0.2)
    os._exit(9)
w.children[second] = rdir
(rdir / "kernel.pid").unlink()  # as the launcher's _prepare_dir does
procs.write_pid_file(rdir, second)
time.sleep(0.5)
w._reap()
print((rdir / "exit_code").read_text().strip())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert out == ["clean", "9"]
