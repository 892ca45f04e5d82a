"""A real Jupyter server (``jupyter server`` or ``jupyter lab``) as a subprocess, for tests.

``JupyterServer`` starts it on a free loopback port with a token, a root folder and the
kernelspecs of a ``Pool``; ``api()`` calls its REST API; ``stop()`` sends a signal and returns
the exit code and log. Used by the shutdown test and the browser tests.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.sshd import free_port

BIN = Path(sys.executable).parent


class JupyterServer:
    """One Jupyter server process; ``app`` is "server" or "lab"."""

    def __init__(
        self,
        base: Path,
        root: Path,
        env: dict[str, str],
        app: str = "server",
        args: tuple[str, ...] = (),
    ) -> None:
        self.base = base
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / f"jupyter-{app}.log"
        base.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        runtime = base / "jupyter-runtime"
        self.env = {
            **os.environ,
            "JUPYTER_RUNTIME_DIR": str(runtime),
            "JUPYTER_CONFIG_DIR": str(base / "jupyter-config"),
            "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
            "JUPYTERLAB_SETTINGS_DIR": str(base / "lab-settings"),
            **env,
        }
        self.argv = [
            str(BIN / "jupyter"),
            app,
            "--no-browser",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.allow_root=True",
            *args,
        ]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter {self.argv[1]} exited:\n{self.log()}")
            try:
                self.api("GET", "/api/status", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"jupyter {self.argv[1]} did not start in {timeout:.0f}s:\n{self.log()}")

    def api(
        self, method: str, path: str, body: Any = None, timeout: float = 60.0
    ) -> tuple[int, Any]:
        """(status, decoded JSON or None) of a REST call with the token."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw) if raw else None
            except ValueError:
                return err.code, raw.decode(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send ``sig``; the exit code, or None when it had not exited within ``timeout``
        (it is then killed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return None
