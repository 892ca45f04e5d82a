"""The launch protocol between a caller (provisioner, broker) and ``python -m gpu_kernel``.

``remote.launch`` sends one ``LaunchRequest`` line on the launcher's stdin; the launcher
(``launcher.py``) answers one ``LaunchReply`` line on stdout. ``ctl status`` answers one
``KernelStatus`` line. Everything received is validated strictly: a missing, mistyped or unknown
field raises ``BadRequest`` (code ``bad_request``) naming the field.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

from gpu_kernel.errors import BadRequest

PROTOCOL_VERSION = 2  # 2: runtime dirs are <root>/<host_name>/<kernel_id>; requests name the owner
# A launcher started ahead of its request (``remote.prepare_launch``) waits this long for it,
# then exits (it holds ~10 MB meanwhile); the caller hands it out only while younger than
# LAUNCH_AHEAD_FRESH. Ten minutes covers a class's think time between two cells.
LAUNCH_AHEAD_WAIT = 600.0
LAUNCH_AHEAD_FRESH = 540.0
SUSPENDED_EXIT_CODE = 75  # a kernel that saved its state and ended (suspend, orphan watchdog)
# Set by the provisioner on a kernel launched to resume saved state: until that state is
# restored its namespace is empty, and the saved state is the user's (on the same host, in the
# very checkpoint dir a save would write), so the kernel saves nothing over it.
RESTORE_PENDING_ENV = "SHARED_GPU_RESTORE_PENDING"
# Asks a kernel to save its state and exit with SUSPENDED_EXIT_CODE as soon as no cell runs
# (the broker's fence sends it before it kills a kernel whose lease ended).
SAVE_SIGNAL = signal.SIGUSR1
PORT_NAMES = ("shell", "iopub", "stdin", "control", "hb")
KERNEL_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# The broker's name of a host: a directory name on every host (runtime dirs are per host, so
# hosts that share a home directory never touch each other's kernels).
HOST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A broker user: a POSIX login name (portable characters, not starting with "-" or ".").
USER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_MISSING = object()


def check_kernel_id(kernel_id: object) -> str:
    """Return ``kernel_id`` if it is safe as a directory name, else raise ``BadRequest``."""
    if not isinstance(kernel_id, str) or not KERNEL_ID_RE.fullmatch(kernel_id):
        raise BadRequest(
            f"invalid kernel_id {kernel_id!r}",
            "a kernel id is 1-128 characters of A-Z, a-z, 0-9, '-' and '_'",
        )
    return kernel_id


def check_host_name(name: object) -> str:
    """Return ``name`` if it is a valid host name for the broker and the runtime dirs."""
    if not isinstance(name, str) or not HOST_NAME_RE.fullmatch(name):
        raise BadRequest(
            f"invalid host name {name!r}",
            "a host name is 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit",
        )
    return name


def check_user_name(name: object) -> str:
    """Return ``name`` if it is a valid broker user name (a POSIX login name)."""
    if not isinstance(name, str) or not USER_NAME_RE.fullmatch(name):
        raise BadRequest(
            f"invalid user name {name!r}",
            "a user name is 1-32 characters of A-Z, a-z, 0-9, '_', '.' and '-', "
            "starting with a letter or '_'",
        )
    return name


def _parse_object(line: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}", "send exactly one JSON object") from e
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _get(data: dict[str, Any], name: str, types: Any, what: str, default: Any = _MISSING) -> Any:
    """Field ``name`` of ``data`` checked against ``types`` (bool is never accepted as int)."""
    if name not in data:
        if default is _MISSING:
            raise BadRequest(f"{what}: missing field {name!r}")
        return default
    value = data[name]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _tuple(types))
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in _tuple(types))
        raise BadRequest(f"{what}: field {name!r} must be {names}, got {json.dumps(value)[:80]}")
    return value


def _tuple(types: Any) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _no_extra(data: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise BadRequest(f"{what}: unknown field(s) {', '.join(map(repr, extra))}")


def _str_map(value: dict[str, Any], what: str) -> dict[str, str]:
    for k, v in value.items():
        if not _ENV_NAME_RE.fullmatch(k) or not isinstance(v, str) or "\0" in v:
            raise BadRequest(f"{what}: bad environment entry {k!r}", "names like FOO_1, str values")
    return dict(value)


def _warm_seconds(value: float, what: str) -> float:
    if not 0 <= value <= 7 * 86400:
        raise BadRequest(f"{what}: 'warm' must be 0 to 604800 seconds, got {value!r}")
    return float(value)


def _modules(value: list[Any], what: str) -> tuple[str, ...]:
    for name in value:
        if not isinstance(name, str) or not _MODULE_RE.fullmatch(name):
            raise BadRequest(f"{what}: 'warm_preload' holds a bad module name: {name!r}")
    return tuple(value)


@dataclass(frozen=True)
class LaunchRequest:
    """What the caller asks the launcher to start (see docs/internals.md)."""

    kernel_id: str
    key: str
    cuda_visible_devices: str
    host_name: str
    slot_id: str
    owner: str  # the broker user the kernel belongs to (recorded in the runtime dir)
    signature_scheme: str = "hmac-sha256"
    env: dict[str, str] = field(default_factory=dict)
    runtime_root: str | None = None
    # True: after its reply the launcher stays and watches the kernel (``launcher.watch``): a
    # status line a second while it runs, a last one with its exit code when it ends.
    watch: bool = False
    # > 0: start the kernel from the owner's warm interpreter on this host when one answers, and
    # keep one there (it exits after this many seconds unused); 0: always a new interpreter.
    warm: float = 0.0
    warm_preload: tuple[str, ...] = ()  # modules the warm interpreter imports (e.g. "torch")
    protocol: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        """One line of JSON; it holds the key, so it only ever goes to the launcher's stdin."""
        return json.dumps(asdict(self), separators=(",", ":"))

    def __repr__(self) -> str:  # never show the key in logs or tracebacks
        return f"LaunchRequest(kernel_id={self.kernel_id!r}, host_name={self.host_name!r}, ...)"

    @classmethod
    def from_json(cls, line: str | bytes) -> LaunchRequest:
        """Parse and validate a request (the launcher calls this on its stdin line)."""
        what = "launch request"
        d = _parse_object(line, what)
        _no_extra(d, {f for f in cls.__dataclass_fields__}, what)
        protocol = _get(d, "protocol", int, what)
        kernel_id = check_kernel_id(_get(d, "kernel_id", str, what))
        key = _get(d, "key", str, what)
        if not key or not key.isascii() or not key.isprintable():
            raise BadRequest(f"{what}: 'key' must be a non-empty printable ASCII string")
        scheme = _get(d, "signature_scheme", str, what)
        if not re.fullmatch(r"hmac-[a-z0-9]+", scheme):
            raise BadRequest(f"{what}: unsupported signature_scheme {scheme!r}", "use hmac-sha256")
        strs = {n: _get(d, n, str, what) for n in ("cuda_visible_devices", "host_name", "slot_id")}
        for n, v in strs.items():
            if "\0" in v:
                raise BadRequest(f"{what}: field {n!r} contains a NUL byte")
        check_host_name(strs["host_name"])
        owner = check_user_name(_get(d, "owner", str, what))
        return cls(
            protocol=protocol,
            kernel_id=kernel_id,
            key=key,
            signature_scheme=scheme,
            env=_str_map(_get(d, "env", dict, what, {}), what),
            runtime_root=_get(d, "runtime_root", (str, type(None)), what, None),
            watch=_get(d, "watch", bool, what, False),
            warm=_warm_seconds(_get(d, "warm", (int, float), what, 0.0), what),
            warm_preload=_modules(_get(d, "warm_preload", list, what, []), what),
            owner=owner,
            **strs,
        )


