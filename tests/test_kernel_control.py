"""GPUKernel's control messages, orphan watchdog and %gpu magics: real kernels launched on this
machine (a "local" host) with the fake NVML, real ZMQ, a jupyter_client on the control channel."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from gpu_kernel import remote
from gpu_kernel.checkpoint import blob_store
from gpu_kernel.control import KernelActivity, KernelBusy, orphan_grace
from gpu_kernel.kernelapp import SUSPENDED_EXIT_CODE
from gpu_kernel.magics import status_lines
from gpu_kernel.protocol import RESTORE_PENDING_ENV, LaunchReply, LaunchRequest
from gpu_kernel.ssh import HostConnection, connect
from tests import fake_nvml
from tests.test_launcher import LOCAL, client_for, make_request, run_code, wait_for

GiB = fake_nvml.GiB
GPU = "GPU-12345678-1111-2222-3333-444444444444"
MIG = "MIG-87654321-1111-2222-3333-444444444444"

Launch = Callable[..., tuple[LaunchRequest, LaunchReply]]


@pytest.fixture
def conn() -> Iterator[HostConnection]:
    with connect(LOCAL) as c:
        yield c


@pytest.fixture
def launch(conn: HostConnection, tmp_path: Path) -> Iterator[Launch]:
    """Launch kernels with the fake NVML (a GPU and a MIG slice) and the orphan watchdog off
    unless ``grace`` is given; every one is cleaned up at the end."""
    nvml_env = fake_nvml.write_config(
        tmp_path / "nvml.json",
        [
            fake_nvml.a100(
                GPU,
                mig=[{"profile": "1g.10gb", "uuid": MIG, "memory_total": 10 * GiB}],
            )
        ],
    )
    started: list[LaunchRequest] = []

    def _launch(
        grace: str = "0", extra_env: dict[str, str] | None = None, **kw: Any
    ) -> tuple[LaunchRequest, LaunchReply]:
        env = dict(nvml_env, SHARED_GPU_ORPHAN_GRACE=grace, **(extra_env or {}))
        kw.setdefault("cuda_visible_devices", GPU)
        req = make_request(tmp_path / "rt", env=env, **kw)
        started.append(req)
        return req, remote.launch(conn, LOCAL, req)

    yield _launch
    for req in started:
        remote.cleanup(conn, LOCAL, req.kernel_id, runtime_root=req.runtime_root)


def control(kc: BlockingKernelClient, msg_type: str, content: dict, timeout: float = 30) -> dict:
    """Send ``msg_type`` on the control channel; returns its reply's content."""
    msg = kc.session.msg(msg_type, content)
    kc.control_channel.send(msg)
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            assert reply["msg_type"] == msg_type.replace("_request", "") + "_reply" or (
                reply["msg_type"] == "shared_gpu_info_reply"
            )
            return reply["content"]


def rdir_of(req: LaunchRequest) -> Path:
    return Path(req.runtime_root or "") / req.host_name / req.kernel_id


def exited(conn: HostConnection, req: LaunchRequest, timeout: float = 15) -> int | None:
    """Wait for the kernel to exit; returns its exit code."""
    wait_for(lambda: not remote.status(conn, LOCAL, req.kernel_id, req.runtime_root).alive, timeout)
    return remote.status(conn, LOCAL, req.kernel_id, req.runtime_root).exit_code


def shared_gpu_info() -> dict:
    """What the proxy pushes every heartbeat (lease, policy, queue, quota)."""
    now = time.time()
    return {
        "lease": {"id": "L-17", "granted_at": now - 125},
        "policy": {"idle_suspend_after": 900, "idle_suspend_when_queued": 30},
        "queue": {"length": 0},
        "quota": {"used_hours": 1.25, "limit_hours": 2, "resets_at": now + 3600},
    }


