"""Checkpoint copy between two real sshd hosts, the tar import's refusals, and ``open_stream``."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_kernel import checkpoint_blobs as blobs
from gpu_kernel import transfer
from gpu_kernel.errors import BadRequest
from gpu_kernel.ssh import HostConnection, HostTarget, connect
from gpu_kernel.transfer import CheckpointTransferError, copy_checkpoint
from tests.conftest import target_for
from tests.sshd import ClientKeys, TestHost
from tests.test_probe import python_with_env

KEY = b"transfer-key-" + uuid.uuid4().hex.encode()


@pytest.fixture
def two_hosts(
    ssh_hosts: list[TestHost], client_keys: ClientKeys, tmp_path: Path
) -> Iterator[tuple[HostConnection, HostConnection, Path, Path]]:
    """SSH connections to hostA and hostB, each with its own runtime root (one machine here)."""
    roots = [tmp_path / "rootA", tmp_path / "rootB"]
    conns = []
    for host, root in zip(ssh_hosts, roots, strict=True):
        python = python_with_env(tmp_path / f"py-{host.name}", SHARED_GPU_RUNTIME_ROOT=str(root))
        conns.append(connect(target_for(host, client_keys, python=python)))
    yield conns[0], conns[1], roots[0], roots[1]
    for c in conns:
        c.close()


def make_checkpoint(rdir: Path, **extra: object) -> dict:
    """A real checkpoint (save_namespace, the runtime dir's blob store) of a small namespace
    plus 3 MiB of bytes."""
    from gpu_kernel.checkpoint import runtime_store, save_namespace

    rdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ns = {"x": 42, "words": ["a", "b"], "blob": os.urandom(3 << 20), "f": (lambda v: v + 1)}
    ns |= extra
    save_namespace(
        ns,
        rdir / "checkpoint",
        KEY,
        execution_count=7,
        cwd=str(rdir),
        store=runtime_store(rdir, "alice"),
    )
    return ns


def modes(root: Path) -> set[tuple[str, int]]:
    found = set()
    for p in [root, *root.rglob("*")]:
        found.add(("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)))
    return found


def test_copy_between_hosts_and_load_there(
    two_hosts: tuple[HostConnection, HostConnection, Path, Path],
) -> None:
    from gpu_kernel.checkpoint import load_namespace

    conn_a, conn_b, root_a, root_b = two_hosts
    root_a, root_b = root_a / conn_a.target.name, root_b / conn_b.target.name  # per-host dirs
    kid = "kern-" + uuid.uuid4().hex[:12]
    ns = make_checkpoint(root_a / kid)
    py_a, py_b = conn_a.target, conn_b.target
    copied = copy_checkpoint(conn_a, py_a, conn_b, py_b, kid)
    src_files = [p for p in [*(root_a / kid / "checkpoint").iterdir(), *blobs_of(root_a)]]
    assert copied == sum(p.stat().st_size for p in src_files) > 3 << 20
    dest = root_b / kid / "checkpoint"
    assert modes(root_b) <= {("d", 0o700), ("f", 0o600)}
    loaded, manifest = load_namespace(dest, KEY)
    assert loaded["x"] == 42 and loaded["words"] == ["a", "b"] and loaded["blob"] == ns["blob"]
    assert loaded["f"](1) == 2 and manifest.execution_count == 7

    # Again: the destination holds every blob, only the manifest travels; no staging left.
    again = copy_checkpoint(conn_a, py_a, conn_b, py_b, kid)
    assert again == (root_a / kid / "checkpoint" / "manifest.json").stat().st_size < 64 << 10
    assert sorted(p.name for p in (root_b / kid).iterdir()) == ["checkpoint"]

    # One variable changed: only its blob (and the manifest) travels.
    make_checkpoint(root_a / kid, blob=ns["blob"], extra=os.urandom(2 << 20))
    third = copy_checkpoint(conn_a, py_a, conn_b, py_b, kid)
    assert (2 << 20) < third < (2 << 20) + (256 << 10)
    assert load_namespace(dest, KEY)[0]["blob"] == ns["blob"]

    # Nothing to export: the error names the source host and keeps the destination intact.
    with pytest.raises(CheckpointTransferError, match=f"from {conn_b.target.name}: no checkpoint"):
        copy_checkpoint(conn_b, py_b, conn_a, py_a, "kern-none")
    assert not (root_a / "kern-none" / "checkpoint").exists()

    # The destination refuses (its runtime dir is not a directory): the error names it.
    (root_b / "kern-file").parent.mkdir(exist_ok=True)
    (root_b / "kern-file").write_text("in the way")
    (root_a / kid).rename(root_a / "kern-file")
    with pytest.raises(CheckpointTransferError, match=f"on {conn_b.target.name}: runtime dir"):
        copy_checkpoint(conn_a, py_a, conn_b, py_b, "kern-file")


def blobs_of(host_root: Path) -> list[Path]:
    return [p for p in (host_root / ".blobs").rglob("*") if len(p.name) == 64]


def tar_bytes(entries: list[tuple[str, bytes | str | None]]) -> bytes:
    """A tar with files (bytes), symlinks (str target) and hard links (None: to the first)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, what in entries:
            info = tarfile.TarInfo(name)
            if isinstance(what, bytes):
                info.size = len(what)
                tar.addfile(info, io.BytesIO(what))
            else:
                info.type = tarfile.SYMTYPE if isinstance(what, str) else tarfile.LNKTYPE
                info.linkname = what or entries[0][0]
                tar.addfile(info)
    return buf.getvalue()


def stream(
    entries: list[tuple[str, bytes | str | None]],
    offer: list[tuple[str, int]] = (),  # type: ignore[assignment]
    store: str = "../../.blobs/alice",
) -> io.BytesIO:
    """What an exporter sends: the line offering blobs, then the tar."""
    line = json.dumps({"store": store, "blobs": [list(b) for b in offer]}).encode() + b"\n"
    return io.BytesIO(line + tar_bytes(entries))


MANIFEST = "checkpoint/manifest.json"


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([("../evil", b"x")], "not a plain relative path"),
        ([("/etc/evil", b"x")], "not a plain relative path"),
        ([("checkpoint/../../evil", b"x")], "not a plain relative path"),
        ([(MANIFEST, b"x"), ("checkpoint/link", "/etc/passwd")], "links, special files"),
        ([(MANIFEST, b"x"), ("checkpoint/hard", None)], "links, special files"),
        ([(MANIFEST, b"x"), ("blobs/" + "ab" * 32, b"x")], "not asked for"),
        ([(MANIFEST, b"x"), ("elsewhere/file", b"x")], "not asked for"),
    ],
)
def test_import_refuses_escapes_and_links(
    tmp_path: Path, entries: list[tuple[str, bytes | str | None]], words: str
) -> None:
    rdir = tmp_path / "rt" / "host" / "kern-1"
    transfer.import_checkpoint(rdir, stream([(MANIFEST, b"old")]), io.BytesIO())
    with pytest.raises(BadRequest, match=words):
        transfer.import_checkpoint(rdir, stream(entries), io.BytesIO())
    assert sorted(p.name for p in rdir.iterdir()) == ["checkpoint"]  # no staging left
    assert (rdir / "checkpoint" / "manifest.json").read_bytes() == b"old"  # old one intact
    assert not (tmp_path / "rt" / "evil").exists() and not (tmp_path / "evil").exists()


