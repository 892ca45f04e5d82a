"""Transition tables, h11-style: ``{(state, event): next state}`` and the two things done with
one (pure). ``proxy_state`` (the session proxy) and ``session_state`` (the kernel session) each
define a table and follow it with ``follow``; ``render`` draws it for their docstrings, which
the tests compare with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import TypeVar

from gpu_kernel.errors import SharedGPUError

S = TypeVar("S", bound=Enum)


def follow(
    table: Mapping[tuple[S, Enum], S],
    state: S,
    event: Enum,
    error: type[SharedGPUError],
    who: str,
) -> S:
    """The state after ``event`` in ``state``; ``error`` when the table has no such edge (a
    bug: an order of events nobody planned for must be loud, not silent)."""
    try:
        return table[(state, event)]
    except KeyError:
        raise error(
            f"{who}: {event.value!r} is not possible in state {state.value!r}",
            "this is a bug in jupyter-shared-gpu; please report it with the server's log",
        ) from None


def render(
    table: Mapping[tuple[S, Enum], S], states: Iterable[S], events: Iterable[Enum], skip: Enum
) -> str:
    """One line per edge, ``STATE --event--> NEXT``, in the enums' order; ``skip``'s edges (an
    event every state has) are left to the docstring's prose."""
    states, events = list(states), [e for e in events if e is not skip]
    width = max(len(s.name) for s in states) + 1
    arrow = max(len(e.value) for e in events) + 6
    lines = []
    for state in states:
        for event in events:
            target = table.get((state, event))
            if target is not None:
                label = f"--{event.value}-->"
                lines.append(f"{state.name:<{width}} {label:<{arrow}} {target.name}")
    return "\n".join(lines)
