"""JupyterHub end to end: hub users' "Shared GPU" kernels, leased under their hub names, and
the dashboard in a real browser.

The session's hub deployment (conftest.py ``hub_deployment``, tests/hub.py): a real JupyterHub
(dummy authenticator, simple local spawner) whose users' single-user servers have the "Shared
GPU" kernelspec installed with ``--jupyterhub`` (the "user image": a prefix on their
JUPYTER_PATH), the broker as the hub's service ``gpu-broker``, sshd test hosts. Cells run as
JupyterLab runs them: the server's REST API and its kernel websocket, through the hub's proxy.
No broker token exists for any hub user: the provisioner presents the server's own hub token.
The dashboard is driven with Playwright in Debian's chromium, signing in through the hub.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, browser_missing
from tests.hub import Deployment
from tests.jupyter_ws import CellResult, run_cell, start_kernel, stop_kernel

SHOW = (
    "import os\n"
    "print(os.environ['SHARED_GPU_HOST'], 'JUPYTERHUB_API_TOKEN' in os.environ, "
    "'SHARED_GPU_TOKEN' in os.environ)"
)


def cell(deployment: Deployment, user: str, kernel_id: str, code: str) -> CellResult:
    server = f"{deployment.hub.url}/user/{user}"
    return run_cell(server, deployment.hub.admin_token, kernel_id, code)


def shut_down(deployment: Deployment, user: str, kernel_id: str) -> None:
    """Shut the kernel down and wait until the broker has its slot back."""
    stop_kernel(f"{deployment.hub.url}/user/{user}", deployment.hub.admin_token, kernel_id)
    deadline = time.monotonic() + 20
    while user in deployment.pool.slot_users().values():
        assert time.monotonic() < deadline, "the kernel's lease was not released"
        time.sleep(0.2)


@pytest.fixture
def deployment(hub_up: Deployment) -> Deployment:
    """The session's hub deployment; the servers of ana and eve spawn at once (each takes
    seconds on a busy machine)."""
    for name in ("ana", "eve"):
        user = hub_up.hub.api("GET", f"/users/{name}")
        assert isinstance(user, dict)
        if "" not in (user.get("servers") or {}):
            hub_up.hub.api("POST", f"/users/{name}/server")
    return hub_up


def test_a_students_kernel_is_leased_under_their_hub_name_with_no_broker_token(
    deployment: Deployment,
) -> None:
    spec = json.loads(
        (deployment.image / "share/jupyter/kernels/shared-gpu/kernel.json").read_text()
    )
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config["token_source"] == "jupyterhub"
    assert "token_env" not in config and "token_file" not in config

    server = deployment.hub.start_server("ana")
    kernel_id = start_kernel(server, deployment.hub.admin_token)
    try:
        check_ana_s_kernel(deployment, kernel_id)
    finally:
        shut_down(deployment, "ana", kernel_id)


def check_ana_s_kernel(deployment: Deployment, kernel_id: str) -> None:
    result = cell(deployment, "ana", kernel_id, SHOW)
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
    server = deployment.hub.start_server("eve")
    kernel_id = start_kernel(server, deployment.hub.admin_token)
    try:
        refused = cell(deployment, "eve", kernel_id, SHOW)
        assert refused.status == "error"
        assert "ml101" in refused.text and "ask your teacher" in refused.text, refused.text

        deployment.hub.add_to_group("ml-101", ["eve"])  # the teacher enrols her; no reload
        result = cell(deployment, "eve", kernel_id, SHOW)
        assert result.status == "ok", result.text
        assert "eve" in deployment.pool.slot_users().values()
    finally:
        deployment.hub.remove_from_group("ml-101", ["eve"])
        shut_down(deployment, "eve", kernel_id)


# -- the dashboard in a real browser (Playwright driving Debian's chromium) -----------------------

@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's chromium, driven by Playwright; each test signs in in a fresh context."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@contextmanager
def browser_page(chromium: Any) -> Iterator[Any]:
    """A page of a new browser context (no cookies from other tests)."""
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
    finally:
        context.close()


def sign_in_through_the_hub(page: Any, deployment: Deployment, user: str) -> None:
    """Open the broker's page through the hub's proxy; the hub's login form; back, signed in."""
    page.goto(f"{deployment.hub.url}/services/gpu-broker/dashboard/")
    page.fill("#username_input", user)
    page.fill("#password_input", "any")
    page.click("#login_submit")
    page.wait_for_url("**/services/gpu-broker/dashboard/")
    page.wait_for_selector("header span")


def test_a_teachers_dashboard_shows_their_class_and_not_another(
    hub_up: Deployment, chromium: Any
) -> None:
    deployment = hub_up
    with browser_page(chromium) as page:
        sign_in_through_the_hub(page, deployment, "prof")
        assert page.inner_text("header span") == "prof · teacher"
        assert page.locator("section.class h2").all_inner_texts() == ["Class ml101"]
        students = page.locator("#class-ml101 td:first-child").all_inner_texts()
        assert {"ana", "ben"} <= set(students) and "carl" not in students
        assert page.locator("#class-ml101 svg.plot").count() == 1
        assert page.locator("#hosts").count() == 0  # the pool is the admins'
        cookie = next(c for c in page.context.cookies() if c["name"] == "gpu_broker_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_the_admin_drains_a_host_from_the_page(hub_up: Deployment, chromium: Any) -> None:
    deployment = hub_up
    with browser_page(chromium) as page:
        sign_in_through_the_hub(page, deployment, "boss")
        assert page.inner_text("header span") == "boss · admin"
        row = page.locator("#hosts tr", has_text="hostB")
        row.get_by_role("link", name="Drain").click()
        page.get_by_role("button", name="Yes, drain hostB").click()
        page.wait_for_selector("text=Host hostB drained.")
        hosts = {h["name"]: h for h in deployment.pool.status()["hosts"]}
        assert hosts["hostB"]["drained"] is True
        page.locator("#hosts tr", has_text="hostB").get_by_role("link", name="Undrain").click()
        page.get_by_role("button", name="Yes, undrain hostB").click()
        page.wait_for_selector("text=Host hostB undrained.")
        hosts = {h["name"]: h for h in deployment.pool.status()["hosts"]}
        assert hosts["hostB"]["drained"] is False
