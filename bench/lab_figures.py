"""What a JupyterLab user waits for, in a real headless Chromium: the Shared GPU kernel beside a
local python3 kernel, measured in the same run, and the slots 10 opened notebooks hold.

    .venv/bin/python bench/lab_figures.py [--repeats 3] [--notebooks 10]

Starts two real sshd hosts on loopback (one "sim" slot each), a real broker, `jupyter lab` and
Debian's chromium (as tests/test_browser.py does; needs openssh-server and chromium), then prints:
- click on the launcher card to a ready kernel (the status bar says Idle), median;
- first cell to its output (`print`), median: for Shared GPU with lazy attach this includes the
  lease and the launch, with eager attach those happened before "ready";
- GPU slots held (and requests queued) once N notebooks are open, by the broker's status.
Not a test: timings on shared machines drift, so read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser import (
    LabPage,
    browser_missing,
    lab_server,
    open_browser,
    workspace_with_notebooks,
)
from tests.jupyter_server import JupyterServer
from tests.pool import Pool, loopback_pool

LOCAL = "Python 3 (ipykernel)"
SHARED = "Shared GPU"


def shut_down_all(lab: JupyterServer, pool: Pool) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for session in lab.api("GET", "/api/sessions")[1] or []:
            lab.api("DELETE", f"/api/sessions/{session['id']}")
        for kernel in lab.api("GET", "/api/kernels")[1] or []:
            lab.api("DELETE", f"/api/kernels/{kernel['id']}")
        if not live_leases(pool) and not lab.api("GET", "/api/kernels")[1]:
            return
        time.sleep(0.5)


def live_leases(pool: Pool) -> list[dict]:
    return [x for x in pool.status()["leases"] if x["state"] in ("granted", "queued")]


def one_run(context, lab: JupyterServer, pool: Pool, label: str) -> tuple[float, float]:
    """(click to ready, first cell to output) in seconds, in a fresh JupyterLab page."""
    ui = LabPage(context.new_page(), lab)
    ui.open()
    ready = ui.new_notebook(label)
    started = time.monotonic()
    ui.run_cell('print("first output")')
    ui.output(0).get_by_text("first output").wait_for(timeout=120_000)
    first = time.monotonic() - started
    ui.page.close()
    shut_down_all(lab, pool)
    return ready, first


def slots_after_opening(context, lab: JupyterServer, pool: Pool, n: int) -> tuple[int, int]:
    """(granted, queued) leases a few seconds after N Shared GPU notebooks were opened."""
    names = [f"bench-{i}.ipynb" for i in range(n)]
    ui = LabPage(context.new_page(), lab)
    ui.open(workspace_with_notebooks(lab, "bench", names))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(lab.api("GET", "/api/sessions")[1] or []) < n:
        time.sleep(0.5)
    time.sleep(5)  # let every start that is going to ask the broker do so
    leases = live_leases(pool)
    sessions = len(lab.api("GET", "/api/sessions")[1] or [])
    print(f"  {sessions} sessions with {n} notebooks open", file=sys.stderr)
    ui.page.close()
    granted = sum(1 for x in leases if x["state"] == "granted")
    return granted, sum(1 for x in leases if x["state"] == "queued")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--notebooks", type=int, default=10)
    args = parser.parse_args()
    if why := browser_missing():
        sys.exit(why)

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        hosts, pool = loopback_pool(base, ["hostA", "hostB"])
        lab = None
        try:
            pool.start()
            pool.install_spec(lease_timeout="60s")
            env = {"SHARED_GPU_RUNTIME_ROOT": str(base / "kernels")}
            os.environ["SHARED_GPU_TOKEN"] = pool.user_token
            lab = lab_server(pool, base / "lab", env)
            results: dict[str, list[tuple[float, float]]] = {LOCAL: [], SHARED: []}
            with open_browser(base / "chromium") as context:
                one_run(context, lab, pool, LOCAL)  # warm-up: page assets, imports
                for _ in range(args.repeats):  # alternate, so drift hits both sides
                    for label in (LOCAL, SHARED):
                        results[label].append(one_run(context, lab, pool, label))
                        print(f"  {label}: {results[label][-1]}", file=sys.stderr)
                granted, queued = slots_after_opening(context, lab, pool, args.notebooks)
        finally:
            if lab is not None:
                lab.stop()
            pool.stop()
            for host in hosts:
                host.stop()

    def median(label: str, index: int) -> float:
        return statistics.median(r[index] for r in results[label])

    title = f"measure (median of {args.repeats}, s)"
    print(f"\n{title:44} {'local':>8} {'Shared GPU':>11} {'ratio':>7}")
    for name, index in (("click on launcher card to ready kernel", 0), ("first cell to output", 1)):
        local, shared = median(LOCAL, index), median(SHARED, index)
        print(f"{name:44} {local:8.2f} {shared:11.2f} {shared / local:6.2f}x")
    print(
        f"\nGPU slots held after opening {args.notebooks} Shared GPU notebooks: {granted} "
        f"(and {queued} requests queued; pool of 2 slots; goal: 0)"
    )


if __name__ == "__main__":
    main()