def test_usage_request_and_gpu_magic(launch: Launch) -> None:
    req, reply = launch()
    kc = client_for(reply)
    try:
        usage = control(kc, "usage_request", {})
        assert usage["pid"] == reply.pid and "kernel_memory" in usage  # ipykernel's fields stay
        assert usage["gpu"] == {
            "device": GPU,
            "name": "NVIDIA A100-SXM4-40GB",
            "mig": False,
            "memory_used": 3 * GiB,
            "memory_total": 40 * GiB,
            "utilization": 37,
            "process_memory": 2 * GiB,  # the fake's "self": the kernel's own pid
        }
        shared = usage["shared_gpu"]
        assert (shared["host"], shared["slot"], shared["busy"]) == (
            req.host_name,
            req.slot_id,
            False,
        )
        assert abs(shared["last_activity"] - time.time()) < 60

        _, out = run_code(kc, "%gpu")
        assert f"slot {req.slot_id} on host {req.host_name}" in out and f"device:     {GPU}" in out
        for line in ("lease age:  unknown", "suspend:    unknown", "queue:      unknown"):
            assert line in out
        assert "quota:      unknown" in out
        assert "memory 3.0 GiB of 40.0 GiB used (2.0 GiB by this kernel), utilization 37%" in out

        assert control(kc, "shared_gpu_info", shared_gpu_info()) == {"status": "ok"}
        _, out = run_code(kc, "%gpu")
        assert "lease age:  2m 0" in out and "lease L-17" in out
        assert "suspend:    after 15m 00s idle (30s while others wait); 15m 00s left" in out
        assert "queue:      0 waiting" in out
        assert "quota:      1.25 GPU-hours used of 2 today; resets in 1h 00m" in out or (
            "resets in 59m" in out
        )
        _, out = run_code(kc, "%gpu resume")
        assert out.strip() == f"already running on {req.host_name}/{req.slot_id}"
        _, out = run_code(kc, "%gpu nonsense")
        assert "usage: %gpu" in out
        usage = control(kc, "usage_request", {})
        assert usage["shared_gpu"]["busy"] is False
    finally:
        kc.stop_channels()


def test_mig_slot_usage_has_no_utilization(launch: Launch) -> None:
    _, reply = launch(cuda_visible_devices=MIG)
    kc = client_for(reply)
    try:
        gpu = control(kc, "usage_request", {})["gpu"]
        assert gpu["device"] == MIG and gpu["mig"] and gpu["utilization"] is None
        assert gpu["name"].endswith("MIG 1g.10gb") and gpu["memory_total"] == 10 * GiB
    finally:
        kc.stop_channels()


def test_suspend_then_restore_in_a_new_kernel(launch: Launch, conn: HostConnection) -> None:
    req, reply = launch()
    kc = client_for(reply)
    try:
        code = (
            "import os, collections\n"
            "x = 41\nwords = ['a', 'b']\nsquare = lambda v: v * v\n"
            "class Point:\n    def __init__(self, x): self.x = x\n"
            "p = Point(3)\nf = open(os.devnull)\n"
            f"os.chdir({str(rdir_of(req))!r})\n"
        )
        assert run_code(kc, code)[0]["status"] == "ok"
        assert run_code(kc, "x += 1")[0]["execution_count"] == 2
        sus = control(kc, "suspend_request", {"reason": "idle"})
    finally:
        kc.stop_channels()
    assert sus["status"] == "ok", sus
    assert sus["checkpoint"] == str(rdir_of(req) / "checkpoint")
    assert {"x", "words", "square", "Point", "p"} <= set(sus["saved"])
    assert sus["bytes"] > 0 and sus["seconds"] >= 0
    assert [d["name"] for d in sus["dropped"]] == ["f"] and sus["dropped"][0]["reason"]
    assert exited(conn, req) == SUSPENDED_EXIT_CODE == 75
    assert (rdir_of(req) / "exit_code").read_text().strip() == "75"
    assert (rdir_of(req) / "checkpoint").is_dir()

    # The same kernel id and key, started again (anywhere): restore, and go on counting.
    _, reply2 = launch(kernel_id=req.kernel_id)
    kc = client_for(reply2)
    try:
        res = control(kc, "restore_request", {"checkpoint": sus["checkpoint"]})
        assert res["status"] == "ok", res
        assert {"x", "words", "square", "Point", "p"} <= set(res["restored"])
        assert res["execution_count"] == 3 and res["bytes"] == sus["bytes"]
        assert [d["name"] for d in res["dropped"]] == ["f"]
        content, out = run_code(
            kc, "print(x, words, square(4), p.x, type(p).__name__, os.getcwd(), 'f' in dir())"
        )
        assert out.split() == [
            "42",
            "['a',",
            "'b']",
            "16",
            "3",
            "Point",
            str(rdir_of(req)),
            "False",
        ]
        assert content["execution_count"] == 3
    finally:
        kc.stop_channels()


