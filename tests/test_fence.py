"""The fencing command on this machine (as the broker runs it for a "local" host): real kernels,
real signals. A fenced kernel saves its namespace before it ends (SAVE_SIGNAL, exit 75), also
when a cell was running; one that does not save within the grace is killed; the command refuses
anything but its four requests, and kernels it cannot prove are the named owner's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpu_kernel import remote
from gpu_kernel.checkpoint import load_namespace
from gpu_kernel.protocol import SUSPENDED_EXIT_CODE, LaunchReply, LaunchRequest
from gpu_kernel.ssh import connect
from tests.test_launcher import KEY, LOCAL, client_for, make_request, run_code

Launch = Callable[[], tuple[LaunchRequest, LaunchReply]]
STUBBORN_CELL = """
import time
while True:
    try:
        time.sleep(60)
    except BaseException:
        pass
"""


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start real kernels on this machine (runtime root ``tmp_path``); all cleaned up after."""
    started: list[LaunchRequest] = []
    with connect(LOCAL) as conn:

        def start() -> tuple[LaunchRequest, LaunchReply]:
            request = make_request(tmp_path)
            started.append(request)
            return request, remote.launch(conn, LOCAL, request)

        yield start
        for request in started:
            remote.cleanup(conn, LOCAL, request.kernel_id, runtime_root=request.runtime_root)


def run_fence(
    root: Path | None, *words: str, env: dict[str, str] | None = None
) -> tuple[int, dict]:
    """``python -m gpu_kernel fence`` as the broker runs it for a local host (``--as-self``, the
    words on the command line), or with the words in ``env``'s ``SSH_ORIGINAL_COMMAND``, as sshd
    runs a forced command; returns the exit status and the JSON line."""
    argv = [sys.executable, "-m", "gpu_kernel", "fence", "--as-self"]
    if root is not None:
        argv += ["--runtime-root", str(root)]
    result = subprocess.run(
        [*argv, *words],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_a_fenced_kernel_saves_its_namespace_then_ends(launch: Launch, tmp_path: Path) -> None:
    request, reply = launch()
    kc = client_for(reply)
    try:
        run_code(kc, "x = 41 + 1\nimport collections\nd = collections.Counter('aab')")
    finally:
        kc.stop_channels()
    code, result = run_fence(tmp_path, "fence", LOCAL.name, request.kernel_id, request.owner, "20")
    assert code == 0 and result["ok"] and result["found"], result
    assert result["alive"] is False and result["exit_code"] == SUSPENDED_EXIT_CODE  # not 143
    checkpoint = result["checkpoint"]
    assert checkpoint["path"] == str(tmp_path / LOCAL.name / request.kernel_id / "checkpoint")
    assert checkpoint["bytes"] > 0
    namespace, _ = load_namespace(Path(checkpoint["path"]), KEY.encode())
    assert namespace["x"] == 42 and namespace["d"]["a"] == 2


def test_a_running_cell_finishes_before_the_save(launch: Launch, tmp_path: Path) -> None:
    request, reply = launch()
    kc = client_for(reply)
    done: list[dict] = []
    cell = threading.Thread(
        target=lambda: done.append(run_code(kc, "import time; time.sleep(1.5); y = 'after'")[0])
    )
    try:
        cell.start()
        time.sleep(0.5)  # the cell is running when the fence comes
        t0 = time.monotonic()
        code, result = run_fence(
            tmp_path, "fence", LOCAL.name, request.kernel_id, request.owner, "30"
        )
        waited = time.monotonic() - t0
        cell.join(10)
    finally:
        kc.stop_channels()
    assert code == 0 and result["exit_code"] == SUSPENDED_EXIT_CODE, result
    assert done and done[0]["status"] == "ok"  # the cell was not cut short
    assert waited >= 0.8
    namespace, _ = load_namespace(Path(result["checkpoint"]["path"]), KEY.encode())
    assert namespace["y"] == "after"


def test_a_kernel_that_does_not_save_in_time_is_killed(launch: Launch, tmp_path: Path) -> None:
    request, reply = launch()
    kc = client_for(reply)
    try:
        # a cell that swallows everything, SIGTERM's SystemExit included: only SIGKILL ends it
        kc.execute(STUBBORN_CELL)
        time.sleep(0.5)
        code, result = run_fence(
            tmp_path, "fence", LOCAL.name, request.kernel_id, request.owner, "0.5"
        )
    finally:
        kc.stop_channels()
    assert code == 0 and result["alive"] is False, result
    assert result["exit_code"] != SUSPENDED_EXIT_CODE and result["checkpoint"] is None


@pytest.mark.parametrize(
    "command, code",
    [
        ("", "no_command"),
        ("sh -c id", "unknown_command"),
        ("cat /etc/shadow", "unknown_command"),
        ("fence hostA ../../etc alice 5", "bad_request"),
        ("fence hostA k1 alice;reboot 5", "bad_request"),
        ("fence ../x k1 alice 5", "bad_request"),
        ("fence hostA k1 alice 9999", "bad_request"),
        ("status hostA k1", "bad_request"),
        ("cleanup hostA k1 -rf", "bad_request"),
    ],
)
def test_the_forced_command_refuses_anything_else(command: str, code: str) -> None:
    status, result = run_fence(None, env={"SSH_ORIGINAL_COMMAND": command})
    assert status == 1 and result["ok"] is False and result["code"] == code, result


def test_a_kernel_of_another_owner_is_left_alone(launch: Launch, tmp_path: Path) -> None:
    request, _ = launch()  # owner "tester"
    code, result = run_fence(tmp_path, "fence", LOCAL.name, request.kernel_id, "mallory", "1")
    assert code == 1 and result["code"] == "not_owner", result
    code, status = run_fence(tmp_path, "status", LOCAL.name, request.kernel_id, request.owner)
    assert code == 0 and status["alive"] is True  # still running
    code, gone = run_fence(tmp_path, "status", LOCAL.name, "never-launched", request.owner)
    assert code == 0 and gone["found"] is False and gone["alive"] is False
