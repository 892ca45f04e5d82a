"""The session's parts on their own: the proxy's bookkeeping of cells, a heartbeat thread that
survives its own errors and says so, and a lease the broker ended never being used again."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from broker.client import HeartbeatReply, HostInfo, Lease, SlotInfo
from broker.errors import BrokerRequestError
from gpu_kernel.cancel import CancelToken
from provisioner import lease_keeper
from provisioner.executions import Executions
from provisioner.lease_keeper import LeaseKeeper
from provisioner.proxy_state import Activity


def test_busy_follows_the_cells_statuses_only() -> None:
    ex = Executions()
    ex.sent("cell-1", "shell", [b"frames-1"])
    ex.status("busy", "info-9", parent_is_execute=False)  # kernel_info, control requests...
    assert not ex.busy
    ex.status("busy", "cell-1", parent_is_execute=True)
    assert ex.busy
    ex.status("idle", "ctl-3", parent_is_execute=False)  # a control request ends mid-cell
    assert ex.busy, "a control request's idle must not end the cell"
    assert ex.running_frames() == [b"frames-1"]
    ex.status("idle", "cell-1", parent_is_execute=True)
    assert not ex.busy


def test_unanswered_cells_before_a_probe_are_the_lost_ones() -> None:
    ex = Executions()
    ex.sent("a", "shell", [b"a"])
    ex.sent("b", "shell", [b"b"])
    ex.replied("a")
    mark = ex.mark()
    ex.sent("c", "shell", [b"c"])  # sent after the probe: its reply may still come
    assert ex.unanswered_before(mark) == [("shell", [b"b"])]
    assert ex.pending == 1
    assert ex.take_unanswered() == [("shell", [b"c"])]
    assert ex.pending == 0


def granted(lease_id: str = "L1", state: str = "granted") -> Lease:
    return Lease(
        id=lease_id,
        user="ana",
        kind="sim",
        kernel_id="k1",
        state=state,
        slot=SlotInfo(id="h/0", host="h", kind="sim", device="0"),
        host=HostInfo(name="h", address="127.0.0.1"),
        heartbeat_interval=0.05,
    )


class FakeBroker:
    """Stands in for ``BrokerClient`` (heartbeat only): scripted replies, counted calls."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.calls = 0

    def heartbeat(self, lease_id: str, busy: bool, last_activity: float | None) -> HeartbeatReply:
        self.calls += 1
        reply = self.replies.pop(0) if self.replies else HeartbeatReply(granted(lease_id))
        if isinstance(reply, Exception):
            raise reply
        return reply

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class Listener:
    def __init__(self) -> None:
        self.troubles: list[str | None] = []
        self.ended: list[Lease] = []
        self.infos = 0
        self.orders: list[dict] = []
        self.event = threading.Event()

    def lease_info(self, lease: Lease) -> None:
        self.infos += 1

    def lease_order(self, order: dict[str, Any]) -> None:
        self.orders.append(order)

    def lease_ended(self, lease: Lease) -> None:
        self.ended.append(lease)
        self.event.set()

    def heartbeat_trouble(self, message: str | None) -> None:
        self.troubles.append(message)


def test_the_heartbeat_thread_survives_a_bug_says_so_and_drops_an_ended_lease() -> None:
    broker = FakeBroker(
        [
            RuntimeError("a bug in the reply handling"),
            HeartbeatReply(granted(), [{"order": "suspend", "reason": "idle"}]),
            HeartbeatReply(granted(state="expired")),
        ]
    )
    listener = Listener()
    activity = Activity(False, "idle", time.time(), True)
    keeper = LeaseKeeper(lambda: broker, "k1", "sim", lambda: activity, listener)
    try:
        keeper.adopt(granted())
        assert listener.event.wait(5), "the ended lease was never reported"
    finally:
        keeper.close()
    assert any(t and "a bug in the reply handling" in t for t in listener.troubles)
    assert listener.orders == [{"order": "suspend", "reason": "idle"}]
    assert [lease.state for lease in listener.ended] == ["expired"]
    assert keeper.lease is None, "a lease the broker ended must never be used again"
    calls = broker.calls
    time.sleep(0.3)
    assert broker.calls == calls, "no heartbeats for a lease we no longer hold"


class HubSlowBroker(FakeBroker):
    """Answers a lease request with the broker's 503 "cannot reach JupyterHub" ``fails`` times."""

    def __init__(self, fails: int) -> None:
        super().__init__([])
        self.fails = fails
        self.requests = 0

    def request_lease(self, kind: str, kernel_id: str, resume_from: str | None = None) -> Lease:
        self.requests += 1
        if self.requests <= self.fails:
            raise BrokerRequestError(
                503, "hub_unreachable", "broker: cannot reach JupyterHub at http://hub:8081"
            )
        return granted()


def test_a_lease_request_is_asked_again_while_the_broker_cannot_reach_the_hub(
    monkeypatch,
) -> None:
    # a hub busy spawning a class's servers times out the broker's lookup: the student's first
    # cell waits and asks again instead of failing (30 hub users: 1 failed start before)
    monkeypatch.setattr(lease_keeper, "BROKER_RETRY", 0.05)
    broker = HubSlowBroker(fails=2)
    keeper = LeaseKeeper(lambda: broker, "k1", "sim", lambda: None, Listener())
    said: list[str] = []
    try:
        lease = keeper.acquire(CancelToken(), 30, said.append)
    finally:
        keeper.close()
    assert lease.state == "granted" and broker.requests == 3
    assert any("cannot reach JupyterHub" in line and "retrying" in line for line in said)
    # other refusals are not asked again
    refusing = HubSlowBroker(fails=0)
    refusing.request_lease = lambda *a, **k: (_ for _ in ()).throw(  # type: ignore[method-assign]
        BrokerRequestError(403, "forbidden", "broker: not yours")
    )
    keeper = LeaseKeeper(lambda: refusing, "k2", "sim", lambda: None, Listener())
    try:
        with pytest.raises(BrokerRequestError, match="not yours"):
            keeper.acquire(CancelToken(), 30, said.append)
    finally:
        keeper.close()
