"""The session proxy against a real local ipykernel and real jupyter_client clients."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from jupyter_client import BlockingKernelClient, KernelManager

from provisioner import messages as m
from provisioner import proxy as proxy_mod
from provisioner.proxy import Activity, ProxyError, ProxyState, SessionProxy

TIMEOUT = 10


def _upstream(km: KernelManager) -> dict[str, int]:
    info = km.get_connection_info()
    return {c: int(info[f"{c}_port"]) for c in ("shell", "iopub", "stdin", "control", "hb")}


def _start_kernel(key: bytes | None = None) -> KernelManager:
    km = KernelManager(kernel_name="python3")
    if key is not None:
        km.session.key = key
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
    finally:
        kc.stop_channels()
    return km


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelManager]:
    km = _start_kernel()
    yield km
    km.shutdown_kernel(now=True)


@pytest.fixture
def proxy(kernel: KernelManager) -> Iterator[SessionProxy]:
    with SessionProxy() as p:
        p.attach(_upstream(kernel))
        yield p


def _client(proxy: SessionProxy, key: bytes, ready: bool = True) -> BlockingKernelClient:
    kc = BlockingKernelClient()
    kc.load_connection_info(
        {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "key": key,
            "signature_scheme": "hmac-sha256",
            **{f"{c}_port": p for c, p in proxy.ports.items()},
        }
    )
    kc.start_channels()
    if ready:
        kc.wait_for_ready(timeout=TIMEOUT)
    return kc


@pytest.fixture
def client(proxy: SessionProxy, kernel: KernelManager) -> Iterator[BlockingKernelClient]:
    kc = _client(proxy, kernel.session.key)
    yield kc
    kc.stop_channels()


def _run(kc: BlockingKernelClient, code: str, **kw: Any) -> tuple[dict, list[dict]]:
    """Execute and return (execute_reply, IOPub messages of that request until idle)."""
    msg_id = kc.execute(code, **kw)
    return _collect(kc, msg_id)


def _collect(kc: BlockingKernelClient, msg_id: str) -> tuple[dict, list[dict]]:
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=TIMEOUT)
    out: list[dict] = []
    while True:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        out.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return reply, out


def _of(msgs: list[dict], msg_type: str) -> list[dict]:
    return [msg for msg in msgs if msg["msg_type"] == msg_type]


def test_execute_result_and_stream(client: BlockingKernelClient) -> None:
    reply, out = _run(client, "print('hello'); 6 * 7")
    assert reply["content"]["status"] == "ok"
    assert "".join(s["content"]["text"] for s in _of(out, "stream")) == "hello\n"
    assert _of(out, "execute_result")[0]["content"]["data"]["text/plain"] == "42"
    assert [s["content"]["execution_state"] for s in _of(out, "status")] == ["busy", "idle"]


def test_display_data(client: BlockingKernelClient) -> None:
    _, out = _run(client, "from IPython.display import HTML, display; display(HTML('<b>x</b>'))")
    assert _of(out, "display_data")[0]["content"]["data"]["text/html"] == "<b>x</b>"


def test_input_round_trip(client: BlockingKernelClient) -> None:
    msg_id = client.execute("answer = input('q? ')", allow_stdin=True)
    request = client.get_stdin_msg(timeout=TIMEOUT)
    assert request["msg_type"] == "input_request"
    assert request["content"]["prompt"] == "q? "
    client.input("forty-two")
    reply, _ = _collect(client, msg_id)
    assert reply["content"]["status"] == "ok"
    reply, _ = _run(client, "", user_expressions={"a": "answer"})
    assert reply["content"]["user_expressions"]["a"]["data"]["text/plain"] == "'forty-two'"


def _execute_reply(client: BlockingKernelClient) -> dict:
    """The next shell message that is not a late ``kernel_info_reply``: on a loaded machine,
    ``wait_for_ready`` asks again before the first answer comes, and the answer comes later."""
    while True:
        msg = client.get_shell_msg(timeout=TIMEOUT)
        if msg["msg_type"] != "kernel_info_reply":
            return msg


def test_two_clients_get_their_own_replies(proxy: SessionProxy, kernel: KernelManager) -> None:
    a, b = _client(proxy, kernel.session.key), _client(proxy, kernel.session.key)
    try:
        id_a = a.execute("'from a'")
        id_b = b.execute("'from b'")
        reply_a, reply_b = _execute_reply(a), _execute_reply(b)
        assert reply_a["parent_header"]["msg_id"] == id_a
        assert reply_b["parent_header"]["msg_id"] == id_b
        assert a.shell_channel.msg_ready() is False and b.shell_channel.msg_ready() is False
    finally:
        a.stop_channels()
        b.stop_channels()


def test_detached_requests_queue_until_attach(
    proxy: SessionProxy, client: BlockingKernelClient, kernel: KernelManager
) -> None:
    while client.shell_channel.msg_ready():  # a late kernel_info reply of wait_for_ready
        client.get_shell_msg(timeout=TIMEOUT)
    proxy.detach()
    assert proxy.state is ProxyState.DETACHED
    assert proxy.activity().attached is False
    msg_id = client.execute("print('late')")
    with pytest.raises(Exception):  # noqa: B017 (queue.Empty)
        client.get_shell_msg(timeout=0.5)
    proxy.attach(_upstream(kernel))
    reply, out = _collect(client, msg_id)
    assert reply["content"]["status"] == "ok"
    assert _of(out, "stream")[0]["content"]["text"] == "late\n"  # IOPub synced before sending


def test_queue_is_bounded(
    proxy: SessionProxy, client: BlockingKernelClient, kernel: KernelManager, monkeypatch: Any
) -> None:
    monkeypatch.setattr(proxy_mod, "MAX_QUEUED", 2)
    proxy.detach()
    ids = [client.kernel_info() for _ in range(3)]
    time.sleep(0.2)
    proxy.attach(_upstream(kernel))
    got = [client.get_shell_msg(timeout=TIMEOUT)["parent_header"]["msg_id"] for _ in range(2)]
    assert got == ids[:2]
    with pytest.raises(Exception):  # noqa: B017 (queue.Empty)
        client.get_shell_msg(timeout=0.5)
    assert proxy.kernel_info_reply is not None


def _fake_request(msg_type: str) -> list[bytes]:
    header = b'{"msg_type": "%s", "msg_id": "m1"}' % msg_type.encode()
    return [m.DELIM, b"sig", header, b"{}", b"{}", b"{}", b"buffer"]


def _wait_subscribed(xpub: zmq.Socket) -> None:
    """Read subscription frames (an unsubscribe from a closed SUB may come first)."""
    while xpub.poll(2000):
        if xpub.recv() == b"\x01":
            return
    raise AssertionError("the proxy's SUB never subscribed")


def test_queued_requests_wait_for_iopub_and_pass_untouched() -> None:
    """A fake kernel: requests queued while detached go up only once IOPub flows."""
    ctx = zmq.Context.instance()
    socks = {c: ctx.socket(zmq.ROUTER) for c in ("shell", "control", "stdin")}
    socks["iopub"] = ctx.socket(zmq.XPUB)
    socks["iopub"].setsockopt(zmq.XPUB_VERBOSE, 1)
    ports = {c: s.bind_to_random_port("tcp://127.0.0.1") for c, s in socks.items()}
    front = ctx.socket(zmq.DEALER)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        with SessionProxy(sync_timeout=1.5) as p:  # the negative polls below stay well inside it
            front.connect(f"tcp://127.0.0.1:{p.ports['shell']}")
            sub.connect(f"tcp://127.0.0.1:{p.ports['iopub']}")
            request = _fake_request("execute_request")
            front.send_multipart(request)
            time.sleep(0.1)
            p.attach(ports)  # this kernel sends no iopub_welcome: wait for sync_timeout
            _wait_subscribed(socks["iopub"])
            assert socks["shell"].poll(300) == 0, "request sent before IOPub was known to flow"
            assert socks["shell"].poll(5000)
            assert socks["shell"].recv_multipart()[2:] == request  # [proxy id, client id, *sent]

            p.detach()
            front.send_multipart(request)
            time.sleep(0.1)
            p.attach(ports)  # this time the kernel welcomes the new subscriber
            _wait_subscribed(socks["iopub"])
            assert socks["shell"].poll(200) == 0
            socks["iopub"].send_multipart(_fake_request("iopub_welcome"))
            assert socks["shell"].poll(1000), "welcome did not release the queue"
            assert socks["shell"].recv_multipart()[2:] == request
            assert p.state is ProxyState.ATTACHED
            assert sub.poll(200) == 0, "iopub_welcome is for the proxy, not the frontends"
            status = [
                b"kernel.x.status",
                *_fake_request("status")[:3],
                b'{"msg_type": "execute_request", "msg_id": "m1", "session": "front"}',
                b"{}",
                b'{"execution_state": "busy"}',
            ]
            socks["iopub"].send_multipart(status)
            assert sub.poll(2000) and sub.recv_multipart() == status
            assert p.activity().busy  # the status of a cell: the kernel is busy
    finally:
        for sock in [front, sub, *socks.values()]:
            sock.close(linger=0)


def test_reattach_to_restarted_kernel_keeps_frontend_ports(
    proxy: SessionProxy, client: BlockingKernelClient, kernel: KernelManager
) -> None:
    ports = dict(proxy.ports)
    other = _start_kernel(key=kernel.session.key)  # a restart: same key, new ports
    try:
        assert _upstream(other) != _upstream(kernel)
        proxy.attach(_upstream(other))
        reply, _ = _run(client, "", user_expressions={"pid": "__import__('os').getpid()"})
        assert reply["content"]["user_expressions"]["pid"]["data"]["text/plain"] == str(
            other.provisioner.process.pid
        )
        msg_id = client.execute("answer = input('again? ')", allow_stdin=True)
        assert client.get_stdin_msg(timeout=TIMEOUT)["content"]["prompt"] == "again? "
        client.input("yes")
        assert _collect(client, msg_id)[0]["content"]["status"] == "ok"
        assert proxy.ports == ports
    finally:
        other.shutdown_kernel(now=True)


def test_activity_busy_then_idle(proxy: SessionProxy, client: BlockingKernelClient) -> None:
    before = proxy.activity()
    assert isinstance(before, Activity) and before.attached
    msg_id = client.execute("import time; time.sleep(2)")  # outlasts a stalled poll
    deadline = time.monotonic() + 5
    while not proxy.activity().busy and time.monotonic() < deadline:
        time.sleep(0.01)
    during = proxy.activity()
    assert during.busy and during.execution_state == "busy"
    assert during.last_activity >= before.last_activity
    _collect(client, msg_id)
    after = proxy.activity()
    assert not after.busy and after.execution_state == "idle"
    assert after.last_activity > during.last_activity  # the idle that ended the cell


def test_heartbeat_answered_while_detached() -> None:
    with SessionProxy() as p:
        ctx = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(f"tcp://127.0.0.1:{p.ports['hb']}")
        try:
            for i in range(3):
                req.send(b"ping %d" % i)
                assert req.poll(2000), "heartbeat not echoed"
                assert req.recv() == b"ping %d" % i
        finally:
            req.close()
        assert p.state is ProxyState.DETACHED


def test_close_frees_ports_and_is_idempotent() -> None:
    p = SessionProxy()
    ports = dict(p.ports)
    assert sorted(ports) == ["control", "hb", "iopub", "shell", "stdin"]
    assert len(set(ports.values())) == 5
    p.close()
    p.close()
    with pytest.raises(ProxyError):
        p.attach({"shell": 1, "iopub": 2, "stdin": 3, "control": 4})
    ctx = zmq.Context.instance()
    for port in ports.values():
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        try:
            sock.bind(f"tcp://127.0.0.1:{port}")
        finally:
            sock.close()


def test_attach_rejects_missing_ports() -> None:
    with SessionProxy() as p, pytest.raises(ProxyError, match="iopub"):
        p.attach({"shell": 1, "stdin": 3, "control": 4})


def test_messages_helpers() -> None:
    header = b'{"msg_type": "status", "msg_id": "1"}'
    frames = [
        b"kernel.x.status",
        m.DELIM,
        b"sig",
        header,
        b"{}",
        b"{}",
        b'{"execution_state":"busy"}',
    ]
    assert m.delim_index(frames) == 1
    assert m.msg_type(frames) == "status"
    assert m.status_state(frames, 1) == "busy"
    assert m.msg_type([b"no", b"delimiter"]) is None
    assert m.header_msg_type(b"not json") is None
    assert m.delim_index([zmq.Frame(b"id"), zmq.Frame(m.DELIM)]) == 1


def test_our_own_control_requests_never_show_as_the_kernels_state(
    proxy: SessionProxy, client: BlockingKernelClient, kernel: KernelManager
) -> None:
    """JupyterLab shows Busy for the whole of a running cell, and the broker hears busy, while
    the provisioner's own control requests (every heartbeat) come and go."""
    from provisioner.kernel_control import KernelControl

    control = KernelControl(_upstream(kernel)["control"], kernel.session.key)
    proxy.configure_session(kernel.session.key)
    proxy.set_own_sessions([control.session_id])
    try:
        msg_id = client.execute("import time; time.sleep(1.5)")
        busy_seen = False
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            assert control.request("kernel_info_request", {}, TIMEOUT)["status"] == "ok"
            busy_seen = busy_seen or proxy.activity().busy
            time.sleep(0.1)
        assert busy_seen, "the broker must hear busy while a cell runs"
        reply = client.get_shell_msg(timeout=TIMEOUT)
        assert reply["parent_header"]["msg_id"] == msg_id
        states = []
        while True:
            msg = client.get_iopub_msg(timeout=TIMEOUT)
            if msg["msg_type"] == "status":
                assert msg["parent_header"].get("session") != control.session_id
                states.append(
                    (msg["parent_header"].get("msg_id"), msg["content"]["execution_state"])
                )
                if states[-1] == (msg_id, "idle"):
                    break
        cell = [state for parent, state in states if parent == msg_id]
        assert cell == ["busy", "idle"]
        assert [s for s in states if s[0] != msg_id] == [], states
        assert not proxy.activity().busy
    finally:
        control.close()