def test_import_refuses_blobs_that_are_not_what_they_claim(tmp_path: Path) -> None:
    rdir = tmp_path / "host" / "kern-1"
    data = os.urandom(1000)
    d = blobs.digest(data)
    lie = blobs.digest(b"something else")
    with pytest.raises(BadRequest, match="do not match its digest"):
        transfer.import_checkpoint(
            rdir, stream([(MANIFEST, b"m"), (f"blobs/{lie}", data)], [(lie, 1000)]), io.BytesIO()
        )
    assert not blobs_of(tmp_path / "host") and not (rdir / "checkpoint").exists()
    with pytest.raises(BadRequest, match="names its blob store"):
        transfer.import_checkpoint(rdir, stream([], [], store="../../../../etc"), io.BytesIO())
    with pytest.raises(BadRequest, match=r"invalid|blob list"):
        transfer.import_checkpoint(rdir, stream([], [("../x", 1)]), io.BytesIO())
    want = io.BytesIO()
    result = transfer.import_checkpoint(
        rdir, stream([(MANIFEST, b"m"), (f"blobs/{d}", data)], [(d, 1000)]), want
    )
    assert json.loads(want.getvalue()) == {"want": [d]}
    assert result["blobs"] == 1 and result["blobs_present"] == 0
    assert [p.read_bytes() for p in blobs_of(tmp_path / "host")] == [data]
    assert modes(tmp_path / "host") == {("d", 0o700), ("f", 0o600)}


