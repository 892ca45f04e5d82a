"""The dashboard the broker serves at ``/dashboard/`` (and at ``/services/NAME/dashboard/``
through the hub's proxy): HTML rendered on the server from ``templates/``, no script, no CDN.

``broker.http.app.make_app`` mounts ``routes(args)``. Sign-in: through the hub's OAuth when the
config names a hub (``/dashboard/login`` sends the browser to the hub, ``oauth_callback`` takes
the code back), or a broker token typed once (``POST /dashboard/login``); either way a session
cookie (``broker.http.board_session``) then names the viewer, who is authenticated again on every
page by the API's own rules (``broker.http.calls``). What each role sees is
``broker.http.board_model``. The only action, drain/undrain a host (admins), is a GET that shows
a confirmation and a POST that carries the session's CSRF token.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

import tornado.web
from tornado.escape import url_escape

from broker.http import auth
from broker.http.auth import Identity
from broker.http.board_model import build_board
from broker.http.board_session import (
    LOGIN_COOKIE,
    LOGIN_TIME,
    SESSION_COOKIE,
    Session,
    Sessions,
    same_token,
)
from broker.http.calls import ApiError, hub_failure, hub_identity
from broker.http.hub_api import HubError
from broker.http.hub_identity import HubIdentities
from broker.service.service import BrokerService

log = logging.getLogger("broker.dashboard")

TEMPLATES = Path(__file__).with_name("templates")
_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


class PageHandler(tornado.web.RequestHandler):
    """HTML pages: security headers, the viewer from the session cookie, errors as pages."""

    service: BrokerService
    hub: HubIdentities | None
    sessions: Sessions

    def initialize(
        self, service: BrokerService, hub: HubIdentities | None, sessions: Sessions
    ) -> None:
        self.service = service
        self.hub = hub
        self.sessions = sessions

    def get_template_path(self) -> str:
        return str(TEMPLATES)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        )

    @property
    def base(self) -> str:
        """The dashboard's path as the browser sees it (through the hub's proxy or not)."""
        return getattr(self.request, "service_prefix", "") + "/dashboard"

    @property
    def https(self) -> bool:
        proto = self.request.headers.get("X-Forwarded-Proto", self.request.protocol)
        return proto.split(",")[0].strip().lower() == "https"

    @property
    def hub_enabled(self) -> bool:
        return self.hub is not None and self.hub.enabled

    def page(self, template: str, **values: Any) -> None:
        self.render(template, base=self.base, url_escape=url_escape, **values)

    def message(self, status: int, title: str, text: str, kind: str = "error") -> None:
        self.set_status(status)
        self.page("message.html", title=title, message=text, kind=kind, next_url="")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """An error page for a browser (it asks for text/html), else the API's JSON error."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            status, code, text = exc.status, exc.code, exc.message
        elif isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            status, code = status_code, _CODES.get(status_code, "http_error")
            text = exc.log_message or self._reason
            if status_code == 405:
                text = f"method {self.request.method} is not allowed on {self.request.path}"
        else:
            status, code, text = 500, "internal", "internal error in the broker (see its log)"
        if "text/html" in self.request.headers.get("Accept", ""):
            title = "Not allowed" if status < 500 else "Unavailable"
            self.message(status, title, text)
            return
        self.clear_header("Location")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_status(status)
        self.finish(json.dumps({"error": {"code": code, "message": text}}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError | tornado.web.HTTPError):
            return
        super().log_exception(typ, value, tb)

    # -- the viewer ------------------------------------------------------------------------------

    def session(self) -> tuple[str | None, Session | None]:
        cookie = self.get_cookie(SESSION_COOKIE)
        return cookie, self.sessions.get(cookie)

    async def viewer(self, session: Session) -> Identity | None:
        """Who the session speaks for now (None: its token was revoked or is unknown)."""
        if session.kind == "token":
            row = self.service.store.token_by_hash(session.credential)
            if row is None or row.revoked:
                return None
            return Identity(user=row.user, role=row.role, token_id=row.id)
        if not self.hub_enabled:
            return None
        assert self.hub is not None
        try:
            user = await self.hub.user(session.credential)
        except HubError as exc:
            raise hub_failure(exc) from None
        if user is None:
            return None
        return hub_identity(self.hub, user)

    def set_session_cookie(self, name: str, value: str, max_age: float, same_site: str) -> None:
        self.set_cookie(
            name,
            value,
            path=self.base,
            max_age=int(max_age),
            httponly=True,
            secure=self.https,
            samesite=same_site,
        )

    def _signed_in(self, kind: str, credential: str) -> None:
        cookie, session = self.sessions.create(kind, credential)
        self.set_session_cookie(
            SESSION_COOKIE, cookie, session.expires - self.sessions.clock(), "Strict"
        )
        self.clear_cookie(LOGIN_COOKIE, path=self.base)

    def check_csrf(self, session: Session) -> None:
        if not same_token(self.get_body_argument("csrf", ""), session.csrf):
            raise ApiError(
                403, "forbidden", "this form is stale or came from another site: reload the page"
            )


class BoardHandler(PageHandler):
    """GET /dashboard/: the board for the viewer, or the sign-in."""

    async def get(self) -> None:
        _, session = self.session()
        who = await self.viewer(session) if session is not None else None
        if who is None:
            self.redirect(f"{self.base}/login")
            return
        if self.hub_enabled and (who.is_teacher or who.is_admin):
            assert self.hub is not None
            try:  # a teacher sees the class as the hub has it now
                await self.hub.fresh_groups(self.hub.clock())
            except HubError as exc:
                log.warning("dashboard: hub groups not refreshed: %s", exc)
        notice = ""
        done = self.get_query_argument("done", "")
        action, _, host = done.partition(":")
        if action in ("drained", "undrained") and host:
            notice = f"Host {host} {action}."
        assert session is not None
        board = build_board(self.service, who, self.service.clock())
        self.page("dashboard.html", board=board, csrf=session.csrf, notice=notice)


class LoginHandler(PageHandler):
    """GET: to the hub's OAuth (with a hub), else the token form. POST: a broker token."""

    def get(self) -> None:
        nonce = secrets.token_urlsafe(24)
        self.set_session_cookie(LOGIN_COOKIE, nonce, LOGIN_TIME, "Lax")
        if self.hub_enabled and self.get_query_argument("with", "") != "token":
            assert self.hub is not None
            self.redirect(self.hub.api.authorize_url(nonce))
            return
        hub_url = self.hub.config.public_url if self.hub_enabled and self.hub else ""
        self.page("login.html", csrf=nonce, message="", hub_url=hub_url)

    async def post(self) -> None:
        nonce = self.get_cookie(LOGIN_COOKIE) or ""
        if not same_token(self.get_body_argument("csrf", ""), nonce):
            raise ApiError(403, "forbidden", "the sign-in form is stale: open the page again")
        token = self.get_body_argument("token", "").strip()
        kind, credential = "token", ""
        if self.hub_enabled and self.hub is not None and self.hub.is_hub_token(token):
            try:
                user = await self.hub.user(token)
            except HubError as exc:
                raise hub_failure(exc) from None
            if user is not None:
                hub_identity(self.hub, user)  # refuses names and scopes as the API does
                kind, credential = "hub", token
        elif auth.verify(self.service.store, token) is not None:
            credential = auth.hash_token(token)
        if not credential:
            self.set_status(401)
            fresh = secrets.token_urlsafe(24)
            self.set_session_cookie(LOGIN_COOKIE, fresh, LOGIN_TIME, "Lax")
            hub_url = self.hub.config.public_url if self.hub_enabled and self.hub else ""
            self.page(
                "login.html",
                csrf=fresh,
                hub_url=hub_url,
                message="That token is not valid (unknown, revoked or mistyped).",
            )
            return
        self._signed_in(kind, credential)
        self.redirect(f"{self.base}/", status=303)


class OAuthCallbackHandler(PageHandler):
    """GET /dashboard/oauth_callback?code=&state=: the hub sends the browser back here."""

    async def get(self) -> None:
        if not self.hub_enabled or self.hub is None:
            raise ApiError(404, "not_found", "this broker is not a JupyterHub service")
        state = self.get_query_argument("state", "")
        if not same_token(state, self.get_cookie(LOGIN_COOKIE) or ""):
            raise ApiError(
                403, "forbidden", "the sign-in took too long or came from elsewhere: sign in again"
            )
        code = self.get_query_argument("code", "")
        try:
            token = await self.hub.api.oauth_token(code)
            user = await self.hub.user(token)
        except HubError as exc:
            raise hub_failure(exc) from None
        if user is None:
            raise ApiError(403, "forbidden", "JupyterHub did not confirm the sign-in: try again")
        hub_identity(self.hub, user)
        self._signed_in("hub", token)
        # A page, not a redirect: the session cookie is SameSite=Strict, and a redirect chain
        # that began on the hub's site would not carry it.
        self.page(
            "message.html",
            title="Signed in",
            message=f"Signed in as {user.name}.",
            kind="notice",
            next_url=f"{self.base}/",
        )


class LogoutHandler(PageHandler):
    """POST /dashboard/logout (with the CSRF token)."""

    def post(self) -> None:
        cookie, session = self.session()
        if session is not None:
            self.check_csrf(session)
            self.sessions.drop(cookie)
        self.clear_cookie(SESSION_COOKIE, path=self.base)
        self.redirect(
            f"{self.base}/login?with=token" if not self.hub_enabled else f"{self.base}/", status=303
        )


class DrainHandler(PageHandler):
    """GET /dashboard/hosts/NAME/drain|undrain: the confirmation; POST: do it (admins)."""

    async def _admin(self) -> Session:
        _, session = self.session()
        who = await self.viewer(session) if session is not None else None
        if who is None or session is None:
            raise ApiError(403, "forbidden", "sign in first")
        if not who.is_admin:
            raise ApiError(403, "forbidden", "only an admin may drain or undrain a host")
        return session

    def _host(self, name: str) -> dict:
        try:
            host = self.service.config.host(name)
        except KeyError:
            raise ApiError(404, "not_found", f"no host {name!r} in the config") from None
        busy = sum(
            1
            for lease in self.service.scheduler.leases()
            if lease.state == "granted" and lease.slot_id in {s.id for s in host.slots}
        )
        return {"name": host.name, "slots": len(host.slots), "busy": busy}

    async def get(self, name: str, action: str) -> None:
        session = await self._admin()
        self.page("confirm.html", host=self._host(name), action=action, csrf=session.csrf)

    async def post(self, name: str, action: str) -> None:
        session = await self._admin()
        self.check_csrf(session)
        self._host(name)
        self.service.set_drain(name, action == "drain")
        pending = self.service.store.durable_future()
        if pending is not None:
            await pending
        log.info("dashboard: host %s %sed", name, action)
        self.redirect(f"{self.base}/?done={action}ed:{url_escape(name)}", status=303)


class RootHandler(PageHandler):
    """GET / (``/services/NAME/`` through the hub): to the dashboard."""

    def get(self) -> None:
        self.redirect(f"{self.base}/")


def routes(args: dict[str, Any]) -> list[tuple[str, type[tornado.web.RequestHandler], dict]]:
    page_args = {**args, "sessions": Sessions()}
    return [
        (r"/", RootHandler, page_args),
        (r"/dashboard", RootHandler, page_args),
        (r"/dashboard/", BoardHandler, page_args),
        (r"/dashboard/login", LoginHandler, page_args),
        (r"/dashboard/oauth_callback", OAuthCallbackHandler, page_args),
        (r"/dashboard/logout", LogoutHandler, page_args),
        (r"/dashboard/hosts/([^/]+)/(drain|undrain)", DrainHandler, page_args),
    ]
