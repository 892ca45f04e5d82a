"""The network link to a GPU host goes down for real (a veth pair taken down; the host's sshd runs
in a network namespace): mid-cell, mid-save, mid-restore, mid-copy, and while Jupyter shuts the
kernel down. What the user sees is asserted each time, and that nothing is lost and no slot ever
has two live kernels. Needs root (network namespaces); CI runs as root.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import BrokerClient
from provisioner.session_state import Phase
from tests import netns
from tests.faults import SlotChecker, report, run, slow_load, slow_save, wait_until
from tests.pool import Pool, shut_down
from tests.sshd import ClientKeys, TestHost, start_hosts

LINK_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def net_hosts(
    tmp_path_factory: pytest.TempPathFactory, client_keys: ClientKeys
) -> Iterator[tuple[list[TestHost], list[netns.NetNamespace]]]:
    """Two sshd hosts, "netA" and "netB", each in a network namespace of its own."""
    why = netns.available()
    if why:
        pytest.skip(why)
    spaces = [netns.NetNamespace(i) for i in (1, 2)]
    for space in spaces:
        space.create()
    base = tmp_path_factory.mktemp("net-hosts")
    hosts = start_hosts(base, client_keys, ["netA", "netB"], netns=spaces)
    yield hosts, spaces
    for host in hosts:
        host.stop()
    for space in spaces:
        space.delete()


@pytest.fixture
def link_pool(
    tmp_path: Path, net_hosts, client_keys: ClientKeys, monkeypatch
) -> Iterator[tuple[Pool, dict[str, netns.NetNamespace]]]:
    hosts, spaces = net_hosts
    for space in spaces:
        space.link_up()
    pool = Pool(
        tmp_path / "pool",
        hosts,
        client_keys,
        heartbeat_interval="500ms",
        heartbeat_timeout="5s",
        fence_retry="2s",
    )
    pool.start()
    pool.install_spec(link_timeout=f"{LINK_TIMEOUT:g}s")
    monkeypatch.setenv("SHARED_GPU_TOKEN", pool.user_token)
    with SlotChecker([host.runtime_root for host in hosts]) as checker:
        yield pool, {host.name: space for host, space in zip(hosts, spaces, strict=True)}
        for space in spaces:
            space.link_up()
        pool.close()
    assert checker.samples > 0
    assert not checker.violations, checker.violations


def host_of(kc) -> str:
    return run(kc, "import os; print(os.environ['SHARED_GPU_HOST'])")[1].strip()


def test_link_down_mid_cell_the_kernel_runs_on_and_nothing_is_lost(link_pool):
    pool, links = link_pool
    km, kc = pool.start_kernel()
    link = links[host_of(kc)]
    run(kc, "n = 0")
    msg_id = kc.execute(
        "import time\nfor i in range(40):\n    n += 1\n    time.sleep(0.2)\nprint('done', n)"
    )
    time.sleep(1.0)
    link.link_down()
    wait_until(lambda: km.provisioner.session.phase is Phase.RECONNECTING, 10, "the drop")
    assert km.is_alive(), "a dropped link must not look like a dead kernel"
    time.sleep(1.0)
    link.link_up()
    up = time.monotonic()
    reply = kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    # the cell either ended after the link came back (its reply arrives) or during the outage
    # (its reply was lost: the cell says so)
    assert reply["content"]["status"] == "ok" or reply["content"]["ename"] == "ConnectionLost"
    content, out, _ = run(kc, "print(n)")
    assert content["status"] == "ok" and out.strip() == "40"
    ended = "ok" if reply["content"]["status"] == "ok" else "said its output was lost"
    report(
        "link down 3 s mid-cell", f"reconnected; the cell {ended}; n == 40", time.monotonic() - up
    )


def test_link_down_mid_save_the_state_is_saved_and_resumes(link_pool):
    pool, links = link_pool
    km, kc = pool.start_kernel()
    link = links[host_of(kc)]
    run(kc, slow_save(3) + "kept = {'a': [1, 2, 3]}")
    session = km.provisioner.session
    assert session.request_suspend("test")
    wait_until(lambda: session.phase is Phase.SUSPENDING, 5, "the save to start")
    time.sleep(0.5)
    link.link_down()
    time.sleep(LINK_TIMEOUT + 2)  # the save ends on the host meanwhile; its reply is lost
    link.link_up()
    up = time.monotonic()
    wait_until(lambda: session.phase is Phase.SUSPENDED, 40, "the suspend to complete")
    report(
        "link down mid-save",
        "the save completed on the host; suspended when the link was back; resumed whole",
        time.monotonic() - up,
    )
    assert not any(pool.slot_users().values()), "the suspended kernel kept its slot"
    content, out, _ = run(kc, "print(kept['a'], slow.seconds)")
    assert content["status"] == "ok", content
    assert out.strip().splitlines()[-1] == "[1, 2, 3] 3"


def test_link_down_mid_restore_the_cell_says_so_and_the_next_one_resumes(link_pool):
    pool, links = link_pool
    km, kc = pool.start_kernel()
    link = links[host_of(kc)]
    run(kc, slow_load(4) + "kept = 'me'")
    session = km.provisioner.session
    assert session.request_suspend("test")
    wait_until(lambda: session.phase is Phase.SUSPENDED, 30, "the suspend")
    msg_id = kc.execute("print(kept)")
    wait_until(lambda: session.phase is Phase.RESUMING and session.kernel, 30, "the restore")
    time.sleep(0.5)
    link.link_down()
    reply = kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "ResumeFailed"
    assert "dropped while the kernel restored" in reply["content"]["evalue"]
    link.link_up()
    up = time.monotonic()
    content, out, _ = run(kc, "print(kept)", timeout=90)
    assert content["status"] == "ok", content
    assert out.strip().splitlines()[-1] == "me"
    report(
        "link down mid-restore",
        "the cell said why; the next cell resumed whole",
        time.monotonic() - up,
    )


def test_link_down_mid_copy_the_resume_fails_clearly_and_the_state_stays(link_pool, tmp_path: Path):
    pool, links = link_pool
    # the destination takes 3 s to start its import, so the copy is under way when the
    # source's link goes down
    slow_python = tmp_path / "slow-import-python"
    slow_python.write_text(
        f'#!/bin/sh\ncase "$*" in *import-checkpoint*) sleep 3;; esac\nexec {sys.executable} "$@"\n'
    )
    slow_python.chmod(0o755)
    pool.config.write_text(
        pool.config.read_text().replace(f'python = "{sys.executable}"', f'python = "{slow_python}"')
    )
    pool.stop()
    pool.start()
    km, kc = pool.start_kernel()
    first = host_of(kc)
    # more than the SSH channel's window, so the export is still writing when the link drops
    run(kc, "import os; kept = os.urandom(8 << 20)")
    digest = run(kc, "import hashlib; print(hashlib.sha256(kept).hexdigest())")[1].strip()
    session = km.provisioner.session
    assert session.request_suspend("test")
    wait_until(lambda: session.phase is Phase.SUSPENDED, 30, "the suspend")
    other = BrokerClient(pool.url, pool.token("someone-else"))
    taken = other.request_lease("sim", "other-kernel")
    assert taken.host.name == first  # the resume must copy from it
    msg_id = kc.execute("print(hashlib.sha256(kept).hexdigest())")
    time.sleep(1.5)  # connected to both, the import not yet reading
    links[first].link_down()
    reply = kc.get_shell_msg(timeout=90)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "ResumeFailed", reply["content"]
    assert "checkpoint" in reply["content"]["evalue"]
    assert session.phase is Phase.SUSPENDED
    links[first].link_up()
    up = time.monotonic()
    content, out, _ = run(kc, "print(hashlib.sha256(kept).hexdigest())", timeout=90)
    assert content["status"] == "ok", content
    assert out.strip().splitlines()[-1] == digest
    report(
        "link down mid-copy",
        "the copy failed clearly, the state stayed; the next cell resumed whole",
        time.monotonic() - up,
    )
    other.release(taken.id)


def test_shutdown_during_an_outage_is_quick_and_the_slot_is_fenced_before_reuse(link_pool):
    pool, links = link_pool
    km, kc = pool.start_kernel()
    name = host_of(kc)
    slot = km.provisioner.session.lease.slot.id
    pid = int(run(kc, "import os; print(os.getpid())")[1])
    links[name].link_down()
    kc.stop_channels()
    started = time.monotonic()
    shut_down(km, timeout=20)
    took = time.monotonic() - started
    assert took < 10, f"shutdown during an outage took {took:.1f}s"
    # the kernel may still run on the host: its slot is not granted to anyone meanwhile
    other = BrokerClient(pool.url, pool.token("someone-else"))
    wanted = [other.request_lease("sim", f"k{i}") for i in range(2)]
    assert all(lease.slot is None or lease.slot.id != slot for lease in wanted)
    links[name].link_up()
    up = time.monotonic()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "the fence to end the kernel")
    report(
        f"shutdown during an outage (answered in {took:.1f}s)",
        "released as kernel_may_run; slot kept out until the fence ended the kernel",
        time.monotonic() - up,
    )
    for lease in wanted:
        other.release(lease.id)
