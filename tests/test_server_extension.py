"""A real Jupyter server with this package installed: the server extension's endpoints, and a
clean stop with every lease released after a failed start.

The endpoints are enabled by the config file the package installs (no option given here).
Before the fix, jupyter_client kept a failed start's kernel id in its pending list; the server's
shutdown then asked jupyter_server to shut down that unknown id, which raised "Kernel does not
exist", left the other kernels' leases held and the process hanging.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from jupyter_client.blocking import BlockingKernelClient

from tests.jupyter_server import JupyterServer
from tests.pool import Pool


def jupyter_server(pool: Pool, tmp_path: Path) -> JupyterServer:
    server = JupyterServer(
        tmp_path / "server",
        tmp_path / "work",
        {"JUPYTER_PATH": str(pool.kernels_dir.parent), "SHARED_GPU_TOKEN": pool.user_token},
        args=("--ServerApp.jpserver_extensions={'jupyterlab': False}",),
    )
    server.start()
    return server


def wait_for_state(server: JupyterServer, kernel_id: str, wanted: str) -> dict:
    deadline = time.monotonic() + 30
    state: dict = {}
    while time.monotonic() < deadline:
        status, state = server.api("GET", f"/shared-gpu/kernels/{kernel_id}")
        assert status == 200, state
        if state["state"] == wanted:
            return state
        time.sleep(0.2)
    pytest.fail(f"kernel {kernel_id} never became {wanted}: {state}")


def wait_until_busy(server: JupyterServer, kernel_id: str) -> None:
    deadline = time.monotonic() + 10
    while not server.api("GET", f"/shared-gpu/kernels/{kernel_id}")[1]["busy"]:
        assert time.monotonic() < deadline, "the kernel never showed busy"
        time.sleep(0.05)


def test_endpoints_show_shared_gpu_kernels_and_suspend_them(pool: Pool, tmp_path: Path) -> None:
    server = jupyter_server(pool, tmp_path)
    try:
        status, kernel = server.api("POST", "/api/kernels", {"name": "shared-gpu"})
        assert status == 201, kernel
        status, body = server.api("GET", "/shared-gpu/kernels")
        assert status == 200, body
        [state] = body["kernels"]
        assert state["kernel_id"] == kernel["id"] and state["state"] == "unattached"
        assert state["slot"] is None and not any(pool.slot_users().values())  # lazy attach

        client = BlockingKernelClient(
            connection_file=str(server.base / "jupyter-runtime" / f"kernel-{kernel['id']}.json")
        )
        client.load_connection_file()
        client.start_channels()
        client.wait_for_ready(timeout=30)
        client.execute_interactive("1", timeout=60)  # the first cell takes the slot
        [state] = server.api("GET", "/shared-gpu/kernels")[1]["kernels"]
        assert state["state"] == "running", state
        holder = {slot for slot, user in pool.slot_users().items() if user}
        assert {state["slot"]} == holder and state["host"] in ("hostA", "hostB")
        assert state["policy"]["idle_suspend_after"] == 3600
        assert state["quota"]["used_hours"] is not None
        assert "token" not in str(body).lower()  # nothing secret for the browser

        with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no state
            urllib.request.urlopen(server.url + "/shared-gpu/kernels", timeout=10)
        assert refused.value.code == 403

        status, local = server.api("POST", "/api/kernels", {"name": "python3"})
        assert status == 201, local
        assert server.api("GET", f"/shared-gpu/kernels/{local['id']}")[0] == 404
        assert len(server.api("GET", "/shared-gpu/kernels")[1]["kernels"]) == 1

        try:
            client.execute("import time; time.sleep(6)")  # still running when the POST comes
            wait_until_busy(server, kernel["id"])
            status, state = server.api("POST", f"/shared-gpu/kernels/{kernel['id']}/suspend")
            assert status == 202 and state["state"] == "running", state
            assert "a cell is running" in state["message"]
            client.get_shell_msg(timeout=30)
        finally:
            client.stop_channels()
        deadline = time.monotonic() + 10  # the cell's idle status follows its reply
        while server.api("GET", f"/shared-gpu/kernels/{kernel['id']}")[1]["busy"]:
            assert time.monotonic() < deadline, "the kernel stayed busy after its cell"
            time.sleep(0.05)

        status, state = server.api("POST", f"/shared-gpu/kernels/{kernel['id']}/suspend")
        assert status == 202, state
        state = wait_for_state(server, kernel["id"], "suspended")
        assert state["checkpoint"]["host"] in ("hostA", "hostB")
        assert state["host"] is None and state["quota"] is not None
        assert not any(pool.slot_users().values()), "a suspended kernel kept its slot"
        status, state = server.api("POST", f"/shared-gpu/kernels/{kernel['id']}/suspend")
        assert status == 202 and "nothing to suspend" in state["message"]
    finally:
        assert server.stop(signal.SIGTERM, timeout=30) is not None, server.log()[-3000:]


def test_server_stops_and_releases_every_lease_after_a_failed_start(
    pool: Pool, tmp_path: Path
) -> None:
    # a start that fails at start: eager attach (a lazy one fails in its first cell instead)
    pool.install_spec("shared-gpu", attach="eager")
    pool.install_spec("shared-gpu-bad", slot_kind="no-such-kind", attach="eager")
    server = jupyter_server(pool, tmp_path)
    try:
        status, kernel = server.api("POST", "/api/kernels", {"name": "shared-gpu"})
        assert status == 201, kernel
        status, error = server.api("POST", "/api/kernels", {"name": "shared-gpu-bad"})
        assert status == 500, error
        assert "no-such-kind" in server.log()
        assert list(pool.slot_users().values()).count(None) == 1  # the good kernel holds one
    finally:
        code = server.stop(signal.SIGTERM, timeout=30)
    log = server.log()
    assert code is not None, f"the Jupyter server hung on shutdown:\n{log[-3000:]}"
    assert "Kernel does not exist" not in log, log[-3000:]
    assert not any(pool.slot_users().values()), "a lease outlived the Jupyter server"
    assert not os.listdir(tmp_path / "work")  # nothing written into the user's folder
