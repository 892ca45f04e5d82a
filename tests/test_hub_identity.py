"""Hub users and groups as the broker's identities and classes, against a real JupyterHub.

The session's hub deployment (conftest.py ``hub_deployment``, tests/hub.py): a real broker
(``gpu-broker serve``) registered as the hub's service ``gpu-broker``, a real hub (dummy
authenticator) whose users, groups and tokens are made through its REST API. The broker's
``[policy] members_only`` refuses users in no class; ``ml101`` is the hub group ``ml-101`` with
its teachers in ``ml-101-staff``; ``ml102`` is ``ml-102`` with a teacher named in the config.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from broker.config.loader import parse_config
from broker.errors import ConfigError
from tests.hub import CACHE_TIME, CLASS_GROUPS, Deployment


def call(url: str, method: str, path: str, token: str, body: object = None) -> tuple[int, dict]:
    """One API call: (status, JSON body), errors included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Hubbed:
    """The session's deployment, seen through its users' hub tokens (made on first use)."""

    def __init__(self, deployment: Deployment) -> None:
        self.pool, self.hub = deployment.pool, deployment.hub
        self.tokens: dict[str, str] = {}

    def token(self, who: str) -> str:
        if who not in self.tokens:
            self.tokens[who] = self.hub.user_token(who)
        return self.tokens[who]

    def call(self, who: str, method: str, path: str, body: object = None) -> tuple[int, dict]:
        return call(self.pool.url, method, path, self.token(who), body)

    def lease(self, who: str, kernel_id: str) -> tuple[int, dict]:
        return self.call(who, "POST", "/api/v1/leases", {"kind": "sim", "kernel_id": kernel_id})

    def release(self, lease: dict) -> None:
        call(self.pool.url, "DELETE", f"/api/v1/leases/{lease['id']}", self.pool.admin_token)

    def metric(self, name: str) -> float:
        request = urllib.request.Request(
            self.pool.url + "/metrics",
            headers={"Authorization": f"Bearer {self.pool.admin_token}"},
        )
        text = urllib.request.urlopen(request, timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"no metric {name} in\n{text}")


@pytest.fixture
def hubbed(hub_up: Deployment) -> Hubbed:
    return Hubbed(hub_up)


def test_hub_users_are_known_by_their_hub_names_with_roles_from_the_hub(hubbed: Hubbed) -> None:
    assert hubbed.call("ana", "GET", "/api/v1/whoami") == (200, {"user": "ana", "role": "user"})
    assert hubbed.call("boss", "GET", "/api/v1/whoami")[1]["role"] == "admin"  # a hub admin
    assert hubbed.call("prof", "GET", "/api/v1/whoami")[1]["role"] == "teacher"  # ml-101-staff
    # Broker tokens keep working beside the hub's.
    status, me = call(hubbed.pool.url, "GET", "/api/v1/whoami", hubbed.pool.admin_token)
    assert (status, me["role"]) == (200, "admin")


def test_class_membership_follows_the_hub_group_from_the_next_request(hubbed: Hubbed) -> None:
    status, lease = hubbed.lease("ana", "k-ana-1")
    assert status == 201, lease
    assert lease["user"] == "ana"
    hubbed.release(lease)

    status, body = hubbed.lease("dan", "k-dan-1")
    assert status == 403
    assert body["error"]["code"] == "not_a_member"
    assert "ml101" in body["error"]["message"] and "ask your teacher" in body["error"]["message"]

    hubbed.hub.add_to_group("ml-101", ["dan"])  # no broker reload
    try:
        status, lease = hubbed.lease("dan", "k-dan-2")
        assert status == 201, lease
        hubbed.release(lease)
    finally:
        hubbed.hub.remove_from_group("ml-101", ["dan"])
    assert hubbed.lease("dan", "k-dan-3")[0] == 403


def test_a_teacher_from_the_hub_sees_their_class_and_not_another(hubbed: Hubbed) -> None:
    status, lease = hubbed.lease("ben", "k-ben-1")
    assert status == 201, lease
    try:
        status, seen = hubbed.call("prof", "GET", f"/api/v1/leases/{lease['id']}")
        assert (status, seen["user"]) == (200, "ben")
        status, usage = hubbed.call("prof", "GET", "/api/v1/usage?group=ml101")
        assert status == 200
        assert {row["user"] for row in usage["users"]} >= {"ben"}
        assert hubbed.call("prof", "GET", "/api/v1/usage?group=ml102")[0] == 403
        # A teacher reads; only the student (or an admin) acts on the lease.
        assert hubbed.call("prof", "DELETE", f"/api/v1/leases/{lease['id']}")[0] == 403
        assert hubbed.call("ana", "GET", f"/api/v1/leases/{lease['id']}")[0] == 403
    finally:
        hubbed.release(lease)


def test_tokens_the_broker_refuses_say_why_and_what_to_do(hubbed: Hubbed) -> None:
    status, body = call(hubbed.pool.url, "GET", "/api/v1/whoami", "not-a-token-the-hub-knows")
    assert status == 401
    assert (
        f"JupyterHub at {hubbed.hub.hub_url} does not know this token" in body["error"]["message"]
    )

    narrow = hubbed.hub.user_token("ana", scopes=["read:users:name!user=ana"])
    status, body = call(hubbed.pool.url, "GET", "/api/v1/whoami", narrow)
    assert status == 403
    assert "access:services!service=gpu-broker" in body["error"]["message"]

    # A hub name that cannot be a Unix login is refused, naming the fix (no mapping: two hub
    # names must never become one broker user).
    status, body = hubbed.call("ana@uni.edu", "GET", "/api/v1/whoami")
    assert (status, body["error"]["code"]) == (403, "bad_user")
    assert "'ana@uni.edu'" in body["error"]["message"]
    assert "username_map" in body["error"]["message"]

    # A service's token is no user's.
    status, _ = call(hubbed.pool.url, "GET", "/api/v1/whoami", hubbed.hub.admin_token)
    assert status == 401