def saved_kernel(launch: Launch, conn: HostConnection, code: str, reason: str) -> LaunchRequest:
    """Launch a kernel, run ``code`` in it, suspend it (``reason``); its request, once it has
    exited with 75 and left its checkpoint in its runtime dir."""
    req, reply = launch()
    kc = client_for(reply)
    try:
        run_code(kc, code)
        assert control(kc, "suspend_request", {"reason": reason})["status"] == "ok"
    finally:
        kc.stop_channels()
    assert exited(conn, req) == 75
    return req


def test_tampered_or_foreign_checkpoint_is_refused(launch: Launch, conn: HostConnection) -> None:
    req = saved_kernel(launch, conn, "secret = 'abc' * 1000", "test")
    ckpt = rdir_of(req) / "checkpoint"

    # Another kernel id (so another key would be normal): a foreign key is refused.
    _, reply2 = launch(key="another-key")
    kc = BlockingKernelClient()
    info = {f"{n}_port": p for n, p in reply2.ports.items()}
    kc.load_connection_info(dict(info, ip="127.0.0.1", transport="tcp", key="another-key"))
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=20)
        res = control(kc, "restore_request", {"checkpoint": str(ckpt)})
        assert res["status"] == "error" and res["ename"] == "CheckpointError"
        assert res["evalue"]
    finally:
        kc.stop_channels()

    # The right key but a changed file: refused before anything is unpickled; kernel fine.
    body = json.loads((ckpt / "manifest.json").read_bytes())["manifest"]
    digest, _ = max(body["blobs"], key=lambda b: b[1])  # its biggest blob, in the owner's store
    victim = blob_store(ckpt, body["store"]).path(digest)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    _, reply3 = launch(kernel_id=req.kernel_id)
    kc = client_for(reply3)
    try:
        res = control(kc, "restore_request", {})
        assert res["status"] == "error" and res["ename"] == "CheckpointError", res
        assert "secret" not in run_code(kc, "print(sorted(k for k in dir() if k == 'secret'))")[1]
        missing = control(kc, "restore_request", {"checkpoint": str(ckpt) + "-nope"})
        assert missing["status"] == "error"
        assert run_code(kc, "print(1 + 1)")[1].strip() == "2"
    finally:
        kc.stop_channels()


