"""The dashboard without a hub: sign in with a broker token once, a session cookie after that,
what each role sees, and the one action (drain/undrain a host) behind a confirmation and a CSRF
token. A real broker in a thread, real HTTP (no redirects followed, cookies by hand).
"""

from __future__ import annotations

import http.client
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.config.loader import load_config
from broker.daemon import BrokerServer
from broker.http.auth import create_token, revoke_token

CONFIG = """
[server]
database = "broker.sqlite"

[[hosts]]
name = "local"
address = "local"
  [[hosts.slots]]
  kind = "sim"
  count = 2
  simulated = true

[[hosts]]
name = "spare"
address = "local"
  [[hosts.slots]]
  kind = "sim"
  device = "9"
  simulated = true

[[groups]]
name = "ml101"
members = ["ana", "ben"]
teachers = ["prof"]
gpu_hours_per_day = 2
  [[groups.sessions]]
  days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
  start = "00:00"
  end = "24:00"
  reserved_slots = 2

[[groups]]
name = "ml102"
members = ["carl"]
teachers = ["other"]
"""


@dataclass
class Browser:
    """Just enough of a browser: keeps cookies, follows nothing."""

    port: int
    cookies: dict[str, str] = field(default_factory=dict)
    last_headers: list[tuple[str, str]] = field(default_factory=list)

    def request(
        self, method: str, path: str, form: dict | None = None, headers: dict | None = None
    ) -> tuple[int, str, str]:
        """(status, Location, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        all_headers = {"Accept": "text/html", **(headers or {})}
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        text = response.read().decode()
        self.last_headers = response.getheaders()
        for name, value in self.last_headers:
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                cookie_value = rest.split(";")[0]
                if (
                    cookie_value in ('""', "")
                    or "Max-Age=0" in value
                    or "expires=Thu, 01 Jan 1970" in value.lower()
                ):
                    self.cookies.pop(key, None)
                else:
                    self.cookies[key] = cookie_value
        conn.close()
        return response.status, response.getheader("Location") or "", text

    def set_cookie_header(self, name: str) -> str:
        return next(
            v for k, v in self.last_headers if k.lower() == "set-cookie" and v.startswith(name)
        )

    def sign_in(self, token: str) -> None:
        status, _, page = self.request("GET", "/dashboard/login")
        assert status == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        status, location, _ = self.request(
            "POST", "/dashboard/login", {"csrf": csrf, "token": token}
        )
        assert (status, location) == (303, "/dashboard/")


@dataclass
class Running:
    server: BrokerServer
    tokens: dict[str, str]

    def browser(self) -> Browser:
        return Browser(self.server.port)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    path = tmp_path / "broker.toml"
    path.write_text(CONFIG)
    server = BrokerServer(load_config(path), port=0, tick_interval=0.05)
    server.start_in_thread()
    store = server.service.store
    tokens = {}
    for user, role in (("root", "admin"), ("prof", "teacher"), ("ana", "user")):
        tokens[user] = server.call(lambda u=user, r=role: create_token(store, u, r)[0])
    yield Running(server, tokens)
    server.stop_thread()


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_signing_in_once_with_a_token_gives_a_strict_httponly_session_cookie(running) -> None:
    browser = running.browser()
    status, location, _ = browser.request("GET", "/dashboard/")
    assert (status, location) == (302, "/dashboard/login")
    status, _, page = browser.request("GET", "/dashboard/login")
    csrf = csrf_of(page)
    assert status == 200 and 'type="password"' in page

    # The form's CSRF token must come back; a bad token gets the form again.
    assert browser.request("POST", "/dashboard/login", {"csrf": "x", "token": "y"})[0] == 403
    status, _, page = browser.request(
        "POST", "/dashboard/login", {"csrf": csrf, "token": "sgpu_no"}
    )
    assert status == 401 and "not valid" in page

    browser.sign_in(running.tokens["root"])
    cookie = browser.set_cookie_header("gpu_broker_session")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http here
    status, _, page = browser.request("GET", "/dashboard/")
    assert status == 200
    assert "root · admin" in page and running.tokens["root"] not in page

    # Over https (the hub's proxy terminating TLS says so), the cookie is Secure.
    secure = running.browser()
    status, _, page = secure.request("GET", "/dashboard/login")
    status, _, _ = secure.request(
        "POST",
        "/dashboard/login",
        {"csrf": csrf_of(page), "token": running.tokens["root"]},
        {"X-Forwarded-Proto": "https"},
    )
    assert "Secure" in secure.set_cookie_header("gpu_broker_session")


def test_the_admin_board_shows_the_pool_and_no_script(running) -> None:
    browser = running.browser()
    browser.sign_in(running.tokens["root"])
    status, _, page = browser.request("GET", "/dashboard/")
    assert status == 200
    for section in ('id="hosts"', 'id="slots"', 'id="queue"', 'id="suspended"', 'id="groups"'):
        assert section in page
    assert "local/0" in page and "spare/9" in page
    assert "Class ml101" in page and "Class ml102" in page and "<svg" in page
    assert "<script" not in page and "http://" not in page.split("</style>")[1].replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    headers = dict(browser.last_headers)
    assert "default-src 'none'" in headers["Content-Security-Policy"]


def test_a_host_is_drained_from_the_page_only_after_a_confirmation_with_the_csrf_token(
    running,
) -> None:
    browser = running.browser()
    browser.sign_in(running.tokens["root"])
    status, _, page = browser.request("GET", "/dashboard/hosts/spare/drain")
    assert status == 200 and "Drain host spare?" in page
    assert running.server.service.drained("spare") is False  # a GET changes nothing

    # A POST without the session's CSRF token (a forged form from another site) is refused.
    assert browser.request("POST", "/dashboard/hosts/spare/drain", {"csrf": "forged"})[0] == 403
    assert running.server.service.drained("spare") is False

    status, location, _ = browser.request(
        "POST", "/dashboard/hosts/spare/drain", {"csrf": csrf_of(page)}
    )
    assert (status, location) == (303, "/dashboard/?done=drained:spare")
    assert running.server.service.drained("spare") is True
    status, _, page = browser.request("GET", location)
    assert "Host spare drained." in page and "Undrain" in page

    _, _, page = browser.request("GET", "/dashboard/hosts/spare/undrain")
    browser.request("POST", "/dashboard/hosts/spare/undrain", {"csrf": csrf_of(page)})
    assert running.server.service.drained("spare") is False
    assert browser.request("GET", "/dashboard/hosts/nohost/drain")[0] == 404


def test_a_teacher_sees_their_class_only_and_a_user_their_own_kernels(running) -> None:
    teacher = running.browser()
    teacher.sign_in(running.tokens["prof"])
    _, _, page = teacher.request("GET", "/dashboard/")
    assert "Class ml101" in page and "ana" in page and "ben" in page
    assert "ml102" not in page and "carl" not in page and 'id="hosts"' not in page
    assert "2 GPU-hours a day" in page and "2 reserved now" in page
    assert teacher.request("GET", "/dashboard/hosts/spare/drain")[0] == 403

    user = running.browser()
    user.sign_in(running.tokens["ana"])
    _, _, page = user.request("GET", "/dashboard/")
    assert "Your kernels" in page and "Class" not in page and 'id="slots"' not in page


def test_a_revoked_token_ends_its_session_and_sign_out_needs_the_csrf_token(running) -> None:
    browser = running.browser()
    browser.sign_in(running.tokens["ana"])
    _, _, page = browser.request("GET", "/dashboard/")
    assert browser.request("POST", "/dashboard/logout", {"csrf": "forged"})[0] == 403
    assert browser.request("GET", "/dashboard/")[0] == 200  # still signed in
    store = running.server.service.store
    running.server.call(lambda: revoke_token(store, running.tokens["ana"]))
    assert browser.request("GET", "/dashboard/")[:2] == (302, "/dashboard/login")

    other = running.browser()
    other.sign_in(running.tokens["prof"])
    _, _, page = other.request("GET", "/dashboard/")
    assert other.request("POST", "/dashboard/logout", {"csrf": csrf_of(page)})[0] == 303
    assert other.request("GET", "/dashboard/")[0] == 302


def test_the_queue_says_why_each_request_waits_and_the_class_who_waits(running) -> None:
    service = running.server.service

    def ask(user: str, kernel: str) -> str:
        return running.server.call(lambda: service.request_lease(kernel, user, "sim", kernel).state)

    assert ask("ana", "k1") == "granted"
    assert ask("ana", "k2") == "queued"  # ml101 allows one slot per student
    assert ask("zed", "k3") == "granted"
    assert ask("zed", "k4") == "queued"  # the last free slot is kept for ben (class in session)
    browser = running.browser()
    browser.sign_in(running.tokens["root"])
    _, _, page = browser.request("GET", "/dashboard/")
    queue = page.split('id="queue"')[1].split("</section>")[0]
    assert "you hold the 1 GPU slot your class allows per student (ml101)" in queue
    assert "GPU slots are kept for class ml101 while it is in session, until 24:00 UTC" in queue
    assert ask("ben", "k5") == "granted"
    assert ask("carl", "k6") == "queued"
    _, _, page = browser.request("GET", "/dashboard/")
    queue = page.split('id="queue"')[1].split("</section>")[0]
    assert "all 3 &#x27;sim&#x27; GPU slots are in use and 1 request waits before yours" in queue

    teacher = running.browser()
    teacher.sign_in(running.tokens["prof"])
    _, _, page = teacher.request("GET", "/dashboard/")
    row = page.split("<td>ana</td>")[1].split("</tr>")[0]
    assert "holds local/" in row and "waits (#1)" in row
