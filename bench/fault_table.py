"""The fault-injection scenarios as one table: outcome, states lost, double grants, time to recover.

    .venv/bin/python bench/fault_table.py [pytest args...]

Runs ``tests/test_faults.py`` and ``tests/test_faults_link.py`` (the link tests need root, for
network namespaces) with ``SHARED_GPU_FAULT_REPORT`` set; each scenario notes its outcome and
time to recover there (``tests.faults.report``). Every scenario asserts that no variable was
lost and its ``SlotChecker`` that no slot ever ran two kernels, so a row exists only for a
scenario that passed: its "lost" and "double grants" are 0 by construction, and a failed one
is listed under the table with pytest's verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = dict(os.environ, SHARED_GPU_FAULT_REPORT=str(report))
        tests = ["tests/test_faults.py", "tests/test_faults_link.py"]
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *sys.argv[1:]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        rows = (
            [json.loads(line) for line in report.read_text().splitlines()]
            if report.exists()
            else []
        )
    print("| scenario | outcome | states lost | double grants | time to recover |")
    print("|---|---|---|---|---|")
    for row in rows:
        seconds = row["recovered_s"]
        took = f"{seconds:.2f} s" if isinstance(seconds, int | float) else "-"
        print(f"| {row['scenario']} | {row['outcome']} | 0 | 0 | {took} |")
    summary = [line for line in run.stdout.splitlines() if "passed" in line or "FAILED" in line]
    print("\n" + "\n".join(summary))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
