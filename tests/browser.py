"""Driving a real JupyterLab in Debian's headless Chromium with Playwright (browser tests, bench).

``lab_server`` starts ``jupyter lab`` for a ``Pool`` with this checkout's built lab extension;
``open_browser`` launches ``/usr/bin/chromium`` (Playwright's own browser download is not
reachable) with a fresh profile; ``LabPage`` wraps the few things a user does and sees: the
launcher card, a cell run, the toolbar's stop button, the kernel's Busy/Idle, our status item.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.jupyter_server import JupyterServer
from tests.pool import Pool

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STATUS_ITEM = ".jp-SharedGPU-status"
SHARED_GPU_NOTEBOOK = {
    "kernelspec": {"name": "shared-gpu", "display_name": "Shared GPU", "language": "python"},
    "language_info": {"name": "python"},
}


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/test does)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is missing: `pip install -e '.[test]'` (scripts/test does)"
    return None


def lab_server(pool: Pool, base: Path, env: dict[str, str] | None = None) -> JupyterServer:
    """``jupyter lab`` on a free port whose kernelspecs are the pool's, and whose lab extension
    is this checkout's build (JUPYTER_PATH comes before the virtualenv's copy)."""
    data = base / "jupyter-data"
    (data / "labextensions").mkdir(parents=True, exist_ok=True)
    link = data / "labextensions" / "jupyter-shared-gpu"
    if not link.exists():
        link.symlink_to(ROOT / "provisioner" / "labextension")
    shutil.copytree(pool.kernels_dir, data / "kernels", dirs_exist_ok=True)
    settings = base / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"checkForUpdates": False, "fetchNews": "false"})
    )
    server = JupyterServer(
        base,
        base / "work",
        {
            "JUPYTER_PATH": str(data),
            "SHARED_GPU_TOKEN": pool.user_token,
            **(env or {}),
        },
        app="lab",
    )
    server.start()
    return server


def workspace_with_notebooks(server: JupyterServer, workspace: str, names: list[str]) -> str:
    """Write empty Shared GPU notebooks ``names`` and a JupyterLab workspace with one tab for
    each; return the page path that opens it (as a reload restores such tabs)."""
    for name in names:
        content = {"cells": [], "metadata": SHARED_GPU_NOTEBOOK, "nbformat": 4, "nbformat_minor": 5}
        body = {"type": "notebook", "format": "json", "content": content}
        status, reply = server.api("PUT", f"/api/contents/{name}", body)
        assert status in (200, 201), reply
    dock = {"type": "tab-area", "currentIndex": 0, "widgets": [f"notebook:{n}" for n in names]}
    data: dict[str, Any] = {"layout-restorer:data": {"main": {"dock": dock}}}
    for name in names:
        data[f"notebook:{name}"] = {"data": {"path": name, "factory": "Notebook"}}
    body = {"data": data, "metadata": {"id": workspace}}
    status, reply = server.api("PUT", f"/lab/api/workspaces/{workspace}", body)
    assert status == 204, reply
    return f"lab/workspaces/{workspace}"


@contextmanager
def open_browser(profile: Path) -> Iterator[Any]:
    """A Chromium context with a fresh profile in ``profile`` (deleted first)."""
    from playwright.sync_api import sync_playwright

    shutil.rmtree(profile, ignore_errors=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context
        finally:
            context.close()


class LabPage:
    """One JupyterLab tab in the browser, and what a user does there."""

    def __init__(self, page: Any, server: JupyterServer, shots: Path | None = None) -> None:
        self.page = page
        self.server = server
        self.shots = shots
        self.page.set_default_timeout(20_000)

    def open(self, path: str = "lab?reset") -> None:
        joiner = "&" if "?" in path else "?"
        self.page.goto(f"{self.server.url}/{path}{joiner}token={self.server.token}")
        self.page.wait_for_selector("#jp-main-dock-panel", state="visible", timeout=60_000)

    def shot(self, name: str) -> None:
        if self.shots is not None:
            self.page.screenshot(path=str(self.shots / f"{name}.png"))

    # ---- launcher and notebooks --------------------------------------------------------------

    def card(self, label: str) -> Any:
        return self.page.locator(f'.jp-LauncherCard[title="{label}"]').first

    def new_notebook(self, label: str = "Shared GPU") -> float:
        """Click the launcher card; seconds until the kernel is ready (its status says Idle)."""
        card = self.card(label)
        card.wait_for()
        started = time.monotonic()
        card.click()
        self.wait_kernel_status("idle", timeout=30_000)
        return time.monotonic() - started

    def kernel_status(self) -> str:
        """The current notebook's kernel status as the status bar says it ("Shared GPU | Idle"):
        "idle", "busy", "initializing", "connecting", ... or "" while there is none."""
        item = self.page.locator('.jp-StatusBar-TextItem[title^="Change kernel for"]').first
        text = item.inner_text(timeout=2000)
        return text.rsplit("|", 1)[-1].strip().lower() if "|" in text else ""

    def wait_kernel_status(self, wanted: str, timeout: float = 20_000) -> None:
        deadline = time.monotonic() + timeout / 1000
        while time.monotonic() < deadline:
            try:
                if self.kernel_status() == wanted:
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise AssertionError(f"kernel status stayed {self.kernel_status()!r}, not {wanted!r}")

    # ---- cells -------------------------------------------------------------------------------

    def _panel(self) -> Any:
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").first

    def run_cell(self, code: str) -> None:
        """Type ``code`` into the last cell and run it with Shift+Enter (a new cell follows)."""
        editor = self._panel().locator(".jp-Cell .cm-content").last
        editor.click()
        self.page.keyboard.insert_text(code)
        self.page.keyboard.press("Shift+Enter")

    def output(self, index: int) -> Any:
        """The output area of code cell ``index`` (0-based) of the current notebook."""
        return self._panel().locator(".jp-CodeCell").nth(index).locator(".jp-OutputArea")

    def interrupt(self) -> None:
        self._panel().locator('[data-command="notebook:interrupt-kernel"]').first.click()

    # ---- our status bar item -------------------------------------------------------------------

    def status_item(self) -> Any:
        return self.page.locator(STATUS_ITEM)

    def open_status_panel(self) -> Any:
        self.status_item().click()
        panel = self.page.locator(".jp-SharedGPU-panel")
        panel.wait_for()
        return panel