def test_identities_are_cached_and_the_cache_is_measured(hubbed: Hubbed) -> None:
    token = hubbed.hub.user_token("ben")
    hits = hubbed.metric('gpu_broker_hub_identity_lookups_total{result="hit"}')
    calls = hubbed.metric('gpu_broker_hub_calls_total{call="user"}')
    for _ in range(5):
        assert call(hubbed.pool.url, "GET", "/api/v1/whoami", token)[0] == 200
    assert hubbed.metric('gpu_broker_hub_calls_total{call="user"}') == calls + 1
    assert hubbed.metric('gpu_broker_hub_identity_lookups_total{result="hit"}') == hits + 4


def test_a_hung_hub_gets_a_clear_503_once_the_members_it_gave_are_too_old(
    hubbed: Hubbed,
) -> None:
    status, lease = hubbed.lease("ana", "k-ana-hung-1")  # a fresh read of the hub's groups
    assert status == 201, lease
    hubbed.release(lease)
    os.kill(hubbed.hub.proc.pid, signal.SIGSTOP)  # the hub hangs: connections, no answers
    try:
        started = time.monotonic()
        status, body = hubbed.lease("ana", "k-ana-hung-2")
        waited = time.monotonic() - started
    finally:
        os.kill(hubbed.hub.proc.pid, signal.SIGCONT)
    # The members read just before serve for a while; once they are older than the cache time
    # the request waits for the read in full, and the hub's timeout makes it a 503.
    assert (status, body["error"]["code"]) == (503, "hub_unreachable"), body
    assert "cannot reach JupyterHub" in body["error"]["message"]
    assert waited < 15


def test_a_hub_that_is_down_keeps_cached_identities_for_their_cache_time(hubbed: Hubbed) -> None:
    status, lease = hubbed.lease("ana", "k-ana-down")
    assert status == 201, lease
    looked_up = time.monotonic()  # ana's identity is cached from about now
    beat = f"/api/v1/leases/{lease['id']}/heartbeat"
    hubbed.hub.kill()
    try:
        assert hubbed.call("ana", "POST", beat, {"busy": False})[0] == 200  # from the cache
        assert time.monotonic() - looked_up < CACHE_TIME, "the machine is too slow for this test"

        status, body = call(hubbed.pool.url, "GET", "/api/v1/whoami", "a-token-never-seen")
        assert (status, body["error"]["code"]) == (503, "hub_unreachable")
        assert body["error"]["message"].startswith(
            f"cannot reach JupyterHub at {hubbed.hub.hub_url}"
        )

        time.sleep(max(0.0, CACHE_TIME + 0.5 - (time.monotonic() - looked_up)))
        status, body = hubbed.call("ana", "POST", beat, {"busy": False})
        assert (status, body["error"]["code"]) == (503, "hub_unreachable")
        assert "Traceback" not in (hubbed.pool.base / "broker.log").read_text()
    finally:
        hubbed.release(lease)


# -- the config, without a hub -------------------------------------------------------------------

BASE = """
[[hosts]]
name = "local"
address = "local"
  [[hosts.slots]]
  kind = "sim"
  count = 2
  simulated = true
"""


def test_the_config_names_the_hub_and_binds_groups_to_hub_groups() -> None:
    config = parse_config(
        BASE
        + '[identity]\njupyterhub = { url = "http://hub:8081/", public_url = '
        + '"https://hub.example.org", api_token_file = "hub-token", cache_time = "30s" }\n'
        + CLASS_GROUPS,
        "/etc/gpu-broker/broker.toml",
    )
    hub = config.identity.jupyterhub
    assert hub is not None
    assert hub.api_url == "http://hub:8081/hub/api"
    assert hub.callback_url == (
        "https://hub.example.org/services/gpu-broker/dashboard/oauth_callback"
    )
    assert str(hub.api_token_file) == "/etc/gpu-broker/hub-token"
    assert hub.cache_time == 30.0
    assert config.group("ml101").hub_group == "ml-101"
    merged = config.with_hub_members(
        {"ml-101": frozenset({"ana"}), "ml-101-staff": frozenset({"p"})}
    )
    assert merged.group("ml101").members == {"ana"}
    assert merged.group("ml101").teachers == {"p"}
    assert merged.group("ml102").teachers == {"prof2"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (CLASS_GROUPS, "hub_group needs a hub: add [identity] jupyterhub"),
        ('[identity]\njupyterhub = { url = "http://hub/hub/api" }\n', "without /hub or /hub/api"),
        ('[identity]\njupyterhub = { public_url = "http://hub" }\n', "missing url"),
        ('[identity]\njupyterhub = { url = "hub:8081" }\n', "must be an http(s) URL"),
        ('[identity]\njupyterhub = { url = "http://h", cach_time = "1m" }\n', "'cache_time'"),
        ("[policy]\nmembers_only = 1\n", "must be true or false"),
    ],
)
def test_config_mistakes_about_the_hub_are_named(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + extra)
    assert message in str(info.value)
