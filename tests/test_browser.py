"""What a user sees in JupyterLab, in a real headless Chromium, with the real broker and sshd hosts.

One JupyterLab server and one browser for the module; a pool of one "sim" slot (hostA), so a
second user finds it full. Each test starts from a reset workspace and ends with every kernel
shut down. Screenshots of each step go to the folder printed at the start (CI keeps it):
$SHARED_GPU_SCREENSHOTS, else .state/browser-screenshots.

Some of these need lazy attach (a new kernel holds no lease until its first cell, with the queue
position in the cell) and the proxy's busy/idle fixes: ``test_new_notebook_holds_no_lease``,
``test_reload_with_three_notebooks_takes_no_slot``, ``test_second_user_waits_in_the_queue``
and ``test_busy_shows_for_the_whole_running_cell`` fail without them.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.client import BrokerClient
from tests.browser import (
    ROOT,
    LabPage,
    browser_missing,
    lab_server,
    open_browser,
    workspace_with_notebooks,
)
from tests.jupyter_server import JupyterServer
from tests.pool import Pool
from tests.sshd import ClientKeys, TestHost

pytestmark = pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "")


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest) -> Path:
    folder = Path(
        os.environ.get("SHARED_GPU_SCREENSHOTS") or ROOT / ".state" / "browser-screenshots"
    )
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"browser test screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def lab_pool(
    tmp_path_factory: pytest.TempPathFactory, ssh_hosts: list[TestHost], client_keys: ClientKeys
) -> Iterator[Pool]:
    """A broker over hostA only: one "sim" slot."""
    base = tmp_path_factory.mktemp("lab-pool")
    pool = Pool(base, ssh_hosts[:1], client_keys)
    pool.start()
    pool.install_spec(lease_timeout="30s")
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def lab(lab_pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    base = tmp_path_factory.mktemp("lab")
    server = lab_server(lab_pool, base, {"SHARED_GPU_RUNTIME_ROOT": str(base / "kernels")})
    yield server
    assert server.stop(signal.SIGTERM, timeout=60) is not None, server.log()[-3000:]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with open_browser(tmp_path_factory.mktemp("chromium") / "profile") as context:
        yield context


@pytest.fixture
def ui(browser: Any, lab: JupyterServer, lab_pool: Pool, shots: Path) -> Iterator[LabPage]:
    """A fresh JupyterLab page; afterwards every kernel is shut down and the slot is free."""
    page = browser.new_page()
    lab_page = LabPage(page, lab, shots)
    lab_page.open()
    yield lab_page
    page.close()
    for km in lab_pool.managers:  # another user's kernels, started from the test
        if km.has_kernel:
            km.shutdown_kernel(now=True)

    def all_gone() -> bool:
        for session in lab.api("GET", "/api/sessions")[1] or []:
            lab.api("DELETE", f"/api/sessions/{session['id']}")
        for kernel in lab.api("GET", "/api/kernels")[1] or []:
            lab.api("DELETE", f"/api/kernels/{kernel['id']}")
        return not leases(lab_pool)

    wait_until(all_gone, "every kernel to end and give its lease back", 45)


def wait_until(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"waited {timeout:.0f}s for {what}")


def expect_text(locator: Any, pattern: str, timeout: float = 15_000) -> None:
    from playwright.sync_api import expect

    expect(locator).to_contain_text(re.compile(pattern), timeout=timeout)


def leases(pool: Pool) -> list[str]:
    """Every live lease the broker knows ("granted hostA/0", "queued 1 of 2"), as an admin's
    `gpu-broker status` sees them (asked over HTTP: a CLI process per check is slow here)."""
    found = []
    with BrokerClient(pool.url, pool.admin_token) as client:
        status = client.status()
    for lease in status["leases"]:
        if lease["state"] == "granted":
            found.append(f"granted {(lease.get('slot') or {}).get('id')}")
        elif lease["state"] == "queued":
            found.append(f"queued {lease.get('position')} of {lease.get('queue_length')}")
    return found


# ---- the tests ---------------------------------------------------------------------------------


def test_launcher_shows_shared_gpu_with_its_logo(ui: LabPage) -> None:
    card = ui.card("Shared GPU")
    card.wait_for()
    logo = card.locator("img")
    assert "kernelspecs/shared-gpu/logo-svg.svg" in (logo.get_attribute("src") or "")
    ui.page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=logo.element_handle()
    )
    ui.shot("01-launcher")


def test_new_notebook_holds_no_lease(ui: LabPage, lab_pool: Pool) -> None:
    ui.new_notebook()
    expect_text(ui.status_item(), r"no GPU yet")
    ui.shot("02-new-notebook-no-lease")
    assert leases(lab_pool) == [], "opening a notebook took a GPU slot"


def test_first_cell_takes_a_slot_and_the_status_bar_says_where(ui: LabPage, lab_pool: Pool) -> None:
    ui.new_notebook()
    ui.run_cell(
        'import os; print("on", os.environ["SHARED_GPU_HOST"], os.environ["SHARED_GPU_SLOT"])'
    )
    expect_text(ui.output(0), r"on hostA hostA/0", timeout=60_000)
    expect_text(ui.status_item(), r"running on hostA slot hostA/0")
    assert leases(lab_pool) == ["granted hostA/0"]
    panel = ui.open_status_panel()
    expect_text(panel, r"hostA/0 on host hostA")
    expect_text(panel, r"suspend.*after 1h 00m idle")
    ui.shot("03-first-cell-status-panel")
    ui.page.keyboard.press("Escape")


def test_busy_shows_for_the_whole_running_cell(ui: LabPage) -> None:
    ui.new_notebook()
    ui.run_cell("1")
    expect_text(ui.output(0), r"1", timeout=60_000)
    ui.wait_kernel_status("idle")
    ui.run_cell(
        'import time\nfor i in range(3):\n    print("tick", i, flush=True); time.sleep(1)\n"done"'
    )
    ui.wait_kernel_status("busy", timeout=5000)
    ui.shot("04-busy")
    # The status first, the output after: a status read while the output still lacks the
    # result was read mid-cell (the kernel's idle follows its result; a status read just before
    # the result appears may be that idle, and is not counted).
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = ui.kernel_status()
        text = ui.output(1).inner_text()
        if "done" in text:
            break
        seen.append((status, text.strip().replace("\n", " ")))
        time.sleep(0.1)
    assert "done" in ui.output(1).inner_text()
    other = [(status, text) for status, text in seen if status != "busy"]
    assert seen and not other, f"mid-cell the kernel showed (status, output so far): {other}"
    ui.wait_kernel_status("idle")


def test_stop_button_interrupts(ui: LabPage) -> None:
    ui.new_notebook()
    ui.run_cell("import time")  # the first cell takes the slot
    expect_text(ui.status_item(), r"running on hostA", timeout=60_000)
    ui.run_cell("time.sleep(60)")
    ui.wait_kernel_status("busy", timeout=60_000)
    time.sleep(0.5)
    ui.interrupt()
    expect_text(ui.output(1), r"KeyboardInterrupt", timeout=15_000)
    ui.wait_kernel_status("idle")
    ui.shot("05-interrupted")


def test_gpu_suspend_then_a_cell_resumes(ui: LabPage, lab_pool: Pool) -> None:
    ui.new_notebook()
    ui.run_cell("x = 41")
    ui.wait_kernel_status("idle", timeout=60_000)
    expect_text(ui.status_item(), r"running on hostA")
    ui.run_cell("%gpu suspend")
    expect_text(ui.status_item(), r"suspended", timeout=30_000)
    ui.shot("06-suspended")
    assert leases(lab_pool) == [], "a suspended kernel kept its slot"
    ui.run_cell("x + 1")
    expect_text(ui.output(2), r"42", timeout=60_000)
    expect_text(ui.status_item(), r"running on hostA")
    ui.shot("07-resumed")
    panel = ui.open_status_panel()  # the panel's button does what %gpu suspend did
    panel.get_by_role("button", name="Suspend now").click()
    expect_text(ui.status_item(), r"suspended", timeout=30_000)
    expect_text(panel, r"saved state.* on hostA")
    ui.shot("08-suspended-from-the-panel")
    ui.page.keyboard.press("Escape")
    assert leases(lab_pool) == []


def test_second_user_waits_in_the_queue(ui: LabPage, lab_pool: Pool, monkeypatch) -> None:
    monkeypatch.setenv("SHARED_GPU_TOKEN", lab_pool.token("bob"))
    monkeypatch.setenv("SHARED_GPU_RUNTIME_ROOT", str(lab_pool.base / "bob-kernels"))
    bob, bob_client = lab_pool.start_kernel()
    bob_client.execute_interactive("1", timeout=60)  # another user holds the only slot
    ui.new_notebook()
    ui.run_cell('print("started")')
    expect_text(ui.output(0), r"(queued|position) 1 of 1")
    expect_text(ui.status_item(), r"queued 1 of 1")
    ui.shot("09-queued")
    bob.shutdown_kernel(now=True)
    expect_text(ui.output(0), r"started", timeout=60_000)
    expect_text(ui.status_item(), r"running on hostA")
    ui.shot("10-started-after-the-first-user-left")


def test_reload_with_three_notebooks_takes_no_slot(
    ui: LabPage, lab: JupyterServer, lab_pool: Pool
) -> None:
    names = [f"reload-{i}.ipynb" for i in range(3)]
    ui.open(workspace_with_notebooks(lab, "three", names))
    ui.page.locator(".jp-NotebookPanel").nth(2).wait_for(state="attached")
    ui.page.reload()
    ui.page.wait_for_selector("#jp-main-dock-panel", state="visible", timeout=60_000)

    def sessions() -> int:  # those of the three notebooks (a test before may leave others)
        found = lab.api("GET", "/api/sessions")[1] or []
        return sum(1 for s in found if str(s.get("path", "")).rsplit("/", 1)[-1] in names)

    deadline = time.monotonic() + 20
    while sessions() < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # a kernel that would take a lease has asked for it by now
    ui.shot("11-reloaded-three-tabs")
    assert leases(lab_pool) == [], "reloading JupyterLab took GPU slots"
    assert sessions() == 3, "the three notebooks did not get their kernels back"
