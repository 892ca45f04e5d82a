"""The "Shared GPU" kernel end to end: real broker, real sshd hosts, real KernelManager.

Each test drives jupyter_client's KernelManager the way a Jupyter server does, through the
installed ``shared-gpu-provisioner`` entry point, and checks what a user would notice.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.provisioning import KernelProvisionerFactory

from tests.pool import Pool, shut_down, vanish


def run(kc: BlockingKernelClient, code: str, timeout: float = 30) -> tuple[dict, list[dict]]:
    """Execute ``code``; return the reply content and the IOPub messages of that request that
    a notebook still shows at the end (a ``clear_output`` drops what came before it)."""
    outputs: list[dict] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "clear_output":
            outputs.clear()
        else:
            outputs.append(msg)

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], outputs


def stdout_of(outputs: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(") ")[1][0] != "Z"


@pytest.fixture
def started(pool: Pool):
    """Start Shared GPU kernels; the pool shuts down whatever a test left running."""
    return pool.start_kernel


def where(kc: BlockingKernelClient) -> dict[str, str]:
    _, out = run(
        kc,
        "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ['SHARED_GPU_HOST'],"
        " os.environ['SSH_CONNECTION'].split()[3], os.getpid())",
    )
    cuda, host, port, pid = stdout_of(out).split()
    return {"cuda": cuda, "host": host, "sshd_port": port, "pid": pid}


def test_kernel_runs_on_the_leased_slot_of_a_test_host(pool: Pool, started):
    _, kc = started()
    info = where(kc)
    holders = pool.slot_users()
    leased = [slot for slot, user in holders.items() if user]
    assert len(leased) == 1
    host = next(h for h in pool.hosts if h.name == info["host"])
    assert leased[0].startswith(host.name)
    # the kernel really came in through that host's sshd, and sees the slot's device
    assert info["sshd_port"] == str(host.port)
    assert info["cuda"] == str(pool.hosts.index(host))


def test_rich_output_and_input_round_trip(pool: Pool, started):
    _, kc = started()
    _, out = run(kc, "from IPython.display import HTML, display; display(HTML('<b>hi</b>'))")
    shown = [m for m in out if m["msg_type"] == "display_data"]
    assert shown and shown[0]["content"]["data"]["text/html"] == "<b>hi</b>"

    answers = []

    def stdin_hook(msg):
        answers.append(msg["content"]["prompt"])
        kc.input("forty-two")

    reply = kc.execute_interactive(
        "name = input('your answer? '); print(name.upper())",
        timeout=30,
        allow_stdin=True,
        stdin_hook=stdin_hook,
        output_hook=lambda m: None,
    )
    assert reply["content"]["status"] == "ok"
    assert answers == ["your answer? "]
    _, out = run(kc, "print(name)")
    assert stdout_of(out).strip() == "forty-two"


def test_interrupt_stops_a_sleeping_loop_and_the_kernel_lives(pool: Pool, started):
    km, kc = started()
    run(kc, "1")  # the first cell takes the slot (lazy attach)
    msg_id = kc.execute("import time\nfor _ in range(600): time.sleep(0.1)")
    time.sleep(1.5)
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=20)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    _, out = run(kc, "print('still here')")
    assert stdout_of(out).strip() == "still here"
    assert km.is_alive()


def test_restart_keeps_the_slot_and_clears_the_namespace(pool: Pool, started):
    km, kc = started()
    run(kc, "secret = 41")
    before = where(kc)
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=30)
    after = where(kc)
    assert (after["host"], after["cuda"]) == (before["host"], before["cuda"])
    assert after["pid"] != before["pid"]
    assert not pid_alive(int(before["pid"]))
    content, _ = run(kc, "secret")
    assert content["status"] == "error" and content["ename"] == "NameError"


def test_shutdown_frees_the_slot_and_leaves_no_process(pool: Pool, started):
    km, kc = started()
    pid = int(where(kc)["pid"])
    assert any(pool.slot_users().values())
    kc.stop_channels()
    shut_down(km)
    assert not any(pool.slot_users().values())
    assert not pid_alive(pid)


def test_two_kernels_on_two_hosts_and_a_third_waits_for_a_free_slot(pool: Pool, started):
    (km1, kc1), (_, kc2) = started(), started()
    hosts = {where(kc1)["host"], where(kc2)["host"]}
    assert hosts == {h.name for h in pool.hosts}

    _, kc3 = started()  # lazy attach: ready at once, no slot taken yet
    assert pool.queued() == 0
    seen: list[dict] = []
    third: dict = {}

    def first_cell():
        third["reply"] = kc3.execute_interactive(
            "import os; print(os.environ['SHARED_GPU_HOST'])", timeout=60, output_hook=seen.append
        )

    waiter = threading.Thread(target=first_cell, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pool.queued() == 0:
        time.sleep(0.1)
    time.sleep(1)
    assert waiter.is_alive(), "the third kernel's cell ran although the pool was full"
    assert pool.queued() == 1
    shown = [m["content"]["data"]["text/plain"] for m in seen if "data" in m["content"]]
    waiting = [line for line in shown if line.startswith("Waiting for a free GPU slot")]
    assert waiting, shown
    # the position, and why: the broker's reason with the rule that will free a slot
    assert waiting[-1].startswith(
        "Waiting for a free GPU slot: position 1 of 1 in the queue (all 2 GPU slots are in use; "
    ), waiting
    assert "idle for" in waiting[-1] and "while others wait is suspended" in waiting[-1]

    freed_host = where(kc1)["host"]
    kc1.stop_channels()
    shut_down(km1)
    waiter.join(30)
    assert not waiter.is_alive(), "the third kernel did not start after a slot was released"
    assert third["reply"]["content"]["status"] == "ok"
    assert stdout_of(seen).strip() == freed_host


def test_a_cell_on_a_drained_pool_says_so_and_runs_once_a_host_is_back(pool: Pool, started):
    _, kc = started()
    admin = ("--url", pool.url)
    for host in pool.hosts:
        pool.cli("drain", host.name, *admin, token=pool.admin_token)
    seen: list[dict] = []
    done: dict = {}

    def first_cell():
        done["reply"] = kc.execute_interactive("print('ran')", timeout=60, output_hook=seen.append)

    try:
        waiter = threading.Thread(target=first_cell, daemon=True)
        waiter.start()
        deadline = time.monotonic() + 15
        shown: list[str] = []
        while time.monotonic() < deadline and not any("drained" in line for line in shown):
            time.sleep(0.2)
            shown = [m["content"]["data"]["text/plain"] for m in seen if "data" in m["content"]]
        names = ", ".join(sorted(h.name for h in pool.hosts))
        reason = f"on a host the admin drained for maintenance ({names})"
        assert any(reason in line for line in shown), shown
        assert waiter.is_alive()
        pool.cli("undrain", pool.hosts[0].name, *admin, token=pool.admin_token)
        waiter.join(40)
        assert not waiter.is_alive(), "the cell did not run after the host was undrained"
        assert done["reply"]["content"]["status"] == "ok" and stdout_of(seen).strip() == "ran"
    finally:
        for host in pool.hosts:
            pool.cli("undrain", host.name, *admin, token=pool.admin_token, check=False)


def test_a_restarted_jupyter_server_reattaches_to_the_running_kernel(pool: Pool, started):
    km, kc = started()
    run(kc, "keep = 'me'")
    first = where(kc)
    saved = asyncio.run(km.provisioner.get_provisioner_info())
    # The Jupyter server process dies: its proxy and SSH connection vanish; lease and kernel stay.
    vanish(km.provisioner.session)
    km.provisioner.session = None
    kc.stop_channels()

    km2 = pool.kernel_manager()
    km2.kernel_id = km.kernel_id
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        km.kernel_id, km2.kernel_spec, parent=km2
    )
    asyncio.run(
        provisioner.load_provisioner_info(json.loads(json.dumps(saved, default=bytes.decode)))
    )
    km2.provisioner = provisioner
    km2.load_connection_info({**provisioner.connection_info, "key": km.session.key})
    kc2 = km2.client()
    kc2.start_channels()
    kc2.wait_for_ready(timeout=30)
    _, out = run(kc2, "print(keep)")
    assert stdout_of(out).strip() == "me"
    assert where(kc2)["pid"] == first["pid"]
    # the re-attached kernel suspends and resumes like any other
    session = km2.provisioner.session
    assert session.request_suspend("test")
    deadline = time.monotonic() + 30
    while session.phase.value != "suspended" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session.phase.value == "suspended"
    _, out = run(kc2, "print(keep)")
    assert stdout_of(out).strip().splitlines()[-1] == "me"
    first = where(kc2)
    kc2.stop_channels()
    shut_down(km2)
    assert not any(pool.slot_users().values())
    assert not pid_alive(int(first["pid"]))
