"""A real JupyterHub for the tests: the hub from PyPI, its proxy ``configurable-http-proxy`` from
npm (``scripts/test`` installs it), the dummy authenticator and the simple local spawner.

``TestHub`` writes a ``jupyterhub_config.py`` with the broker registered as the service
``gpu-broker`` (the snippet of docs/jupyterhub.md: its token, its OAuth callback, the scopes it
needs, ``access:services!service=gpu-broker`` for users and their servers' tokens), plus a
``test-admin`` service whose token the tests use to make users, groups, tokens and servers.
``start_deployment`` adds the broker (``tests.pool.Pool``) and the users' kernelspec; conftest.py's
``hub_deployment`` fixture shares one for the session (tests/test_hub_identity.py,
tests/test_hub_e2e.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.pool import Pool
from tests.sshd import free_port

BIN = Path(sys.executable).parent
SERVICE = "gpu-broker"
LAB_EXTENSIONS = ("jupyterlab", "jupyter_lsp", "notebook_shim", "jupyter_server_terminals")


def hub_available() -> str | None:
    """Why a real hub cannot run here, or None when it can."""
    if not (BIN / "jupyterhub").exists():
        return "jupyterhub is not installed (pip install -e '.[test]')"
    if shutil.which("configurable-http-proxy") is None:
        return "configurable-http-proxy is missing (scripts/test installs it from npm)"
    return None


class TestHub:
    """One running JupyterHub (proxy on ``url``), the broker at ``broker_url`` its service."""

    __test__ = False  # not a test class

    def __init__(
        self,
        base: Path,
        broker_url: str,
        spawner_env: dict[str, str] | None = None,
        spawn_timeout: int = 60,
    ) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hub_url = f"http://127.0.0.1:{self.hub_port}"  # the hub itself, not its proxy
        self.broker_url = broker_url
        self.service_token = secrets.token_hex(32)
        self.admin_token = secrets.token_hex(32)
        self.token_file = base / "hub-token"
        self.token_file.write_text(self.service_token + "\n")
        self.token_file.chmod(0o600)
        # Users' servers load no UI extension: the tests talk to their REST API and websockets,
        # and each extension costs seconds of start-up on a busy 2-core machine.
        config_dir = base / "jupyter-config"
        config_dir.mkdir(exist_ok=True)
        off = dict.fromkeys(LAB_EXTENSIONS, False)
        (config_dir / "jupyter_server_config.json").write_text(
            json.dumps({"ServerApp": {"jpserver_extensions": off}})
        )
        self.spawner_env = {"JUPYTER_CONFIG_DIR": str(config_dir), **(spawner_env or {})}
        self.spawn_timeout = spawn_timeout
        self.proc: subprocess.Popen | None = None
        self.config = base / "jupyterhub_config.py"
        self.config.write_text(self._config_text())

    def identity_toml(self, cache_time: str = "60s") -> str:
        """The broker config's ``[identity]`` for this hub."""
        return (
            "\n[identity]\n"
            f'jupyterhub = {{ url = "{self.hub_url}", public_url = "{self.url}", '
            f'api_token_file = "{self.token_file}", cache_time = "{cache_time}" }}\n'
        )

    def _config_text(self) -> str:
        callback = f"{self.url}/services/{SERVICE}/dashboard/oauth_callback"
        env = {"PATH": os.environ.get("PATH", ""), **self.spawner_env}
        return f"""
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {self.port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {self.hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = {str(self.base / "proxy.pid")!r}
c.JupyterHub.db_url = "sqlite:///" + {str(self.base / "jupyterhub.sqlite")!r}
c.JupyterHub.cookie_secret_file = {str(self.base / "cookie_secret")!r}
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {str(self.base / "home" / "{username}")!r}
c.Spawner.cmd = [{str(BIN / "jupyterhub-singleuser")!r}]
c.Spawner.args = {["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []!r}
c.Spawner.environment = {env!r}
c.Spawner.start_timeout = {self.spawn_timeout}
c.Spawner.http_timeout = {self.spawn_timeout}
c.JupyterHub.cleanup_servers = True
c.JupyterHub.log_level = "WARN"

# The broker as an external service (docs/jupyterhub.md has this snippet)
c.JupyterHub.services = [
    {{
        "name": {SERVICE!r},
        "url": {self.broker_url!r},
        "api_token": {self.service_token!r},
        "oauth_redirect_uri": {callback!r},
        "oauth_no_confirm": True,
    }},
    {{"name": "test-admin", "api_token": {self.admin_token!r}}},
]
c.JupyterHub.load_roles = [
    {{"name": {SERVICE!r}, "services": [{SERVICE!r}], "scopes": ["read:groups"]}},
    {{"name": "user", "scopes": ["self", "access:services!service={SERVICE}"]}},
    {{"name": "admin", "services": ["test-admin"]}},
]
c.Spawner.server_token_scopes = [
    "users:activity!user", "access:servers!server", "access:services!service={SERVICE}",
]
"""

    # -- life ----------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.base / "jupyterhub.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [str(BIN / "jupyterhub"), "-f", str(self.config)],
            cwd=self.base,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.base / "jupyterhub.log").read_text()[-4000:])
            try:
                urllib.request.urlopen(self.url + "/hub/api/", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("JupyterHub did not start:\n" + self.log_tail())

    def stop(self) -> None:
        """Stop the hub and its proxy (a signal to the whole process group), then any user's
        server still running (the spawner starts each in its own session, and a hub that was
        killed leaves them behind)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        self._end_user_servers()

    def _end_user_servers(self) -> None:
        """SIGTERM what the hub left running: the single-user servers its spawner started
        (their environment names this hub's JUPYTER_CONFIG_DIR) and a proxy it adopted after
        a crash (a restarted hub reuses the running proxy and does not stop it)."""
        marker = f"JUPYTER_CONFIG_DIR={self.base / 'jupyter-config'}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if b"jupyterhub-singleuser" in cmdline:
                    if marker not in (entry / "environ").read_bytes().split(b"\0"):
                        continue
                elif b"configurable-http-proxy" in cmdline:
                    if Path(os.readlink(entry / "cwd")) != self.base:
                        continue
                else:
                    continue
                os.kill(int(entry.name), signal.SIGTERM)
            except OSError:
                continue

    def kill(self) -> None:
        """The hub and its proxy die at once (SIGKILL), as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def log_tail(self) -> str:
        path = self.base / "jupyterhub.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # -- the hub's REST API, as the test admin --------------------------------------------------

    def api(self, method: str, path: str, body: object = None, token: str | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.hub_url}/hub/api{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {token or self.admin_token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def add_user(self, name: str, admin: bool = False) -> None:
        self.api("POST", f"/users/{urllib.parse.quote(name, safe='')}", {"admin": admin})

    def add_group(self, name: str, users: list[str]) -> None:
        self.api("POST", f"/groups/{name}", {"users": users})

    def add_to_group(self, group: str, users: list[str]) -> None:
        self.api("POST", f"/groups/{group}/users", {"users": users})

    def remove_from_group(self, group: str, users: list[str]) -> None:
        self.api("DELETE", f"/groups/{group}/users", {"users": users})

    def user_token(self, name: str, scopes: list[str] | None = None) -> str:
        """A new API token of ``name`` (by default with the scope to use the broker)."""
        body = {"scopes": scopes or [f"access:services!service={SERVICE}"], "note": "test"}
        reply = self.api("POST", f"/users/{urllib.parse.quote(name, safe='')}/tokens", body)
        assert isinstance(reply, dict)
        return reply["token"]

    def start_server(self, name: str, timeout: float = 60.0) -> str:
        """Start ``name``'s single-user server (again, if a spawn failed); its URL through the
        proxy once it is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            user = self.api("GET", f"/users/{name}")
            assert isinstance(user, dict)
            server = (user.get("servers") or {}).get("")
            if server and server.get("ready"):
                return f"{self.url}/user/{name}"
            if server is None:  # neither running nor starting
                self.api("POST", f"/users/{name}/server")
            time.sleep(0.3)
        raise RuntimeError(f"the server of {name} did not start:\n" + self.log_tail())


# -- a whole deployment: broker + hub + the users' kernelspec, shared by the hub tests -----------

CLASS_GROUPS = """
[[groups]]
name = "ml101"
hub_group = "ml-101"
teacher_hub_group = "ml-101-staff"
kinds = ["sim"]
gpu_hours_per_day = 2

[[groups]]
name = "ml102"
hub_group = "ml-102"
teachers = ["prof2"]
"""
CACHE_TIME = 4.0  # short, so that the hub-down test waits little
STUDENTS = {"ml-101": ["ana", "ben"], "ml-101-staff": ["prof"], "ml-102": ["carl"]}
OUTSIDERS = ["eve", "dan", "ana@uni.edu"]


@dataclass
class Deployment:
    """A broker (``pool``) registered as the ``hub``'s service, ``[policy] members_only``, the
    classes of ``CLASS_GROUPS`` bound to hub groups, and the users' "Shared GPU" kernelspec
    installed with ``--jupyterhub`` under ``image`` (on their servers' JUPYTER_PATH)."""

    pool: Pool
    hub: TestHub
    image: Path

    def ensure_hub(self) -> None:
        """Start the hub again if a test stopped it."""
        if self.hub.proc is None:
            self.hub.start()

    def close(self) -> None:
        self.hub.stop()
        self.pool.close()


def start_deployment(base: Path, hosts: list, keys: object) -> Deployment:
    from provisioner.install import main as install_main

    pool = Pool(base / "pool", hosts, keys)  # type: ignore[arg-type]
    image = base / "image"
    args = ["install", "--prefix", str(image), "--broker-url", pool.url, "--jupyterhub"]
    assert install_main([*args, "--lease-timeout", "30s"]) == 0
    hub = TestHub(base / "hub", pool.url, {"JUPYTER_PATH": str(image / "share" / "jupyter")})
    text = pool.config.read_text().replace("[policy]\n", "[policy]\nmembers_only = true\n", 1)
    pool.config.write_text(text + hub.identity_toml(f"{CACHE_TIME:g}s") + CLASS_GROUPS)
    pool.start()  # first: the hub waits for its services to answer
    deployment = Deployment(pool, hub, image)
    try:
        hub.start()
        for name in [*(n for users in STUDENTS.values() for n in users), *OUTSIDERS]:
            hub.add_user(name)
        hub.add_user("boss", admin=True)
        for group, users in STUDENTS.items():
            hub.add_group(group, users)
    except BaseException:
        deployment.close()
        raise
    return deployment