@dataclass(frozen=True)
class LaunchReply:
    """The launcher's answer: ``ok`` with pid and ports, or not ``ok`` with code, error, hint."""

    ok: bool
    protocol: int = PROTOCOL_VERSION
    pid: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    hostname: str = ""
    version: str = ""
    code: str = ""
    error: str = ""
    hint: str = ""
    warm: bool = False  # started from a warm interpreter

    @classmethod
    def success(
        cls, pid: int, ports: dict[str, int], hostname: str, version: str, warm: bool = False
    ) -> LaunchReply:
        return cls(
            ok=True, pid=pid, ports=dict(ports), hostname=hostname, version=version, warm=warm
        )

    @classmethod
    def failure(cls, code: str, error: str, hint: str = "") -> LaunchReply:
        return cls(ok=False, code=code, error=error, hint=hint)

    def to_json(self) -> str:
        if self.ok:
            keys = ("ok", "protocol", "pid", "ports", "hostname", "version", "warm")
        else:
            keys = ("ok", "code", "error", "hint")
        return json.dumps({k: getattr(self, k) for k in keys}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> LaunchReply:
        """Parse and validate a reply (``remote.launch`` calls this on the launcher's stdout)."""
        what = "launch reply"
        d = _parse_object(line, what)
        if not _get(d, "ok", bool, what):
            _no_extra(d, {"ok", "code", "error", "hint"}, what)
            return cls.failure(
                _get(d, "code", str, what), _get(d, "error", str, what), _get(d, "hint", str, what)
            )
        _no_extra(d, {"ok", "protocol", "pid", "ports", "hostname", "version", "warm"}, what)
        ports = _get(d, "ports", dict, what)
        if set(ports) != set(PORT_NAMES) or not all(
            type(p) is int and 0 < p < 65536 for p in ports.values()
        ):
            raise BadRequest(f"{what}: 'ports' must map {', '.join(PORT_NAMES)} to TCP ports")
        pid = _get(d, "pid", int, what)
        if pid <= 0:
            raise BadRequest(f"{what}: 'pid' must be positive")
        return cls(
            ok=True,
            protocol=_get(d, "protocol", int, what),
            pid=pid,
            ports={n: ports[n] for n in PORT_NAMES},
            hostname=_get(d, "hostname", str, what),
            version=_get(d, "version", str, what),
            warm=_get(d, "warm", bool, what, False),
        )


@dataclass(frozen=True)
class KernelStatus:
    """``ctl`` answer: is the kernel process alive, its exit code once it wrote one, and for a
    kernel that saved its state and exited (``SUSPENDED_EXIT_CODE``) where: ``{"path": str,
    "bytes": int}`` (so a caller whose suspend reply was lost, or a fence, knows)."""

    alive: bool
    exit_code: int | None = None
    checkpoint: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = asdict(self)
        if self.checkpoint is None:
            del data["checkpoint"]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> KernelStatus:
        what = "kernel status"
        d = _parse_object(line, what)
        _no_extra(d, {"alive", "exit_code", "checkpoint"}, what)
        checkpoint = _get(d, "checkpoint", (dict, type(None)), what, None)
        if checkpoint is not None and not (
            isinstance(checkpoint.get("path"), str) and type(checkpoint.get("bytes")) is int
        ):
            raise BadRequest(f"{what}: 'checkpoint' must be {{\"path\": str, \"bytes\": int}}")
        return cls(
            alive=_get(d, "alive", bool, what),
            exit_code=_get(d, "exit_code", (int, type(None)), what),
            checkpoint=checkpoint,
        )
