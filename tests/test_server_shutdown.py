"""A real Jupyter server stops cleanly, with every lease released, after a failed start.

jupyter_client keeps a failed start's kernel id in its pending list; the server's shutdown then
asked jupyter_server to shut down that unknown id, which raised "Kernel does not exist", left
the other kernels' leases held and the process hanging.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.jupyter_server import JupyterServer
from tests.pool import Pool


def test_server_stops_and_releases_every_lease_after_a_failed_start(
    pool: Pool, tmp_path: Path
) -> None:
    pool.install_spec("shared-gpu-bad", slot_kind="no-such-kind")
    server = JupyterServer(
        tmp_path / "server",
        tmp_path / "work",
        {"JUPYTER_PATH": str(pool.kernels_dir.parent), "SHARED_GPU_TOKEN": pool.user_token},
        args=("--ServerApp.jpserver_extensions={'jupyterlab': False}",),
    )
    server.start()
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
