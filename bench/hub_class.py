"""A class of hub users on a small pool: each student's first cell, through a real JupyterHub.

    .venv/bin/python bench/hub_class.py [--students 30] [--slots 8] [--over 60]

Starts sshd test hosts with ``--slots`` simulated slots, a broker that is the hub's service
(``members_only``, one class bound to a hub group), and a real JupyterHub (dummy authenticator,
simple local spawner, configurable-http-proxy). Then ``--students`` hub users arrive, staggered
over ``--over`` seconds: each one's server is started through the hub's REST API, a "Shared GPU"
kernel through the server's REST API, and a first cell (``print``) through its websocket, as
JupyterLab would. Kernels stay open and idle, so the broker suspends them
(``idle_suspend_when_queued``) for the students still waiting. Prints, per student, the time from
arrival to the cell's output (server start, kernel start, cell), the identity cache's hit rate
and hub calls over the run (``/metrics``), and the dashboard's page weight and time to first
paint in Debian's chromium (admin and teacher pages, the pool busy). Not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provisioner.install import main as install_main
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.hub import TestHub
from tests.jupyter_ws import run_cell, start_kernel
from tests.pool import Pool, loopback_pool
from tests.sshd import end_warm_interpreters


def pool_config(pool: Pool, slots_per_host: int, hub: TestHub) -> str:
    text = pool.config.read_text()
    text = re.sub(
        r'  device = "\d+"\n  simulated = true',
        f"  count = {slots_per_host}\n  simulated = true",
        text,
    )
    text = text.replace("[policy]\n", "[policy]\nmembers_only = true\n", 1)
    return (
        text
        + hub.identity_toml("60s")
        + '\n[[groups]]\nname = "class"\nhub_group = "class"\nteacher_hub_group = "staff"\n'
        + 'kinds = ["sim"]\n'
    )


def student(hub: TestHub, name: str, arrival: float) -> dict:
    """Arrive at ``arrival`` (monotonic): server, kernel, first cell; the times of each step."""
    time.sleep(max(0.0, arrival - time.monotonic()))
    start = time.monotonic()
    server = hub.start_server(name, timeout=600)
    served = time.monotonic()
    kernel_id = start_kernel(server, hub.admin_token)
    kerneled = time.monotonic()
    result = run_cell(server, hub.admin_token, kernel_id, "print('ok')", timeout=600)
    done = time.monotonic()
    return {
        "name": name,
        "ok": result.status == "ok" and "ok" in result.stdout,
        "error": result.text if result.status != "ok" else "",
        "server": served - start,
        "kernel": kerneled - served,
        "cell": done - kerneled,
        "total": done - start,
        "done": done,
    }


def metrics(pool: Pool) -> dict[str, float]:
    request = urllib.request.Request(
        pool.url + "/metrics", headers={"Authorization": f"Bearer {pool.admin_token}"}
    )
    out = {}
    for line in urllib.request.urlopen(request, timeout=10).read().decode().splitlines():
        if line.startswith("gpu_broker_hub") or line.startswith("gpu_broker_leases_granted"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def dashboard(pool: Pool, token: str, loads: int = 5) -> dict[str, float]:
    """Sign in with ``token`` in chromium; median bytes and first (contentful) paint of the
    board over ``loads`` loads."""
    from playwright.sync_api import sync_playwright

    weights, paints, contentful = [], [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_context().new_page()
        page.goto(pool.url + "/dashboard/login?with=token")
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.wait_for_url("**/dashboard/")
        for _ in range(loads):
            response = page.goto(pool.url + "/dashboard/", wait_until="load")
            assert response is not None
            weights.append(
                len(response.body()) + sum(len(k) + len(v) + 4 for k, v in response.headers.items())
            )
            # polled from here: the board's CSP forbids the eval a string predicate needs
            deadline = time.monotonic() + 10
            while page.evaluate("() => performance.getEntriesByType('paint').length") < 2:
                assert time.monotonic() < deadline, "no first contentful paint within 10 s"
                time.sleep(0.05)
            entries = page.evaluate(
                "() => Object.fromEntries(performance.getEntriesByType('paint')"
                ".map(e => [e.name, e.startTime]))"
            )
            paints.append(entries.get("first-paint", float("nan")))
            contentful.append(entries.get("first-contentful-paint", float("nan")))
        browser.close()
    return {
        "bytes": statistics.median(weights),
        "first_paint_ms": statistics.median(paints),
        "first_contentful_paint_ms": statistics.median(contentful),
    }


def error_blocks(log: str) -> list[str]:
    """Each ERROR line of the broker's log with the traceback lines that follow it."""
    blocks: list[str] = []
    for line in log.splitlines():
        if " ERROR " in line:
            blocks.append("  " + line)
        elif blocks and not line[:4].isdigit():  # a traceback's line, not a new log record
            blocks[-1] += "\n    " + line
    return blocks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--slots", type=int, default=8, help="simulated slots (on 2 hosts)")
    parser.add_argument("--over", type=float, default=60.0, help="arrivals spread over S seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hub-class-") as tmp:
        base = Path(tmp)
        policy = {"idle_suspend_after": "10m", "idle_suspend_when_queued": "5s"}
        hosts, pool = loopback_pool(base, ["hostA", "hostB"], **policy)
        image = base / "image"
        install_args = ["install", "--prefix", str(image), "--broker-url", pool.url]
        assert install_main([*install_args, "--jupyterhub", "--lease-timeout", "10m"]) == 0
        spawner_env = {"JUPYTER_PATH": str(image / "share" / "jupyter")}
        hub = TestHub(base / "hub", pool.url, spawner_env, spawn_timeout=600)
        pool.config.write_text(pool_config(pool, args.slots // 2, hub))
        pool.start()
        try:
            hub.start()
            names = [f"s{i:02d}" for i in range(1, args.students + 1)]
            for name in [*names, "teacher"]:
                hub.add_user(name)
            hub.add_group("class", names)
            hub.add_group("staff", ["teacher"])
            before = metrics(pool)
            t0 = time.monotonic() + 1.0
            step = args.over / max(1, args.students - 1)
            with concurrent.futures.ThreadPoolExecutor(args.students) as pool_exec:
                futures = [
                    pool_exec.submit(student, hub, name, t0 + i * step)
                    for i, name in enumerate(names)
                ]
                rows = [f.result() for f in futures]
            after = metrics(pool)
            teacher_token = pool.token("teacher", role="teacher")  # a broker token for the page
            admin_page = dashboard(pool, pool.admin_token)
            teacher_page = dashboard(pool, teacher_token)
        finally:
            hub.stop()
            pool.close()
            errors = error_blocks((pool.base / "broker.log").read_text())
            if errors:
                print("broker log errors:\n" + "\n".join(errors[:5]))
            for host in hosts:
                host.stop()
            end_warm_interpreters(base)
    report(args, rows, before, after, t0, admin_page, teacher_page)
    return 0 if all(row["ok"] for row in rows) else 1


def report(args, rows, before, after, t0, admin_page, teacher_page) -> None:
    def q(values: list[float], p: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, round(p * (len(values) - 1)))]

    failed = [row for row in rows if not row["ok"]]
    print(
        f"\n{args.students} hub users, {args.slots} simulated slots, arrivals over {args.over:g} s"
    )
    print(f"{'step':<34}{'median s':>10}{'p95 s':>10}{'max s':>10}")
    for key, label in (
        ("server", "hub starts the user's server"),
        ("kernel", "server starts the kernel (lazy)"),
        ("cell", "first cell: lease, launch, output"),
        ("total", "arrival to first output"),
    ):
        values = [row[key] for row in rows]
        median, p95 = statistics.median(values), q(values, 0.95)
        print(f"{label:<34}{median:>10.2f}{p95:>10.2f}{max(values):>10.2f}")
    last = max(row["done"] for row in rows)
    print(f"class done (first arrival to last output): {last - t0:.1f} s; failed: {len(failed)}")
    for row in failed[:5]:
        print(f"  {row['name']}: {row['error'][:200]}")
    hit = 'gpu_broker_hub_identity_lookups_total{result="hit"}'
    miss = 'gpu_broker_hub_identity_lookups_total{result="miss"}'
    hits, misses = after[hit] - before[hit], after[miss] - before[miss]
    user_calls = (
        after['gpu_broker_hub_calls_total{call="user"}']
        - before['gpu_broker_hub_calls_total{call="user"}']
    )
    group_calls = (
        after['gpu_broker_hub_calls_total{call="groups"}']
        - before['gpu_broker_hub_calls_total{call="groups"}']
    )
    granted = after["gpu_broker_leases_granted_total"] - before["gpu_broker_leases_granted_total"]
    rate = hits / max(1, hits + misses)
    print(
        f"identity cache: {hits:.0f} hits, {misses:.0f} misses, hit rate {rate:.1%}; "
        f"hub calls: {user_calls:.0f} token lookups, {group_calls:.0f} group reads; "
        f"leases granted: {granted:.0f}"
    )
    for label, page in (("admin", admin_page), ("teacher", teacher_page)):
        print(
            f"dashboard ({label}): {page['bytes'] / 1024:.1f} KiB in one response (nothing else), "
            f"first paint {page['first_paint_ms']:.0f} ms, first contentful paint "
            f"{page['first_contentful_paint_ms']:.0f} ms (median of 5 loads)"
        )


if __name__ == "__main__":
    sys.exit(main())