def test_orphan_watchdog_waits_for_the_cell_then_suspends(
    launch: Launch, conn: HostConnection, tmp_path: Path
) -> None:
    req, reply = launch(grace="1.5")
    kc = client_for(reply)
    go = tmp_path / "go"  # the cell runs until the test has looked (not a sleep it may outlast)
    try:
        for _ in range(6):  # the proxy's keepalive holds it off
            assert control(kc, "shared_gpu_info", {})["status"] == "ok"
            time.sleep(0.5)
        assert remote.status(conn, LOCAL, req.kernel_id, req.runtime_root).alive
        run_code(kc, "y = 7")
        msg_id = kc.execute(
            f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)\nz = 8"
        )
        time.sleep(2.5)  # past the grace, but a cell runs: no suspend
        assert remote.status(conn, LOCAL, req.kernel_id, req.runtime_root).alive
        busy = control(kc, "suspend_request", {"reason": "idle"})  # raced with a new cell
        assert busy["status"] == "error" and busy["ename"] == "KernelBusy"
        go.touch()
        reply_msg = kc.get_shell_msg(timeout=10)
        assert reply_msg["parent_header"]["msg_id"] == msg_id
        assert reply_msg["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
    assert exited(conn, req, timeout=10) == 75
    manifest = json.loads((rdir_of(req) / "checkpoint" / "manifest.json").read_text())
    assert "z" in json.dumps(manifest) and "y" in json.dumps(manifest)


def test_a_kernel_orphaned_before_its_restore_keeps_the_saved_state(
    launch: Launch, conn: HostConnection
) -> None:
    """A resume on the same host launches the new kernel in the runtime dir that holds the
    checkpoint. If its proxy goes quiet before the restore (a tunnel lost mid-resume), the
    watchdog must not save the still-empty namespace over the user's state: it exits, and the
    next resume finds every variable."""
    req = saved_kernel(launch, conn, "kept = 41", "idle")

    req2, reply2 = launch(grace="1", kernel_id=req.kernel_id, extra_env={RESTORE_PENDING_ENV: "1"})
    kc = client_for(reply2)
    try:
        assert control(kc, "shared_gpu_info", shared_gpu_info())["status"] == "ok"
        fenced = control(kc, "suspend_request", {"reason": "idle"})  # nor when asked to
        assert fenced["status"] == "error" and fenced["ename"] == "RestorePending"
    finally:
        kc.stop_channels()  # the proxy goes quiet: orphaned after 1 s
    assert exited(conn, req2) == 75
    assert "orphaned before its saved state was restored" in (
        rdir_of(req2) / "kernel.log"
    ).read_text()

    req3, reply3 = launch(kernel_id=req.kernel_id, extra_env={RESTORE_PENDING_ENV: "1"})
    kc = client_for(reply3)
    try:
        restored = control(kc, "restore_request", {})
        assert restored["status"] == "ok" and restored["restored"] == ["kept"]
        assert run_code(kc, "print(kept + 1)")[1].strip() == "42"
        # restored: from now on a suspend saves (the state is the user's again)
        assert control(kc, "suspend_request", {"reason": "idle"})["status"] == "ok"
    finally:
        kc.stop_channels()
    assert exited(conn, req3) == 75


def test_gpu_suspend_magic(launch: Launch, conn: HostConnection) -> None:
    req, reply = launch()
    kc = client_for(reply)
    try:
        content, out = run_code(kc, "kept = {'a': 1}\n%gpu suspend\nafter = 2")
        assert content["status"] == "ok"
        assert "Suspending when this cell finishes" in out
        assert f"saved to {rdir_of(req) / 'checkpoint'}" in out and "Suspended:" in out
    finally:
        kc.stop_channels()
    assert exited(conn, req) == 75
    assert (rdir_of(req) / "checkpoint").is_dir()


def test_activity_state_rules() -> None:
    act = KernelActivity(host="h", slot="h/0")
    assert act.cell_started()
    with pytest.raises(KernelBusy):
        act.begin_suspend()
    act.begin_suspend(from_cell=True)  # %gpu suspend inside the running cell
    assert not act.cell_started()  # nothing new starts once a checkpoint is under way
    act.abort_suspend()
    act.cell_finished()
    act.begin_restore()
    with pytest.raises(KernelBusy):
        act.begin_suspend()
    act.end_restore()
    act.last_control -= 10
    act.watchdog_armed = False  # no SHARED_GPU_ORPHAN_GRACE and no shared_gpu_info yet
    assert not act.orphaned(5)
    act.set_info({})
    assert act.orphaned(5) and not act.orphaned(0) and not act.orphaned(20)
    from gpu_kernel import protocol

    assert SUSPENDED_EXIT_CODE == protocol.SUSPENDED_EXIT_CODE  # what fencing recognises
    assert orphan_grace({}) == 120 and orphan_grace({"SHARED_GPU_ORPHAN_GRACE": "0"}) == 0
    assert orphan_grace({"SHARED_GPU_ORPHAN_GRACE": "2.5"}) == 2.5
    assert orphan_grace({"SHARED_GPU_ORPHAN_GRACE": "soon"}) == 120
    lines = status_lines(
        "h",
        "h/0",
        "0",
        0.0,
        100.0,
        {
            "queue": {"length": 3},
            "policy": {"idle_suspend_after": 900, "idle_suspend_when_queued": 30},
        },
        None,
        110.0,
    )
    text = "\n".join(lines)
    assert "suspend:    after 15m 00s idle (30s while others wait, as now); 20s left" in text
    assert "queue:      3 waiting" in text and "no NVML figures" in text
