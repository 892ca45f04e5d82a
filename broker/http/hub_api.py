"""The JupyterHub REST API as the broker uses it, as a hub service (``[identity] jupyterhub``).

``broker.http.hub_identity.HubIdentities`` calls ``HubApi`` (on the broker's loop, tornado's
async HTTP client): who owns a token (``user_for_token``: ``GET /hub/api/user`` with that token,
which any token of a user may ask, and whose reply carries the user's name, admin flag, groups and
the token's scopes), who is in a group (``group_users``: ``GET /hub/api/groups/NAME`` with the
service's own token, scope ``read:groups``), and the OAuth code exchange of the dashboard's
sign-in (``oauth_token``). No token is ever logged: messages name the hub's URL and the status.
"""

from __future__ import annotations

import json
import os
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from broker.config.identity import HubConfig
from broker.errors import BrokerError


class HubError(BrokerError):
    """The hub could not answer what the broker asked."""


class HubUnreachable(HubError):
    """The hub did not answer (refused, timed out, DNS, 5xx): the API answers 503."""


class HubRefused(HubError):
    """The hub answered, but not as a hub that knows this service would (e.g. the service's
    token lacks a scope): ``status`` is the hub's."""

    def __init__(self, status: int, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class HubUser:
    """What the hub says about the owner of a token (``GET /hub/api/user``)."""

    name: str
    admin: bool
    groups: frozenset[str]
    scopes: frozenset[str]
    kind: str = "user"


def read_api_token(config: HubConfig) -> str:
    """The service's own hub API token: ``api_token_file`` (mode 0600, no other reader), else
    ``$api_token_env``. Raises HubError naming the fix."""
    if config.api_token_file is not None:
        path = Path(config.api_token_file)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise HubError(
                f"cannot read the JupyterHub service token file {path}: {exc.strerror}",
                hint="write the service's api_token (the one in jupyterhub_config.py) there, "
                "mode 0600",
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise HubError(
                f"the JupyterHub service token file {path} is readable by other users "
                f"(mode {stat.S_IMODE(mode):o})",
                hint=f"run `chmod 600 {path}`",
            )
        if not text:
            raise HubError(f"the JupyterHub service token file {path} is empty")
        return text
    value = os.environ.get(config.api_token_env, "").strip()
    if not value:
        raise HubError(
            f"no JupyterHub service token: [identity] jupyterhub has no api_token_file and "
            f"${config.api_token_env} is not set",
            hint='set api_token_file = "/etc/gpu-broker/hub-token" (the api_token of the '
            "service in jupyterhub_config.py, mode 0600)",
        )
    return value


class HubApi:
    """Calls to one hub. ``api_token``: the service's token (never sent anywhere but the hub)."""

    def __init__(self, config: HubConfig, api_token: str) -> None:
        self.config = config
        self._api_token = api_token
        self._http = AsyncHTTPClient()

    async def user_for_token(self, token: str) -> HubUser | None:
        """The user who owns ``token``, or None when the hub does not know it (or it is not a
        user's: a service's token is no broker user)."""
        try:
            data = await self._get("/user", token)
        except HubRefused as exc:
            if exc.status in (401, 403):
                return None
            raise
        if not isinstance(data, dict) or data.get("kind", "user") != "user":
            return None
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise HubRefused(200, f"JupyterHub at {self.config.url} answered a user without name")
        return HubUser(
            name=name,
            admin=bool(data.get("admin", False)),
            groups=frozenset(g for g in data.get("groups") or () if isinstance(g, str)),
            scopes=frozenset(s for s in data.get("scopes") or () if isinstance(s, str)),
        )

    async def group_users(self, group: str) -> frozenset[str] | None:
        """The users of hub group ``group`` (None: no such group)."""
        path = "/groups/" + urllib.parse.quote(group, safe="")
        try:
            data = await self._get(path, self._api_token)
        except HubRefused as exc:
            if exc.status == 404:
                return None
            if exc.status in (401, 403):
                raise HubRefused(
                    exc.status,
                    f"JupyterHub at {self.config.url} refused to list group {group!r} to the "
                    f"service {self.config.service_name!r}",
                    hint="give the service's role the scope read:groups in jupyterhub_config.py "
                    "(docs/jupyterhub.md), and check its api_token",
                ) from None
            raise
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, list):
            raise HubRefused(
                200,
                f"JupyterHub at {self.config.url} listed group {group!r} without its users",
                hint="give the service's role the scope read:groups (not only read:groups:name)",
            )
        return frozenset(u for u in users if isinstance(u, str))

    async def oauth_token(self, code: str) -> str:
        """Exchange an OAuth ``code`` (the dashboard's sign-in) for the user's access token."""
        body = urllib.parse.urlencode(
            {
                "client_id": self.config.client_id,
                "client_secret": self._api_token,
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.config.callback_url,
            }
        )
        request = HTTPRequest(
            self.config.api_url + "/oauth2/token",
            method="POST",
            body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            request_timeout=self.config.timeout,
            connect_timeout=self.config.timeout,
        )
        data = await self._fetch(request)
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise HubRefused(200, f"JupyterHub at {self.config.url} gave no access token")
        return token

    def authorize_url(self, state: str) -> str:
        """Where the browser signs in (the hub's OAuth authorize endpoint, public URL)."""
        query = urllib.parse.urlencode(
            {
                "client_id": self.config.client_id,
                "redirect_uri": self.config.callback_url,
                "response_type": "code",
                "state": state,
            }
        )
        return f"{self.config.public_url}/hub/api/oauth2/authorize?{query}"

    async def _get(self, path: str, token: str) -> Any:
        request = HTTPRequest(
            self.config.api_url + path,
            headers={"Authorization": f"token {token}", "Accept": "application/json"},
            request_timeout=self.config.timeout,
            connect_timeout=self.config.timeout,
        )
        return await self._fetch(request)

    async def _fetch(self, request: HTTPRequest) -> Any:
        try:
            response = await self._http.fetch(request)
        except HTTPClientError as exc:
            if exc.code == 599:  # tornado's code for no answer (timeout, connection closed)
                raise self._unreachable(exc.message or "no answer") from None
            if exc.code >= 500:
                raise self._unreachable(f"HTTP {exc.code}") from None
            raise HubRefused(
                exc.code, f"JupyterHub at {self.config.url} answered HTTP {exc.code}"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise self._unreachable(str(exc) or type(exc).__name__) from None
        try:
            return json.loads(response.body or b"null")
        except ValueError:
            raise HubRefused(
                response.code, f"JupyterHub at {self.config.url} did not answer JSON"
            ) from None

    def _unreachable(self, why: str) -> HubUnreachable:
        return HubUnreachable(
            f"cannot reach JupyterHub at {self.config.url} ({why})",
            hint="start the hub, or check [identity] jupyterhub.url in the broker config",
        )
