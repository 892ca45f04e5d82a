"""The launcher and ctl on this machine (a "local" host): real kernels, real ZMQ, no SSH."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from gpu_kernel import launcher as launcher_module
from gpu_kernel import remote
from gpu_kernel.errors import BadRequest, KernelControlError, LaunchError, ProtocolMismatch
from gpu_kernel.protocol import PROTOCOL_VERSION, KernelStatus, LaunchReply, LaunchRequest
from gpu_kernel.ssh import HostConnection, HostTarget, connect

LOCAL = HostTarget(name="local-test", address="local", python=sys.executable)
KEY = "k3y-" + uuid.uuid4().hex


def make_request(root: Path, **kw: object) -> LaunchRequest:
    fields: dict = dict(
        kernel_id="kern-" + uuid.uuid4().hex[:12],
        key=KEY,
        cuda_visible_devices="MIG-1234-abcd",
        host_name=LOCAL.name,
        slot_id=f"{LOCAL.name}/0",
        owner="tester",
        env={"SHARED_GPU_TEST": "yes"},
        runtime_root=str(root),
    )
    fields.update(kw)
    return LaunchRequest(**fields)


def client_for(reply: LaunchReply, ports: dict[str, int] | None = None) -> BlockingKernelClient:
    """A jupyter_client talking to the kernel on 127.0.0.1 with ``ports`` (default: the reply's)."""
    p = ports or reply.ports
    kc = BlockingKernelClient()
    info = {f"{name}_port": port for name, port in p.items()}
    kc.load_connection_info(dict(info, ip="127.0.0.1", transport="tcp", key=KEY))
    kc.start_channels()
    kc.wait_for_ready(timeout=20)
    return kc


def run_code(kc: BlockingKernelClient, code: str, timeout: float = 20) -> tuple[dict, str]:
    """Execute ``code``; returns the reply content and everything it printed."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out)


Launch = Callable[..., tuple[LaunchRequest, LaunchReply]]


@pytest.fixture
def conn() -> Iterator[HostConnection]:
    with connect(LOCAL) as c:
        yield c


@pytest.fixture
def launch(conn: HostConnection, tmp_path: Path) -> Iterator[Launch]:
    """Launch kernels on this machine; every one is cleaned up (killed, dir removed) at the end."""
    started: list[LaunchRequest] = []

    def _launch(**kw: object) -> tuple[LaunchRequest, LaunchReply]:
        req = make_request(tmp_path / "rt", **kw)
        started.append(req)
        return req, remote.launch(conn, LOCAL, req)

    yield _launch
    for req in started:
        remote.cleanup(conn, LOCAL, req.kernel_id, runtime_root=req.runtime_root)


def launcher(line: str) -> tuple[int, dict]:
    p = subprocess.run(
        [sys.executable, "-m", "gpu_kernel", "launch"], input=line.encode(), capture_output=True
    )
    return p.returncode, json.loads(p.stdout)


def wait_for(pred: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, st = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if st == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


def test_protocol_round_trip_and_strictness() -> None:
    req = make_request(Path("/tmp/x"))
    assert LaunchRequest.from_json(req.to_json()) == req
    assert "\n" not in req.to_json() and KEY not in repr(req)
    ok = LaunchReply.success(7, dict(shell=1, iopub=2, stdin=3, control=4, hb=5), "h", "0.1")
    assert LaunchReply.from_json(ok.to_json()) == ok
    bad = LaunchReply.failure("start_failed", "boom", "look")
    assert LaunchReply.from_json(bad.to_json()) == bad
    assert KernelStatus.from_json('{"alive":false,"exit_code":3}') == KernelStatus(False, 3)
    cases = {
        '{"alive": 1, "exit_code": null}': "'alive' must be bool",
        '{"alive": true}': "missing field 'exit_code'",
        '{"alive": true, "exit_code": null, "x": 1}': "unknown field(s) 'x'",
        "[1]": "must be a JSON object",
        "nope": "not valid JSON",
    }
    for line, words in cases.items():
        with pytest.raises(BadRequest, match=words.replace("(", r"\(").replace(")", r"\)")):
            KernelStatus.from_json(line)
    with pytest.raises(BadRequest, match="'ports' must map"):
        LaunchReply.from_json(ok.to_json().replace('"hb":5', '"hb":0'))


def test_kernel_runs_with_slot_env_on_loopback_only(launch: Launch) -> None:
    req, reply = launch()
    assert reply.ok and reply.protocol == PROTOCOL_VERSION and reply.hostname
    rdir = Path(req.runtime_root or "") / req.host_name / req.kernel_id
    assert stat.S_IMODE(rdir.stat().st_mode) & 0o777 == 0o700
    conn_file = rdir / "connection.json"
    assert stat.S_IMODE(conn_file.stat().st_mode) == 0o600
    info = json.loads(conn_file.read_text())
    assert info["ip"] == "127.0.0.1" and info["shell_port"] == reply.ports["shell"]
    assert int((rdir / "kernel.pid").read_text().split()[0]) == reply.pid
    cmdline = Path(f"/proc/{reply.pid}/cmdline").read_bytes()
    assert KEY.encode() not in cmdline and str(conn_file).encode() in cmdline
    assert KEY.encode() not in Path(f"/proc/{reply.pid}/environ").read_bytes()
    for port in reply.ports.values():
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else

    kc = client_for(reply)
    try:
        content, out = run_code(
            kc,
            "import os\nfor v in ('CUDA_VISIBLE_DEVICES', 'SHARED_GPU_HOST', 'SHARED_GPU_SLOT',"
            " 'SHARED_GPU_KERNEL_ID', 'SHARED_GPU_TEST'): print(os.environ.get(v))",
        )
        assert content["status"] == "ok"
        assert out.split() == ["MIG-1234-abcd", LOCAL.name, f"{LOCAL.name}/0", req.kernel_id, "yes"]
        assert os.getpgid(reply.pid) == reply.pid  # own session and process group
    finally:
        kc.stop_channels()
    assert KEY not in (rdir / "kernel.log").read_text()


def test_ctl_signal_status_kill_and_cleanup(launch: Launch, conn: HostConnection) -> None:
    req, reply = launch()
    kid, root = req.kernel_id, req.runtime_root
    assert remote.status(conn, LOCAL, kid, root) == KernelStatus(alive=True, exit_code=None)
    kc = client_for(reply)
    try:
        msg_id = kc.execute("import time; time.sleep(30)")
        wait_for(lambda: kc.get_iopub_msg(timeout=5)["content"].get("execution_state") == "busy")
        time.sleep(0.2)
        assert remote.signal(conn, LOCAL, kid, signal.SIGINT, root).alive
        content = kc.get_shell_msg(timeout=10)
        assert content["parent_header"]["msg_id"] == msg_id
        assert content["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()
    assert remote.kill(conn, LOCAL, kid, root) == KernelStatus(alive=False, exit_code=143)
    rdir = Path(root or "") / req.host_name / kid
    assert rdir.exists()
    assert remote.cleanup(conn, LOCAL, kid, root) == KernelStatus(alive=False, exit_code=143)
    assert not rdir.exists()
    assert remote.status(conn, LOCAL, kid, root) == KernelStatus(alive=False, exit_code=None)


def test_shutdown_request_writes_exit_code_zero(launch: Launch, conn: HostConnection) -> None:
    req, reply = launch()
    kc = client_for(reply)
    kc.shutdown()
    kc.stop_channels()
    wait_for(lambda: not remote.status(conn, LOCAL, req.kernel_id, req.runtime_root).alive)
    assert remote.status(conn, LOCAL, req.kernel_id, req.runtime_root).exit_code == 0


def test_ctl_never_touches_a_process_that_is_not_the_kernel(launch: Launch, conn: HostConnection):
    req, _ = launch()
    remote.kill(conn, LOCAL, req.kernel_id, req.runtime_root)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:  # the pid file now names a live process that is not this kernel (pid reuse)
        rdir = Path(req.runtime_root or "") / req.host_name / req.kernel_id
        (rdir / "kernel.pid").write_text(str(sleeper.pid))
        assert not remote.status(conn, LOCAL, req.kernel_id, req.runtime_root).alive
        remote.cleanup(conn, LOCAL, req.kernel_id, req.runtime_root)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_same_kernel_id_twice_is_refused_while_alive(launch: Launch, conn: HostConnection):
    req, reply = launch()
    with pytest.raises(LaunchError, match="already running") as info:
        launch(kernel_id=req.kernel_id)
    assert "cleanup" in info.value.hint
    remote.kill(conn, LOCAL, req.kernel_id, req.runtime_root)
    _, again = launch(kernel_id=req.kernel_id)  # a dead kernel's dir is reused
    assert again.pid != reply.pid


def test_protocol_mismatch_names_both_versions_and_the_fix(launch: Launch) -> None:
    with pytest.raises(ProtocolMismatch) as info:
        launch(protocol=PROTOCOL_VERSION + 1)
    msg = str(info.value)
    assert f"protocol {PROTOCOL_VERSION + 1}" in msg and f"protocol {PROTOCOL_VERSION}" in msg
    assert "install the same jupyter-shared-gpu version on the host" in info.value.hint
    rc, reply = launcher('{"protocol": 99, "something": "else"}')
    assert rc == 1 and reply["ok"] is False and reply["code"] == "protocol"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("not json", "not valid JSON"),
        (f'{{"protocol": {PROTOCOL_VERSION}}}', "missing field 'kernel_id'"),
        ("BASE kernel_id=../../etc", "invalid kernel_id '../../etc'"),
        ("BASE kernel_id=a/b", "invalid kernel_id 'a/b'"),
        ("BASE host_name=../x", "invalid host name '../x'"),
        ("BASE owner=-rf", "invalid user name '-rf'"),
        ("BASE env=[1]", "'env' must be dict"),
        ("BASE key=", "'key' must be a non-empty"),
        ("BASE protocol=true", "'protocol' must be int"),
        ("BASE runtime_root=3", "'runtime_root' must be str or null"),
        ("BASE extra=1", "unknown field(s) 'extra'"),
    ],
)
def test_bad_request_is_refused_with_the_field_named(line: str, words: str, tmp_path: Path):
    if line.startswith("BASE "):
        data = json.loads(make_request(tmp_path).to_json())
        name, _, value = line[5:].partition("=")
        data[name] = json.loads(value) if value[:1] in "[{3t" and value else value
        line = json.dumps(data)
    rc, reply = launcher(line)
    assert rc == 1 and reply["ok"] is False and reply["code"] == "bad_request"
    assert words in reply["error"]
    assert KEY not in json.dumps(reply)
    assert not any(tmp_path.iterdir())


def test_a_launcher_whose_request_never_comes_exits_quietly_and_starts_nothing(
    tmp_path: Path,
) -> None:
    """A launcher started ahead (``remote.prepare_launch``) whose connection closed, or that
    waited its time out, leaves nothing behind and says nothing."""
    p = subprocess.run(
        [sys.executable, "-m", "gpu_kernel", "launch"],
        stdin=subprocess.DEVNULL,  # closed before any request: EOF
        capture_output=True,
        env=dict(os.environ, SHARED_GPU_RUNTIME_ROOT=str(tmp_path)),
    )
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert not any(tmp_path.iterdir())
    read_end, write_end = os.pipe()  # open, and silent
    with os.fdopen(read_end, "rb") as silent:
        assert launcher_module.request_line(silent, 0.2) == b""
    os.close(write_end)


def test_kernel_that_dies_at_start_gives_start_failed_with_its_log(launch: Launch) -> None:
    with pytest.raises(LaunchError, match=r"start_failed.*exited with status") as info:
        launch(env={"PYTHONHOME": "/nonexistent"})
    assert "Fatal Python error" in str(info.value) or "encodings" in str(info.value)
    assert "kernel.log" in info.value.hint


def test_missing_install_on_the_host_says_how_to_fix_it(conn: HostConnection, tmp_path: Path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '/usr/bin/python3: No module named gpu_kernel' >&2\nexit 1\n")
    fake.chmod(0o755)
    for python in (str(tmp_path / "nonexistent"), str(fake)):
        host = dataclasses.replace(LOCAL, python=python)
        with pytest.raises(LaunchError) as info:
            remote.launch(conn, host, make_request(tmp_path))
        assert "install jupyter-shared-gpu on the host" in info.value.hint
        assert "`python`" in info.value.hint
        with pytest.raises(LaunchError, match="cannot run"):
            remote.status(conn, host, "k1")


def test_ctl_rejects_bad_kernel_ids_and_signals(conn: HostConnection, tmp_path: Path) -> None:
    for kernel_id, host in (("..", "h1"), ("k1", ".."), ("k1", "a/b")):
        argv = ["ctl", kernel_id, "status", "--host", host, "--runtime-root", str(tmp_path)]
        p = subprocess.run([sys.executable, "-m", "gpu_kernel", *argv], capture_output=True)
        assert p.returncode == 1 and json.loads(p.stdout)["code"] == "bad_request"
    assert not any(tmp_path.iterdir())
    with pytest.raises(KernelControlError, match="invalid signal number"):
        remote.signal(conn, LOCAL, "k1", 999, str(tmp_path))
    with pytest.raises(BadRequest):
        remote.status(conn, LOCAL, "../k1", str(tmp_path))
