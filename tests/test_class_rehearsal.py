"""The class rehearsal, short (issue 12): 2 slots, 6 students with real Shared GPU kernels, a
class day compressed into a minute, under per-cell binding. Every student gets served, and every
student's state at the end is what their cells built: per-cell binding moves kernels between
slots and hosts all day long, and loses nothing. ``bench/class_rehearsal.py`` is the long form.
The day lasts 30 s (about a minute with the start, the check and the clean-up; more on a loaded
machine, hence the longer timeout)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from class_model import POLICIES  # noqa: E402
from class_pool import rehearse  # noqa: E402

from tests.sshd import ClientKeys, TestHost  # noqa: E402


@pytest.mark.timeout(300)
def test_six_students_on_two_slots_are_all_served_and_keep_their_state(
    tmp_path: Path, ssh_hosts: list[TestHost], client_keys: ClientKeys, monkeypatch
) -> None:
    monkeypatch.setenv("SHARED_GPU_RUNTIME_ROOT", str(tmp_path / "kernels"))
    outcome = rehearse(
        tmp_path / "rehearsal",
        ssh_hosts,
        client_keys,
        POLICIES["per_cell"],
        2,
        6,
        minutes=0.5,
        grace=120,  # a cell asked for before the day's end still runs: nobody starves
    )
    failed = [row for row in outcome.cell_log if row[4] not in ("ok", "waited")]
    assert outcome.lost == [] and outcome.failed_cells == 0, (outcome.lost, failed)
    # nobody locked out, as static allocation would ([student, cell, asked, wait, status])
    assert outcome.served == 6, outcome.cell_log
    # two slots for six: per-cell binding gave slots back after cells (how often depends on
    # how fast this machine runs the cells: at least once); the check then resumed every
    # suspended kernel (on whichever slot was free) and found its tensors and variables as its
    # cells left them
    assert outcome.suspends >= 1
