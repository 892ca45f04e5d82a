"""Run a cell in a kernel of a Jupyter server, as JupyterLab does: the server's REST API starts
the kernel, its websocket (``/api/kernels/ID/channels``, JSON messages) carries the cell.

Used by the JupyterHub end-to-end tests (tests/test_hub_e2e.py) and bench/hub_class.py, where the
server is a hub user's single-user server reached through the hub's proxy.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from dataclasses import dataclass, field

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect


@dataclass
class CellResult:
    """What a cell printed, its error (if any) and its reply's status."""

    status: str = ""
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # "ename: evalue"
    outputs: list[dict] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(part for part in (self.stdout, self.stderr, self.error) if part)


def start_kernel(server_url: str, token: str, name: str = "shared-gpu") -> str:
    """Start a kernel of kernelspec ``name`` on the server; its id."""
    request = urllib.request.Request(
        f"{server_url}/api/kernels",
        data=json.dumps({"name": name}).encode(),
        method="POST",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["id"]


def stop_kernel(server_url: str, token: str, kernel_id: str) -> None:
    """Shut the kernel down, as JupyterLab's "Shut Down Kernel" does."""
    request = urllib.request.Request(
        f"{server_url}/api/kernels/{kernel_id}",
        method="DELETE",
        headers={"Authorization": f"token {token}"},
    )
    with urllib.request.urlopen(request, timeout=60):
        pass


def run_cell(
    server_url: str, token: str, kernel_id: str, code: str, timeout: float = 90.0
) -> CellResult:
    """Run ``code`` in the kernel over the server's websocket; wait for its reply and idle."""
    return asyncio.run(_run_cell(server_url, token, kernel_id, code, timeout))


async def _run_cell(
    server_url: str, token: str, kernel_id: str, code: str, timeout: float
) -> CellResult:
    ws_url = server_url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
    conn = await websocket_connect(
        HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}, connect_timeout=30)
    )
    msg_id = uuid.uuid4().hex
    conn.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                    "date": "",
                },
                "parent_header": {},
                "metadata": {},
                "content": {"code": code, "silent": False, "store_history": True},
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    result = CellResult()

    async def read_until_done() -> None:
        replied = idle = False
        while not (replied and idle):
            raw = await conn.read_message()
            if raw is None:
                raise ConnectionError("the server closed the kernel's websocket")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "execute_reply":
                replied = True
                result.status = content.get("status", "")
                if content.get("status") == "error":
                    result.error = f"{content.get('ename')}: {content.get('evalue')}"
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
            elif kind == "stream" and content.get("name") in ("stdout", "stderr"):
                name = content["name"]
                setattr(result, name, getattr(result, name) + content.get("text", ""))
            elif kind == "error":
                result.error = f"{content.get('ename')}: {content.get('evalue')}"
            elif kind in ("execute_result", "display_data"):
                result.outputs.append(content.get("data", {}))

    try:
        await asyncio.wait_for(read_until_done(), timeout)
    finally:
        conn.close()
    return result
