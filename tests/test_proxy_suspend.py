"""The session proxy standing in for a suspended kernel: what a notebook sees meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from jupyter_client import BlockingKernelClient, KernelManager

from provisioner.proxy import ProxyState, SessionProxy
from tests.test_proxy import _client, _start_kernel, _upstream

TIMEOUT = 10


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelManager]:
    km = _start_kernel()
    yield km
    km.shutdown_kernel(now=True)


@pytest.fixture
def proxy(kernel: KernelManager) -> Iterator[SessionProxy]:
    with SessionProxy() as p:
        p.configure_session(kernel.session.key)
        p.attach(_upstream(kernel))
        yield p


@pytest.fixture
def client(proxy: SessionProxy, kernel: KernelManager) -> Iterator[BlockingKernelClient]:
    kc = _client(proxy, kernel.session.key)
    yield kc
    kc.stop_channels()


def outputs_until_reply(kc: BlockingKernelClient, msg_id: str) -> tuple[dict, list[dict]]:
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    while reply["parent_header"].get("msg_id") != msg_id:  # late kernel_info replies of startup
        reply = kc.get_shell_msg(timeout=TIMEOUT)
    seen = []
    while True:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return reply, seen


def test_suspended_proxy_answers_kernel_info_and_completion_without_a_kernel(proxy, client):
    real = client.kernel_info(reply=True, timeout=TIMEOUT)["content"]
    resumed = threading.Event()
    proxy.stand_in(resumed.set)
    assert proxy.state is ProxyState.STANDING_IN and proxy.standing_in
    cached = client.kernel_info(reply=True, timeout=TIMEOUT)["content"]
    assert cached == real
    reply = client.complete("impo", reply=True, timeout=TIMEOUT)["content"]
    assert reply["status"] == "ok" and reply["matches"] == []
    assert not resumed.is_set(), "kernel_info or completion must not take a GPU"
    assert not proxy.activity().attached


def test_a_cell_resumes_the_kernel_and_sees_the_progress(proxy, client, kernel):
    client.execute("kept = 7", reply=True, timeout=TIMEOUT)

    def on_wake():
        proxy.progress("Resuming: waiting for a GPU slot")
        proxy.progress("Resumed on hostB slot hostB/0")
        proxy.attach(_upstream(kernel))

    proxy.stand_in(on_wake)
    msg_id = client.execute("print(kept * 6)")
    reply, seen = outputs_until_reply(client, msg_id)
    assert reply["content"]["status"] == "ok"
    text = "".join(m["content"]["text"] for m in seen if m["msg_type"] == "stream")
    assert text.splitlines() == [
        "Resuming: waiting for a GPU slot",
        "Resumed on hostB slot hostB/0",
        "42",
    ]
    assert proxy.state is ProxyState.ATTACHED


def test_a_failed_resume_answers_the_cell_with_the_reason_and_stays_suspended(proxy, client):
    calls = []

    def on_wake():
        calls.append(1)
        proxy.wake_failed("no 'sim' GPU slot was free within 60s")

    proxy.stand_in(on_wake)
    msg_id = client.execute("1 + 1")
    reply, seen = outputs_until_reply(client, msg_id)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "ResumeFailed"
    assert "no 'sim' GPU slot was free" in reply["content"]["evalue"]
    assert any(m["msg_type"] == "error" for m in seen)
    assert proxy.state is ProxyState.STANDING_IN
    outputs_until_reply(client, client.execute("2 + 2"))
    assert len(calls) == 2  # the next cell tries again


def test_interrupt_and_shutdown_requests_are_answered_while_suspended(proxy, client):
    proxy.stand_in(lambda: None)
    msg = client.session.msg("interrupt_request", {})
    client.control_channel.send(msg)
    assert client.get_control_msg(timeout=TIMEOUT)["content"]["status"] == "ok"
    msg = client.session.msg("shutdown_request", {"restart": True})
    client.control_channel.send(msg)
    reply = client.get_control_msg(timeout=TIMEOUT)["content"]
    assert reply == {"status": "ok", "restart": True}


def test_a_cell_the_saving_kernel_never_answered_runs_after_the_resume(proxy, client, kernel):
    import zmq

    # a "kernel" that takes requests and never answers (one that began saving and drops them)
    ctx = zmq.Context.instance()
    mute = {
        name: ctx.socket(zmq.ROUTER if name != "iopub" else zmq.PUB)
        for name in ("shell", "control", "stdin", "iopub")
    }
    ports = {name: sock.bind_to_random_port("tcp://127.0.0.1") for name, sock in mute.items()}
    try:
        proxy.attach(ports)
        msg_id = client.execute("print('ran once')")
        assert mute["shell"].poll(5000), "the request did not reach the mute kernel"
        proxy.stand_in(lambda: proxy.attach(_upstream(kernel)))
        reply, seen = outputs_until_reply(client, msg_id)
        assert reply["content"]["status"] == "ok"
        text = "".join(m["content"]["text"] for m in seen if m["msg_type"] == "stream")
        assert text.strip() == "ran once"
    finally:
        for sock in mute.values():
            sock.close(linger=0)


def test_a_cell_that_woke_the_kernel_and_was_dropped_by_its_save_runs_after_the_next_resume(
    proxy, client, kernel
):
    """Per-cell binding's race (issue 12): the cell that woke a suspended kernel reaches it, the
    kernel is ordered to save before it ran the cell, and the cell goes back to the proxy, which
    checked its signature once already: it must run on the next kernel, not be dropped as a
    replay (the student's cell would wait forever)."""
    import zmq

    ctx = zmq.Context.instance()
    mute = {
        name: ctx.socket(zmq.ROUTER if name != "iopub" else zmq.PUB)
        for name in ("shell", "control", "stdin", "iopub")
    }
    ports = {name: sock.bind_to_random_port("tcp://127.0.0.1") for name, sock in mute.items()}
    try:
        proxy.stand_in(lambda: proxy.attach(ports))  # suspended; the next cell wakes it
        msg_id = client.execute("print('ran once')")
        assert mute["shell"].poll(5000), "the waking cell did not reach the new kernel"
        proxy.stand_in(lambda: proxy.attach(_upstream(kernel)))  # it saved without running it
        reply, seen = outputs_until_reply(client, msg_id)
        assert reply["content"]["status"] == "ok"
        text = "".join(m["content"]["text"] for m in seen if m["msg_type"] == "stream")
        assert text.strip().endswith("ran once")
    finally:
        for sock in mute.values():
            sock.close(linger=0)
