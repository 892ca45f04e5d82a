"""The phases of one Shared GPU kernel's session and the table of their transitions (pure).

``KernelSession`` (``provisioner.session``) changes phase only through ``advance(phase, event)``,
which raises ``SessionStateError`` for a pair the table lacks. ``diagram()`` renders the table;
the tests check this docstring against it and walk every edge::

    UNATTACHED    --wake-->           STARTING
    UNATTACHED    --launch-->         STARTING
    UNATTACHED    --end-->            ENDED
    UNATTACHED    --adopt_running-->  RUNNING
    UNATTACHED    --adopt_saved-->    SUSPENDED
    STARTING      --started-->        RUNNING
    STARTING      --start_failed-->   UNATTACHED
    STARTING      --end-->            ENDED
    RUNNING       --suspend-->        SUSPENDING
    RUNNING       --saved_itself-->   SUSPENDED
    RUNNING       --link_lost-->      RECONNECTING
    RUNNING       --exited-->         ENDED
    RUNNING       --end-->            ENDED
    RECONNECTING  --saved_itself-->   SUSPENDED
    RECONNECTING  --link_restored-->  RUNNING
    RECONNECTING  --gave_up-->        SUSPENDED
    RECONNECTING  --exited-->         ENDED
    RECONNECTING  --end-->            ENDED
    SUSPENDING    --suspended-->      SUSPENDED
    SUSPENDING    --refused-->        RUNNING
    SUSPENDING    --link_lost-->      RECONNECTING
    SUSPENDING    --exited-->         ENDED
    SUSPENDING    --end-->            ENDED
    SUSPENDED     --wake-->           RESUMING
    SUSPENDED     --end-->            ENDED
    RESUMING      --started-->        RUNNING
    RESUMING      --start_failed-->   SUSPENDED
    RESUMING      --end-->            ENDED
    ENDED         --launch-->         STARTING
    ENDED         --reset-->          UNATTACHED

and from every phase ``--close--> CLOSED``.

- UNATTACHED: no lease, no kernel, no saved state (a new kernel with lazy attach, or after a
  restart): the proxy stands in; the first cell wakes it.
- STARTING / RESUMING: the session is asking for a slot (maybe waiting in the queue), launching,
  and for RESUMING copying and restoring the saved state; the waiting cell shows each step.
- RUNNING: a kernel process runs on the leased slot and the proxy forwards to it (from the
  moment the proxy attaches: a resume's clean-up of the old checkpoint comes after).
- RECONNECTING: the SSH link dropped; the kernel runs on; cells wait while the link comes back.
- SUSPENDING: the kernel is saving its state to give the slot back.
- SUSPENDED: no process; the state is saved on a host; the next cell resumes it anywhere.
- ENDED: the kernel process ended (Jupyter's restarter or a shutdown takes it from here).
"""

from __future__ import annotations

from enum import Enum

from gpu_kernel.errors import SharedGPUError
from provisioner.transitions import follow, render


class SessionStateError(SharedGPUError):
    """An event arrived in a phase the transition table has no edge for (a bug)."""


class Phase(Enum):
    UNATTACHED = "unattached"
    STARTING = "starting"
    RUNNING = "running"
    RECONNECTING = "reconnecting"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"
    ENDED = "ended"
    CLOSED = "closed"


class Event(Enum):
    WAKE = "wake"  # a cell wants the kernel (proxy); a resume when state is saved
    LAUNCH = "launch"  # Jupyter starts (eager) or restarts the kernel
    STARTED = "started"  # the kernel runs and the proxy is attached
    START_FAILED = "start_failed"  # no slot, launch or restore failed, or interrupted
    SUSPEND = "suspend"  # the broker's order, or "Suspend now"
    SUSPENDED = "suspended"  # the kernel saved its state and exited; the slot is given back
    REFUSED = "refused"  # the kernel would not suspend (a cell runs)
    SAVED_ITSELF = "saved_itself"  # the kernel exited with SUSPENDED_EXIT_CODE on its own
    LINK_LOST = "link_lost"
    LINK_RESTORED = "link_restored"
    GAVE_UP = "gave_up"  # the link stayed down past the kernel's orphan grace
    EXITED = "exited"  # the kernel process ended
    END = "end"  # Jupyter asked for a shutdown or restart
    RESET = "reset"  # a restart with lazy attach: back to no lease
    ADOPT_RUNNING = "adopt_running"  # re-attach: the kernel another process started runs
    ADOPT_SAVED = "adopt_saved"  # re-attach: its state is saved
    CLOSE = "close"


P, E = Phase, Event

TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (P.UNATTACHED, E.WAKE): P.STARTING,
    (P.UNATTACHED, E.LAUNCH): P.STARTING,
    (P.UNATTACHED, E.ADOPT_RUNNING): P.RUNNING,
    (P.UNATTACHED, E.ADOPT_SAVED): P.SUSPENDED,
    (P.STARTING, E.STARTED): P.RUNNING,
    (P.STARTING, E.START_FAILED): P.UNATTACHED,
    (P.RUNNING, E.SUSPEND): P.SUSPENDING,
    (P.RUNNING, E.SAVED_ITSELF): P.SUSPENDED,
    (P.RUNNING, E.LINK_LOST): P.RECONNECTING,
    (P.RUNNING, E.EXITED): P.ENDED,
    (P.RECONNECTING, E.LINK_RESTORED): P.RUNNING,
    (P.RECONNECTING, E.SAVED_ITSELF): P.SUSPENDED,
    (P.RECONNECTING, E.EXITED): P.ENDED,
    (P.RECONNECTING, E.GAVE_UP): P.SUSPENDED,
    (P.SUSPENDING, E.SUSPENDED): P.SUSPENDED,
    (P.SUSPENDING, E.REFUSED): P.RUNNING,
    (P.SUSPENDING, E.EXITED): P.ENDED,
    (P.SUSPENDING, E.LINK_LOST): P.RECONNECTING,
    (P.SUSPENDED, E.WAKE): P.RESUMING,
    (P.RESUMING, E.STARTED): P.RUNNING,
    (P.RESUMING, E.START_FAILED): P.SUSPENDED,
    (P.ENDED, E.LAUNCH): P.STARTING,
    (P.ENDED, E.RESET): P.UNATTACHED,
    **{(phase, E.END): P.ENDED for phase in Phase if phase not in (P.ENDED, P.CLOSED)},
    **{(phase, E.CLOSE): P.CLOSED for phase in Phase},
}

# Phases in which a kernel process may exist on a host (shutdown must end it there).
WITH_PROCESS = frozenset({P.STARTING, P.RESUMING, P.RUNNING, P.RECONNECTING, P.SUSPENDING})


def advance(phase: Phase, event: Event) -> Phase:
    """The phase after ``event``; ``SessionStateError`` when the table has no such edge."""
    return follow(TRANSITIONS, phase, event, SessionStateError, "kernel session")


def diagram() -> str:
    """The table as the module docstring shows it (``end`` listed per phase, ``close`` not)."""
    return render(TRANSITIONS, Phase, Event, skip=E.CLOSE)
