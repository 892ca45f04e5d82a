"""The session proxy's states and the small types callers see (``provisioner.proxy``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gpu_kernel.errors import SharedGPUError

MAX_QUEUED = 1000  # shell/control requests held while detached
QUEUED_CHANNELS = ("shell", "control")


class ProxyError(SharedGPUError):
    """The session proxy could not do what was asked (closed, bad ports, thread gone)."""


class ProxyState(Enum):
    DETACHED = "detached"
    SYNCING = "syncing"  # upstream connected, waiting for IOPub to flow before sending requests
    ATTACHED = "attached"
    HOLDING = "holding"  # connected, replies flow, new requests wait (a suspend is being asked)
    SUSPENDED = "suspended"  # no kernel process: the proxy answers what it can alone
    RESUMING = "resuming"  # on_resume is bringing a kernel back; requests wait


@dataclass(frozen=True)
class Activity:
    """What the provisioner reports to the broker with each lease heartbeat."""

    busy: bool
    execution_state: str  # last IOPub status: "busy", "idle", "starting", or "unknown"
    last_activity: float  # time.time() of the last execute_request, or the idle that ended one
    attached: bool
