"""The session proxy's states and the table of its transitions (pure; ``provisioner.proxy``).

Every state change of ``SessionProxy`` goes through ``transition(state, event)``, which looks the
pair up in ``TRANSITIONS`` and raises ``ProxyStateError`` for a pair the table does not have, so an
impossible order of events (attach after close, wake while attached) is a loud bug, not a silent
one. ``diagram()`` renders the table; the docstring below is checked against it by the tests::

    DETACHED     --attach-->       SYNCING
    DETACHED     --detach-->       DETACHED
    DETACHED     --stand_in-->     STANDING_IN
    SYNCING      --attach-->       SYNCING
    SYNCING      --synced-->       ATTACHED
    SYNCING      --detach-->       DETACHED
    SYNCING      --hold-->         HOLDING
    SYNCING      --stand_in-->     STANDING_IN
    ATTACHED     --attach-->       SYNCING
    ATTACHED     --detach-->       DETACHED
    ATTACHED     --hold-->         HOLDING
    ATTACHED     --stand_in-->     STANDING_IN
    HOLDING      --attach-->       SYNCING
    HOLDING      --detach-->       DETACHED
    HOLDING      --hold-->         HOLDING
    HOLDING      --release-->      ATTACHED
    HOLDING      --stand_in-->     STANDING_IN
    STANDING_IN  --attach-->       SYNCING
    STANDING_IN  --stand_in-->     STANDING_IN
    STANDING_IN  --wake-->         WAKING
    WAKING       --attach-->       SYNCING
    WAKING       --stand_in-->     STANDING_IN
    WAKING       --wake_failed-->  STANDING_IN

and from every state ``--close--> CLOSED``.

- DETACHED: a kernel process exists (or is starting) but no upstream is connected (before the
  first attach, after an SSH drop): shell and control requests queue.
- SYNCING: upstream connected; requests wait for the kernel's IOPub to flow (``iopub_welcome`` or
  the first message, or a timeout), so no output of a queued request is lost.
- ATTACHED: frames pass through both ways.
- HOLDING: replies flow, new requests wait (a suspend is being asked, or the kernel said it saved
  itself and is exiting).
- STANDING_IN: no kernel process (not attached yet, or suspended): the proxy answers what it can
  alone (``stand_in``); the first ``execute_request`` wakes the session.
- WAKING: the session is bringing a kernel (lease, launch, restore); requests wait and the waiting
  cell shows the progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gpu_kernel.errors import SharedGPUError
from provisioner.transitions import follow, render

MAX_QUEUED = 1000  # shell/control requests held while no kernel takes them
QUEUED_CHANNELS = ("shell", "control")


class ProxyError(SharedGPUError):
    """The session proxy could not do what was asked (closed, bad ports, thread gone)."""


class ProxyStateError(ProxyError):
    """An event arrived in a state the transition table has no edge for (a bug)."""


class ProxyState(Enum):
    DETACHED = "detached"
    SYNCING = "syncing"
    ATTACHED = "attached"
    HOLDING = "holding"
    STANDING_IN = "standing_in"
    WAKING = "waking"
    CLOSED = "closed"


class ProxyEvent(Enum):
    ATTACH = "attach"  # connect to a kernel's ports (a new kernel, or the same after a reconnect)
    SYNCED = "synced"  # the kernel's IOPub flows
    DETACH = "detach"  # the upstream is gone (SSH drop, the kernel ended)
    HOLD = "hold"  # keep new requests back
    RELEASE = "release"  # send what was held
    STAND_IN = "stand_in"  # no kernel process: answer alone
    WAKE = "wake"  # an execute_request arrived while standing in
    WAKE_FAILED = "wake_failed"  # the session could not bring a kernel: answer the cells
    CLOSE = "close"


S, E = ProxyState, ProxyEvent
_CONNECTED = (S.SYNCING, S.ATTACHED, S.HOLDING)

TRANSITIONS: dict[tuple[ProxyState, ProxyEvent], ProxyState] = {
    (S.DETACHED, E.ATTACH): S.SYNCING,
    (S.DETACHED, E.DETACH): S.DETACHED,
    (S.DETACHED, E.STAND_IN): S.STANDING_IN,
    **{(state, E.ATTACH): S.SYNCING for state in _CONNECTED},
    (S.SYNCING, E.SYNCED): S.ATTACHED,
    **{(state, E.DETACH): S.DETACHED for state in _CONNECTED},
    **{(state, E.STAND_IN): S.STANDING_IN for state in _CONNECTED},
    (S.SYNCING, E.HOLD): S.HOLDING,
    (S.ATTACHED, E.HOLD): S.HOLDING,
    (S.HOLDING, E.HOLD): S.HOLDING,
    (S.HOLDING, E.RELEASE): S.ATTACHED,
    (S.STANDING_IN, E.ATTACH): S.SYNCING,
    (S.STANDING_IN, E.STAND_IN): S.STANDING_IN,
    (S.STANDING_IN, E.WAKE): S.WAKING,
    (S.WAKING, E.ATTACH): S.SYNCING,
    (S.WAKING, E.STAND_IN): S.STANDING_IN,
    (S.WAKING, E.WAKE_FAILED): S.STANDING_IN,
    **{(state, E.CLOSE): S.CLOSED for state in ProxyState},
}


def transition(state: ProxyState, event: ProxyEvent) -> ProxyState:
    """The state after ``event`` in ``state``; ``ProxyStateError`` when the table has no edge."""
    return follow(TRANSITIONS, state, event, ProxyStateError, "session proxy")


def diagram() -> str:
    """The table as the module docstring shows it (``close`` edges summed up in one line)."""
    return render(TRANSITIONS, ProxyState, ProxyEvent, skip=E.CLOSE)


@dataclass(frozen=True)
class Activity:
    """What the provisioner reports to the broker with each lease heartbeat."""

    busy: bool  # a cell from a frontend is executing (between its busy and idle statuses)
    execution_state: str  # "busy", "idle", "starting" or "unknown", as the frontends see it
    last_activity: float  # time.time() of the last execute_request, or the idle that ended one
    attached: bool