def test_import_of_a_broken_stream_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    rdir = tmp_path / "host" / "kern-2"
    payload = os.urandom(100_000)
    d = blobs.digest(payload)
    doc = {"manifest": {"store": "../../.blobs/alice", "blobs": [[d, 100_000]]}}
    manifest = json.dumps(doc).encode()
    good = stream([(MANIFEST, manifest), (f"blobs/{d}", payload)], [(d, 100_000)]).getvalue()
    result = transfer.import_checkpoint(rdir, io.BytesIO(good), io.BytesIO())
    size = len(manifest) + 100_000
    assert result["files"] == 1 and result["bytes"] == size
    assert modes(rdir / "checkpoint") == {("d", 0o700), ("f", 0o600)}
    (tmp_path / "host" / ".blobs").rename(tmp_path / "host" / ".gone")  # must come again
    for bad in (good[:50_000], good[:400] + b"not a tar at all" * 100, b""):
        with pytest.raises(BadRequest, match="checkpoint stream"):
            transfer.import_checkpoint(rdir, io.BytesIO(bad), io.BytesIO())
        assert (rdir / "checkpoint" / "manifest.json").read_bytes() == manifest
    assert not blobs_of(tmp_path / "host")  # a blob cut short is not kept either
    transfer.import_checkpoint(rdir, io.BytesIO(good), io.BytesIO())
    out = io.BytesIO()
    assert transfer.export_checkpoint(rdir, out, io.BytesIO(b'{"want": []}\n')) == len(manifest)
    out = io.BytesIO()
    sent = transfer.export_checkpoint(rdir, out, io.BytesIO(json.dumps({"want": [d]}).encode()))
    assert sent == size
    other = tmp_path / "other" / "kern-3"
    again = transfer.import_checkpoint(other, io.BytesIO(out.getvalue()), io.BytesIO())
    assert again["bytes"] == size and blobs_of(tmp_path / "other")


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_open_stream_pipes_large_data_both_ways(
    where: str, ssh_hosts: list[TestHost], client_keys: ClientKeys
) -> None:
    target = (
        HostTarget(name="here", address="local")
        if where == "local"
        else target_for(ssh_hosts[0], client_keys)
    )
    data = os.urandom(6 << 20)
    with connect(target) as conn, conn.open_stream(["sh", "-c", "cat; echo done >&2"]) as s:

        def write() -> None:
            for i in range(0, len(data), 1 << 20):
                s.stdin.write(data[i : i + (1 << 20)])
            s.stdin.flush()
            s.close_stdin()

        writer = threading.Thread(target=write)
        writer.start()
        got = s.stdout.read()
        writer.join(10)
        res = s.wait(10)
    assert got == data and res.returncode == 0 and res.stderr == b"done\n"
    with connect(target) as conn, conn.open_stream(["sh", "-c", "exit 3"]) as s:
        s.close_stdin()
        assert s.stdout.read() == b"" and s.wait(10).returncode == 3
