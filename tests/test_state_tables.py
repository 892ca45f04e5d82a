"""The session's and the proxy's transition tables, edge by edge (pure: no sockets, no threads).

Each table is walked completely: every (state, event) pair either has its edge, which
``advance``/``transition`` follows, or has none and raises; every state is reachable from the
start; and the diagram in each module's docstring is the table's own rendering.
"""

from __future__ import annotations

import inspect

import pytest

from provisioner import proxy_state, session_state
from provisioner.proxy_state import ProxyEvent, ProxyState, ProxyStateError, transition
from provisioner.session_state import Event, Phase, SessionStateError, advance


def test_every_session_edge_leads_where_the_table_says_and_the_rest_raise() -> None:
    for phase in Phase:
        for event in Event:
            target = session_state.TRANSITIONS.get((phase, event))
            if target is None:
                with pytest.raises(SessionStateError, match=event.value):
                    advance(phase, event)
            else:
                assert advance(phase, event) is target


def test_every_proxy_edge_leads_where_the_table_says_and_the_rest_raise() -> None:
    for state in ProxyState:
        for event in ProxyEvent:
            target = proxy_state.TRANSITIONS.get((state, event))
            if target is None:
                with pytest.raises(ProxyStateError, match=event.value):
                    transition(state, event)
            else:
                assert transition(state, event) is target


def reachable(start, events, table) -> set:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for event in events:
            there = table.get((here, event))
            if there is not None and there not in seen:
                seen.add(there)
                todo.append(there)
    return seen


def test_every_phase_and_state_can_be_reached_and_left() -> None:
    assert reachable(Phase.UNATTACHED, Event, session_state.TRANSITIONS) == set(Phase)
    assert reachable(ProxyState.DETACHED, ProxyEvent, proxy_state.TRANSITIONS) == set(ProxyState)
    for phase in Phase:  # nothing but CLOSED is a dead end
        leaves = [e for e in Event if session_state.TRANSITIONS.get((phase, e), phase) != phase]
        assert leaves or phase is Phase.CLOSED, phase
    # a kernel that is saving, running or starting can always be shut down
    for phase in Phase:
        if phase not in (Phase.ENDED, Phase.CLOSED):
            assert advance(phase, Event.END) is Phase.ENDED


@pytest.mark.parametrize("module", [session_state, proxy_state])
def test_the_docstring_diagram_is_the_table(module) -> None:
    doc = inspect.getdoc(module) or ""
    drawn = [line.strip() for line in doc.splitlines() if "-->" in line and "CLOSED" not in line]
    assert drawn == [line.strip() for line in module.diagram().splitlines()]
