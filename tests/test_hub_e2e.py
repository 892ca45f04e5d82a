"""JupyterHub end to end: hub users' "Shared GPU" kernels, leased under their hub names.

A real JupyterHub (dummy authenticator, simple local spawner) whose users' single-user servers
have the "Shared GPU" kernelspec installed with ``--jupyterhub`` (in the "user image": a prefix
on their JUPYTER_PATH), the broker as the hub's service ``gpu-broker``, sshd test hosts. Cells run
as JupyterLab runs them: the server's REST API and its kernel websocket, through the hub's proxy.
No broker token exists for any hub user: the provisioner presents the server's own hub token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.install import main as install_main
from tests.hub import TestHub, hub_available
from tests.jupyter_ws import run_cell, start_kernel
from tests.pool import Pool

GROUPS = """
[[groups]]
name = "ml101"
hub_group = "ml-101"
teacher_hub_group = "ml-101-staff"
kinds = ["sim"]
gpu_hours_per_day = 2

[[groups]]
name = "ml102"
hub_group = "ml-102"
"""

SHOW = (
    "import os\n"
    "print(os.environ['SHARED_GPU_HOST'], 'JUPYTERHUB_API_TOKEN' in os.environ, "
    "'SHARED_GPU_TOKEN' in os.environ)"
)


@dataclass
class Deployment:
    pool: Pool
    hub: TestHub
    image: Path  # the users' kernelspec prefix

    def server(self, user: str) -> str:
        return self.hub.start_server(user)

    def cell(self, user: str, kernel_id: str, code: str) -> object:
        return run_cell(f"{self.hub.url}/user/{user}", self.hub.admin_token, kernel_id, code)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, ssh_hosts, client_keys) -> Iterator[Deployment]:
    reason = hub_available()
    if reason:
        pytest.skip(reason)
    base: Path = tmp_path_factory.mktemp("hub-e2e")
    pool = Pool(base / "pool", ssh_hosts, client_keys)
    image = base / "image"
    assert (
        install_main(
            [
                "install",
                "--prefix",
                str(image),
                "--broker-url",
                pool.url,
                "--jupyterhub",
                "--lease-timeout",
                "30s",
            ]
        )
        == 0
    )
    env = {"JUPYTER_PATH": str(image / "share" / "jupyter")}
    hub = TestHub(base / "hub", pool.url, spawner_env=env)
    text = pool.config.read_text().replace("[policy]\n", "[policy]\nmembers_only = true\n", 1)
    pool.config.write_text(text + hub.identity_toml("60s") + GROUPS)
    pool.start()
    try:
        hub.start()
        for name in ("ana", "ben", "eve", "prof", "carl"):
            hub.add_user(name)
        hub.add_user("boss", admin=True)
        hub.add_group("ml-101", ["ana", "ben"])
        hub.add_group("ml-101-staff", ["prof"])
        hub.add_group("ml-102", ["carl"])
        for name in ("ana", "eve"):  # both spawn at once: each takes seconds on a busy machine
            hub.api("POST", f"/users/{name}/server")
        yield Deployment(pool, hub, image)
    finally:
        hub.stop()
        pool.close()


def test_a_students_kernel_is_leased_under_their_hub_name_with_no_broker_token(
    deployment: Deployment,
) -> None:
    spec = json.loads(
        (deployment.image / "share/jupyter/kernels/shared-gpu/kernel.json").read_text()
    )
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config["token_source"] == "jupyterhub"
    assert "token_env" not in config and "token_file" not in config

    server = deployment.server("ana")
    kernel_id = start_kernel(server, deployment.hub.admin_token)
    result = deployment.cell("ana", kernel_id, SHOW)
    assert result.status == "ok", result.text
    host, hub_token_in_kernel, broker_token_in_kernel = result.stdout.split()
    assert host in ("hostA", "hostB")
    # The server's hub token went to the broker only, never to the remote kernel.
    assert (hub_token_in_kernel, broker_token_in_kernel) == ("False", "False")

    holders = deployment.pool.slot_users()
    assert "ana" in holders.values(), holders
    leases = [lease for lease in deployment.pool.status()["leases"] if lease["user"] == "ana"]
    assert [lease["kernel_id"] for lease in leases] == [kernel_id]
    # No broker token anywhere: none was made for a hub user, none is in their home.
    listed = deployment.pool.cli("token", "list", "--config", str(deployment.pool.config)).stdout
    assert "ana" not in listed
    home = deployment.hub.base / "home" / "ana"
    assert not (home / ".config" / "jupyter-shared-gpu" / "token").exists()


def test_a_student_outside_the_class_is_refused_in_the_cell_until_the_hub_adds_them(
    deployment: Deployment,
) -> None:
    server = deployment.server("eve")
    kernel_id = start_kernel(server, deployment.hub.admin_token)
    refused = deployment.cell("eve", kernel_id, SHOW)
    assert refused.status == "error"
    assert "ml101" in refused.text and "ask your teacher" in refused.text, refused.text

    deployment.hub.add_to_group("ml-101", ["eve"])  # the teacher enrols her; no broker reload
    result = deployment.cell("eve", kernel_id, SHOW)
    assert result.status == "ok", result.text
    assert "eve" in deployment.pool.slot_users().values()
