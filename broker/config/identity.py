"""``[identity]`` of the broker config: where users' identities come from besides broker tokens.

Pure. ``broker.config.loader`` calls ``check_identity`` with its checker; the result is
``Config.identity``. With ``jupyterhub = { url = ..., ... }`` the broker is a JupyterHub service:
it accepts the hub's API tokens of its users (``broker.http.hub_identity`` checks them against the
hub's REST API, ``broker.http.hub_api``), maps ``[[groups]] hub_group`` to classes, and signs the
dashboard's users in with the hub's OAuth. Broker tokens keep working beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from broker.config.durations import parse_duration
from broker.config.toml_check import Checker

_IDENTITY_KEYS = ("jupyterhub",)
_HUB_KEYS = (
    "url",
    "public_url",
    "service_name",
    "api_token_file",
    "api_token_env",
    "cache_time",
    "timeout",
    "oauth_callback_url",
)
_URL = re.compile(r"https?://[^/\s?#]+(/[^\s?#]*)?")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class HubConfig:
    """The JupyterHub the broker is a service of.

    ``url``: how the broker reaches the hub (with its base URL, without ``/hub/``);
    ``public_url``: how browsers reach it (the OAuth sign-in goes there). The service's own API
    token is read from ``api_token_file`` (mode 0600), else from ``$api_token_env``, when the
    server starts, never from this file."""

    url: str
    public_url: str
    service_name: str = "gpu-broker"
    api_token_file: Path | None = None
    api_token_env: str = "JUPYTERHUB_API_TOKEN"
    cache_time: float = 60.0
    timeout: float = 5.0
    oauth_callback_url: str = ""

    @property
    def api_url(self) -> str:
        """The hub's REST API, e.g. ``http://127.0.0.1:8081/hub/api``."""
        return self.url + "/hub/api"

    @property
    def service_prefix(self) -> str:
        """The path the hub's proxy routes to this service: ``/services/gpu-broker``."""
        return f"/services/{self.service_name}"

    @property
    def client_id(self) -> str:
        """The service's OAuth client id (JupyterHub's default for a service)."""
        return f"service-{self.service_name}"

    @property
    def callback_url(self) -> str:
        """Where the hub sends the browser back after OAuth sign-in (must equal the service's
        ``oauth_redirect_uri`` in jupyterhub_config.py)."""
        if self.oauth_callback_url:
            return self.oauth_callback_url
        return f"{self.public_url}{self.service_prefix}/dashboard/oauth_callback"


@dataclass(frozen=True)
class IdentityConfig:
    """``[identity]``: ``jupyterhub`` is None without a hub (broker tokens only)."""

    jupyterhub: HubConfig | None = None


NO_IDENTITY = IdentityConfig()  # broker tokens only


def check_identity(checker: Checker, data: dict, config_path: Path) -> IdentityConfig | None:
    """Check ``[identity]``; None when it has problems (each one is an issue)."""
    path: tuple[str | int, ...] = ("identity",)
    table = checker.table(data, "identity", path)
    checker.known_keys(table, _IDENTITY_KEYS, path)
    if "jupyterhub" not in table:
        return NO_IDENTITY
    raw = table["jupyterhub"]
    hub_path = (*path, "jupyterhub")
    if not isinstance(raw, dict):
        checker.issue(
            hub_path,
            'must be a table like { url = "http://127.0.0.1:8081", service_name = "gpu-broker" }',
        )
        return None
    before = len(checker.issues)
    checker.known_keys(raw, _HUB_KEYS, hub_path)
    url = _url(checker, raw, "url", hub_path, required=True)
    public_url = _url(checker, raw, "public_url", hub_path, required=False) or url
    name = checker.typed(raw, "service_name", hub_path, str, '"gpu-broker"') or "gpu-broker"
    if not _SERVICE_NAME.fullmatch(name):
        checker.issue(
            (*hub_path, "service_name"),
            f"bad service name {name!r}: use the name of the service in jupyterhub_config.py "
            "(letters, digits, . _ -)",
        )
    token_file = checker.typed(raw, "api_token_file", hub_path, str, '"/etc/gpu-broker/hub-token"')
    token_env = checker.typed(raw, "api_token_env", hub_path, str, '"JUPYTERHUB_API_TOKEN"')
    if token_env is not None and not _ENV_NAME.fullmatch(token_env):
        checker.issue(
            (*hub_path, "api_token_env"), f"not an environment variable name: {token_env!r}"
        )
    times = {}
    for key, default in (("cache_time", 60.0), ("timeout", 5.0)):
        times[key] = default
        if key in raw:
            try:
                times[key] = parse_duration(raw[key])
            except ValueError as exc:
                checker.issue((*hub_path, key), str(exc))
                continue
            if times[key] <= 0:
                checker.issue((*hub_path, key), 'must be more than 0, like "30s"')
    callback = _url(checker, raw, "oauth_callback_url", hub_path, required=False)
    if len(checker.issues) > before or url is None:
        return None
    file = None
    if token_file is not None:
        file = config_path.parent / Path(token_file).expanduser()
    return IdentityConfig(
        HubConfig(
            url=url,
            public_url=public_url or url,
            service_name=name,
            api_token_file=file,
            api_token_env=token_env or "JUPYTERHUB_API_TOKEN",
            cache_time=times["cache_time"],
            timeout=times["timeout"],
            oauth_callback_url=callback or "",
        )
    )


def _url(checker: Checker, table: dict, key: str, path: tuple, required: bool) -> str | None:
    if key not in table:
        if required:
            checker.issue(
                path,
                f'missing {key}: add {key} = "http://127.0.0.1:8081" (the hub\'s address, with '
                "its base URL, without /hub/)",
            )
        return None
    value = checker.typed(table, key, path, str, '"http://127.0.0.1:8081"')
    if value is None:
        return None
    value = value.strip().rstrip("/")
    if not _URL.fullmatch(value):
        checker.issue(
            (*path, key), f'must be an http(s) URL like "http://127.0.0.1:8081", got {value!r}'
        )
        return None
    if key != "oauth_callback_url" and re.search(r"/hub(/|$)", value):
        checker.issue(
            (*path, key),
            f"{value!r}: give the hub's URL without /hub or /hub/api (the broker adds them)",
        )
        return None
    return value
