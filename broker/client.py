"""A synchronous client for the broker's HTTP API v1 (stdlib ``http.client``, keep-alive).

The provisioner (in the Jupyter server) and ``gpu-broker status`` use it:

    token, source = read_token()
    client = BrokerClient("http://127.0.0.1:8765", token, token_source=source)
    lease = client.request_lease("any", kernel_id)
    while lease.state == "queued":
        lease = client.get_lease(lease.id, wait=30)   # long-poll: returns when it changes

Replies become dataclasses (``Lease``, ``SlotInfo``, ``HostInfo``, ``HeartbeatReply``); unknown
JSON fields are ignored so a newer broker does not break an older client. Errors are
``BrokerUnreachable``, ``BrokerAuthError`` and ``BrokerRequestError``, all ``BrokerError``s
whose ``str()`` is fit to show a user. One client is not thread-safe: give each thread its own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import stat
import urllib.parse
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from broker.errors import BrokerAuthError, BrokerError, BrokerRequestError, BrokerUnreachable

__all__ = [
    "BrokerAuthError",
    "BrokerClient",
    "BrokerError",
    "BrokerRequestError",
    "BrokerUnreachable",
    "HeartbeatReply",
    "HostInfo",
    "Lease",
    "SlotInfo",
    "read_token",
]

TOKEN_ENV = "SHARED_GPU_TOKEN"
DEFAULT_TOKEN_FILE = Path("~/.config/jupyter-shared-gpu/token")


def _pick(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass(frozen=True)
class SlotInfo:
    id: str
    host: str | None = None
    kind: str | None = None
    device: str | None = None
    simulated: bool | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SlotInfo | None:
        return cls(**_pick(cls, data)) if data else None


@dataclass(frozen=True)
class HostInfo:
    """Where a granted lease's kernel runs. ``key_file``/``known_hosts``: paths on the client's
    machine, "{username}" already filled in, "~" not yet expanded (``os.path.expanduser``)."""

    name: str
    address: str
    port: int = 22
    user: str = ""
    key_file: str | None = None
    known_hosts: str | None = None
    python: str = "python3"

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HostInfo | None:
        return cls(**_pick(cls, data)) if data else None


@dataclass(frozen=True)
class Lease:
    id: str
    user: str
    kind: str
    kernel_id: str
    state: str  # "queued" | "granted" | "released" | "expired"
    position: int | None = None
    queue_length: int = 0
    slot: SlotInfo | None = None
    host: HostInfo | None = None
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 60.0
    created_at: float | None = None
    granted_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    quota: dict[str, Any] = field(default_factory=dict)
    waiting: dict[str, Any] | None = None  # queued: why, and until when ({code, message, until})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lease:
        values = _pick(cls, data)
        values["slot"] = SlotInfo.from_json(data.get("slot"))
        values["host"] = HostInfo.from_json(data.get("host"))
        return cls(**values)


@dataclass(frozen=True)
class HeartbeatReply:
    lease: Lease
    orders: list[dict[str, Any]] = field(default_factory=list)


class BrokerClient:
    """Talks to one broker with one bearer token, over one kept-alive connection."""

    def __init__(
        self, url: str, token: str, timeout: float = 10.0, token_source: str = "the token"
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise BrokerError(
                f"bad broker URL {url!r}", hint="use a URL like http://127.0.0.1:8765"
            )
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.token_source = token_source
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._base = parsed.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False

    # -- API -------------------------------------------------------------------------------

    def request_lease(
        self,
        kind: str,
        kernel_id: str,
        resume_from: str | None = None,
        request_id: str | None = None,
    ) -> Lease:
        """Ask for a slot: the lease comes back granted or queued (then poll ``get_lease``).
        ``resume_from``: a suspended kernel's id; a free slot on its checkpoint's host is
        preferred (no copy needed). Every call sends a ``request_id`` (a new one unless given),
        so the retry of a request whose reply was lost returns the same lease, never a second
        one."""
        body: dict[str, Any] = {
            "kind": kind,
            "kernel_id": kernel_id,
            "request_id": request_id or uuid.uuid4().hex,
        }
        if resume_from:
            body["resume_from"] = resume_from
        return Lease.from_json(self._call("POST", "/api/v1/leases", body))

    def get_lease(self, lease_id: str, wait: float = 0) -> Lease:
        """The lease; with ``wait`` > 0 the broker holds the reply (≤ 60 s) until it changes."""
        path = f"/api/v1/leases/{urllib.parse.quote(lease_id, safe='')}"
        if wait > 0:
            path += f"?wait={wait:g}"
        return Lease.from_json(self._call("GET", path, timeout=self.timeout + min(wait, 60)))

    def heartbeat(self, lease_id: str, busy: bool, last_activity: float | None) -> HeartbeatReply:
        path = f"/api/v1/leases/{urllib.parse.quote(lease_id, safe='')}/heartbeat"
        data = self._call("POST", path, {"busy": busy, "last_activity": last_activity})
        return HeartbeatReply(Lease.from_json(data["lease"]), list(data.get("orders") or []))

    def release(
        self, lease_id: str, reason: str = "released", checkpoint: dict[str, Any] | None = None
    ) -> Lease:
        """End the lease. ``reason="suspended"`` with ``checkpoint`` ({"host", "path",
        "bytes", "kernel_id"}): the kernel saved its state there; the broker remembers it.
        ``reason="kernel_may_run"``: the kernel could not be stopped for sure (host unreachable
        at shutdown); the broker fences its slot before it grants it again."""
        path = f"/api/v1/leases/{urllib.parse.quote(lease_id, safe='')}"
        body: dict[str, Any] | None = None
        if reason != "released" or checkpoint is not None:
            body = {"reason": reason}
            if checkpoint is not None:
                body["checkpoint"] = checkpoint
        return Lease.from_json(self._call("DELETE", path, body))

    def checkpoints(self, kernel_id: str | None = None) -> list[dict[str, Any]]:
        """Checkpoints this token may see (one kernel's with ``kernel_id``); an expired one has
        ``state`` "expired" and a ``message`` for the user."""
        path = "/api/v1/checkpoints"
        if kernel_id is not None:
            path += "?" + urllib.parse.urlencode({"kernel_id": kernel_id})
        return list(self._call("GET", path)["checkpoints"])

    def forget_checkpoint(self, kernel_id: str) -> dict[str, Any]:
        """The provisioner calls it after a resume or a shutdown."""
        return self._call("DELETE", f"/api/v1/checkpoints/{urllib.parse.quote(kernel_id, safe='')}")

    def drain(self, host: str, drained: bool = True) -> dict[str, Any]:
        action = "drain" if drained else "undrain"
        return self._call("POST", f"/api/v1/hosts/{urllib.parse.quote(host, safe='')}/{action}")

    def reset_slot(self, slot_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/slots/{urllib.parse.quote(slot_id, safe='/')}/reset")

    def reload(self) -> dict[str, Any]:
        return self._call("POST", "/api/v1/admin/reload")

    def usage(
        self, since: str | float | None = None, group: str | None = None, csv: bool = False
    ) -> Any:
        """The usage report: a dict, or CSV text with ``csv=True``."""
        query: dict[str, str] = {"format": "csv" if csv else "json"}
        if since is not None:
            query["since"] = str(since)
        if group is not None:
            query["group"] = group
        path = "/api/v1/usage?" + urllib.parse.urlencode(query)
        return self._call("GET", path, text=csv)

    def metrics(self) -> str:
        return self._call("GET", "/metrics", text=True)

    def status(self) -> dict[str, Any]:
        """The pool as this token may see it (raw JSON: hosts, slots, leases, queue)."""
        return self._call("GET", "/api/v1/status")

    def whoami(self) -> dict[str, str]:
        return self._call("GET", "/api/v1/whoami")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def abort(self) -> None:
        """From another thread: break the call under way (its socket is shut down), which then
        raises ``BrokerUnreachable``, as does every later call of this client."""
        self._aborted = True
        sock = getattr(self._conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        timeout: float | None = None,
        text: bool = False,
    ) -> Any:
        timeout = self.timeout if timeout is None else timeout
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self._aborted:
                raise self._unreachable("the call was abandoned")
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = self._connect(timeout)
                elif self._conn.sock is not None:
                    self._conn.sock.settimeout(timeout)
                self._conn.request(method, self._base + path, body=payload, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # A kept-alive connection the server closed: reconnect once.
                self.close()
                if attempt == 2 or not reused:
                    raise self._unreachable(str(exc) or "connection closed") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else exc
                if isinstance(exc, TimeoutError | socket.timeout):
                    reason = f"no reply within {timeout:g} s"
                raise self._unreachable(str(reason)) from None
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        if text and 200 <= response.status < 300:
            return raw.decode("utf-8", errors="replace")
        return self._decode(response.status, raw)

    def _unreachable(self, reason: str) -> BrokerUnreachable:
        return BrokerUnreachable(
            f"cannot reach the broker at {self.url}: {reason}",
            hint="start it with `gpu-broker serve --config FILE` or fix broker_url",
        )

    def _decode(self, status: int, raw: bytes) -> Any:
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = None
        if 200 <= status < 300 and isinstance(data, dict):
            return data
        error = data.get("error") if isinstance(data, dict) else None
        code = error.get("code", "") if isinstance(error, dict) else ""
        message = error.get("message", "") if isinstance(error, dict) else ""
        if status == 401:
            hint = (
                "restart your server from the hub (its token may have been revoked), or ask "
                "the admin to set [identity] jupyterhub in the broker config"
                if self.token_source == f"${HUB_TOKEN_ENV}"
                else "create one with `gpu-broker token create --config FILE --user NAME` "
                f"and put it in ${TOKEN_ENV} or {DEFAULT_TOKEN_FILE}"
            )
            raise BrokerAuthError(
                f"the broker rejected the token from {self.token_source}: {message}", hint=hint
            )
        if not message:
            message = f"unexpected reply from the broker at {self.url} (HTTP {status})"
        raise BrokerRequestError(status, code or "http_error", f"broker: {message}")


HUB_TOKEN_ENV = "JUPYTERHUB_API_TOKEN"  # the single-user server's own token, set by the hub


def read_token(
    env_var: str = TOKEN_ENV, token_file: str | Path | None = None, source: str = "broker"
) -> tuple[str, str]:
    """The bearer token and where it came from (a name, never the token). ``source`` "broker":
    ``$env_var`` first, else the token file (default ``~/.config/jupyter-shared-gpu/token``),
    which must not be readable by others. ``source`` "jupyterhub" (the kernelspec's
    ``token_source``, for a broker that is a JupyterHub service): the Jupyter server's own hub
    API token, ``$JUPYTERHUB_API_TOKEN``, which the hub gave the single-user server."""
    if source == "jupyterhub":
        hub_token = os.environ.get(HUB_TOKEN_ENV, "").strip()
        if not hub_token:
            raise BrokerError(
                f"this kernelspec presents the JupyterHub token, but ${HUB_TOKEN_ENV} is not "
                "set: this Jupyter server does not run under JupyterHub",
                hint="start the server from the hub, or install the kernelspec without "
                "--jupyterhub (`jupyter shared-gpu install`) to use a broker token",
            )
        return hub_token, f"${HUB_TOKEN_ENV}"
    value = os.environ.get(env_var, "").strip()
    if value:
        return value, f"${env_var}"
    path = Path(os.path.expanduser(str(token_file or DEFAULT_TOKEN_FILE)))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BrokerError(
            f"no broker token: ${env_var} is not set and {path} does not exist",
            hint="ask an admin for a token (`gpu-broker token create --config FILE --user NAME "
            f"--output {path}`), or set ${env_var}",
        ) from None
    except OSError as exc:
        raise BrokerError(f"cannot read the token file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BrokerError(
            f"the token file {path} is readable by other users (mode {stat.S_IMODE(mode):o})",
            hint=f"run `chmod 600 {path}`",
        )
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerError(f"cannot read the token file {path}: {exc}") from None
    if not token:
        raise BrokerError(
            f"the token file {path} is empty", hint="put the token from the admin in it"
        )
    return token, str(path)
