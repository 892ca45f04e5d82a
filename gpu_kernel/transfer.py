"""Copy a kernel's checkpoint from one GPU host to another, only the blobs the other lacks.

On the hosts: ``python -m gpu_kernel ctl KERNEL_ID export-checkpoint`` writes one JSON line
(``{"store", "blobs": [[digest, bytes]]}``, from the manifest of ``<runtime dir>/checkpoint``),
reads back one line (``{"want": [digests]}``), then writes a tar stream: the checkpoint's files
under ``checkpoint/`` and the wanted blobs under ``blobs/``. ``... import-checkpoint`` reads the
first line, answers which blobs its store (the user's, on that host) lacks, then reads the tar:
blobs go into the store, each refused unless its bytes hash to its name; files into
``<runtime dir>/checkpoint`` (dirs 0700, files 0600; absolute paths, ``..``, links and special
files refused; the old checkpoint is replaced only once the new one is complete); it prints
``{"ok": true, "path", "files", "bytes", "blobs", "blobs_present"}``. Here:
``copy_checkpoint`` relays the two lines and pipes the tar in chunks, so a checkpoint of any size
never sits in memory. The manifest's HMAC and digests are what make it trustworthy; this copy
only has to keep it whole and private.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from gpu_kernel import checkpoint_blobs as blobs
from gpu_kernel.errors import BadRequest, RemoteHostError
from gpu_kernel.protocol import check_host_name, check_kernel_id

if TYPE_CHECKING:
    from gpu_kernel.ssh import HostConnection, HostTarget

CHUNK = 1 << 20
CHECKPOINT_DIR = "checkpoint"
COPY_TIMEOUT = 120.0
_MAX_LINE = 64 << 20


class CheckpointTransferError(RemoteHostError):
    """A checkpoint could not be exported, copied or imported."""


# -- on the host -------------------------------------------------------------------------------


def _read_line(inp: IO[bytes], what: str) -> dict[str, Any]:
    line = inp.readline(_MAX_LINE)
    try:
        data = json.loads(line)
        if isinstance(data, dict):
            return data
    except ValueError:
        pass
    raise BadRequest(f"not a checkpoint stream: expected {what}, got {line[:80]!r}")


def _blob_list(raw: Any) -> list[tuple[str, int]]:
    try:
        return [(blobs.check_digest(d), int(n)) for d, n in raw]
    except (TypeError, ValueError) as e:
        raise BadRequest(f"not a checkpoint stream: bad blob list ({e})") from e


def _store(checkpoint_dir: Path, rel: Any) -> blobs.BlobStore:
    try:
        return blobs.store_of(checkpoint_dir, {"store": rel})
    except blobs.CheckpointError as e:
        raise BadRequest(e.message, e.hint) from e


def export_checkpoint(rdir: Path, out: IO[bytes], inp: IO[bytes] | None = None) -> int:
    """Offer ``rdir/checkpoint``'s blobs on ``out``, read the wanted ones from ``inp`` (default
    stdin), then write the tar stream; returns the bytes of file data sent."""
    src = rdir / CHECKPOINT_DIR
    if src.is_symlink() or not src.is_dir():
        raise BadRequest(
            f"no checkpoint in {rdir}", "the kernel has not been suspended on this host"
        )
    try:
        body = json.loads((src / "manifest.json").read_bytes())["manifest"]
        offer = _blob_list(body["blobs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadRequest(f"unreadable checkpoint manifest in {src}: {e}") from e
    store = _store(src, body.get("store"))
    out.write(json.dumps({"store": body["store"], "blobs": offer}).encode() + b"\n")
    out.flush()
    want = set(_read_line(inp or sys.stdin.buffer, "the wanted blobs").get("want") or [])
    total = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(src)):
            path = src / name
            if path.is_symlink() or not path.is_file():
                continue  # a checkpoint holds regular files only
            total += _add(tar, path, f"{CHECKPOINT_DIR}/{name}")
        for d, _n in offer:
            if d in want:
                try:
                    total += _add(tar, store.path(d), f"blobs/{d}")
                except FileNotFoundError:
                    raise BadRequest(f"blob {d[:16]}… of the checkpoint is missing here") from None
    out.flush()
    return total


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> int:
    with open(path, "rb") as f:
        info = tar.gettarinfo(fileobj=f, arcname=arcname)
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
        tar.addfile(info, f)
        return info.size


def _safe_parts(name: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or not parts or ".." in parts or "\\" in name:
        raise BadRequest(f"refusing checkpoint entry {name!r}: not a plain relative path")
    return parts


def import_checkpoint(rdir: Path, inp: IO[bytes], out: IO[bytes] | None = None) -> dict:
    """Answer on ``out`` (default stdout) which blobs this host lacks, then read the tar stream
    from ``inp`` into the store and ``rdir/checkpoint``; returns path, files, bytes, blobs."""
    rdir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if rdir.is_symlink() or (rdir.exists() and not rdir.is_dir()):
        raise BadRequest(f"runtime dir {rdir} is not a directory", "remove it and try again")
    offer = _read_line(inp, "the blobs on offer")
    final = rdir / CHECKPOINT_DIR
    store = _store(final, offer.get("store"))
    blob_list = _blob_list(offer.get("blobs"))
    rdir.mkdir(mode=0o700, exist_ok=True)
    with store.writing():
        want = {d: n for d, n in blob_list if not store.has(d, n)}
        reply = out or sys.stdout.buffer
        reply.write(json.dumps({"want": sorted(want)}).encode() + b"\n")
        reply.flush()
        result = _receive(rdir, inp, store, want)
        store.sync()
    store.sweep_now_and_then()
    return result | {"blobs": len(want), "blobs_present": len(blob_list) - len(want)}


def _receive(rdir: Path, inp: IO[bytes], store: blobs.BlobStore, want: dict[str, int]) -> dict:
    staging = rdir / (CHECKPOINT_DIR + ".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    files = total = 0
    pending = dict(want)
    try:
        try:
            tar = tarfile.open(fileobj=inp, mode="r|")  # noqa: SIM115 (closed below)
        except tarfile.TarError as e:
            raise BadRequest(f"not a checkpoint stream: {e}") from e
        with tar:
            for member in tar:
                parts = _safe_parts(member.name)
                if not member.isfile():
                    raise BadRequest(
                        f"refusing checkpoint entry {member.name!r}: links, special files and "
                        "folders have no place in a checkpoint"
                    )
                src = tar.extractfile(member)
                assert src is not None
                if parts[0] == "blobs" and len(parts) == 2 and pending.get(parts[1]) == member.size:
                    store.put_verified(parts[1], member.size, src.read)
                    del pending[parts[1]]
                elif parts[0] == CHECKPOINT_DIR and len(parts) == 2:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                    with os.fdopen(os.open(staging / parts[1], flags, 0o600), "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    files += 1
                else:
                    raise BadRequest(f"refusing checkpoint entry {member.name!r}: not asked for")
                total += member.size
        if pending:
            raise BadRequest(f"the stream ended before {len(pending)} of the blobs arrived")
        if not (staging / "manifest.json").is_file():
            raise BadRequest("the stream held no checkpoint manifest")
    except (tarfile.TarError, OSError, EOFError, blobs.BlobError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise BadRequest(f"checkpoint stream broken off or unreadable: {e}") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = rdir / CHECKPOINT_DIR
    old = rdir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists() or final.is_symlink():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return {"ok": True, "path": str(final), "files": files, "bytes": total}


# -- between hosts -----------------------------------------------------------------------------


def _ctl_argv(
    target: HostTarget, kernel_id: str, action: str, runtime_root: str | None
) -> list[str]:
    argv = [target.python, "-m", "gpu_kernel", "ctl", check_kernel_id(kernel_id), action]
    argv += ["--host", check_host_name(target.name)]
    return argv + (["--runtime-root", runtime_root] if runtime_root else [])


def _name(conn: HostConnection) -> str:
    return getattr(getattr(conn, "target", None), "name", "the host")


def _error_text(stderr: bytes) -> str:
    """The ``error`` of the JSON line a failed ctl writes on stderr, else its last lines."""
    text = stderr.decode(errors="replace").strip()
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return str(json.loads(line)["error"])
    return "\n".join(text.splitlines()[-5:]) or "(no output)"


def copy_checkpoint(
    src_conn: HostConnection,
    src_target: HostTarget,
    dst_conn: HostConnection,
    dst_target: HostTarget,
    kernel_id: str,
    runtime_root: str | None = None,
    timeout: float = COPY_TIMEOUT,
) -> int:
    """Copy the checkpoint of ``kernel_id`` from one host to the other, sending only the blobs
    the destination's store lacks; returns the bytes sent.

    ``runtime_root`` applies to both hosts (None: each host's default). Raises
    CheckpointTransferError naming the side that failed.
    """
    src_argv = _ctl_argv(src_target, kernel_id, "export-checkpoint", runtime_root)
    dst_argv = _ctl_argv(dst_target, kernel_id, "import-checkpoint", runtime_root)
    src_name, dst_name = _name(src_conn), _name(dst_conn)
    with (
        src_conn.open_stream(src_argv, timeout) as src,
        dst_conn.open_stream(dst_argv, timeout) as dst,
    ):
        write_failed: Exception | None = None
        reply = offer = b""
        try:
            offer = src.stdout.readline(_MAX_LINE)
            if offer:
                dst.stdin.write(offer)
                dst.stdin.flush()
                want = dst.stdout.readline(_MAX_LINE)
                if b'"want"' in want:
                    src.stdin.write(want)
                    src.stdin.flush()
                else:
                    reply = want  # the importer refused at once: its answer says why
            src.close_stdin()
            if offer and not reply:
                while chunk := src.stdout.read(CHUNK):
                    dst.stdin.write(chunk)
                dst.stdin.flush()
        except OSError as e:  # the importer gave up (its reply says why) or a host went away
            write_failed = e
        with contextlib.suppress(OSError):
            src.close_stdin()
            dst.close_stdin()
        with contextlib.suppress(OSError):  # let the exporter finish instead of blocking
            while src.stdout.read(CHUNK):
                pass
        src_res = src.wait(timeout)
        with contextlib.suppress(OSError):
            reply += dst.stdout.read()
        dst_res = dst.wait(timeout)
    src_error = _error_text(src_res.stderr) if src_res.returncode != 0 else None
    if src_error is not None and not offer:
        raise CheckpointTransferError(
            f"cannot export the checkpoint of kernel {kernel_id} from {src_name}: {src_error}",
            "was the kernel suspended on that host, and is its runtime dir still there?",
        )
    try:
        data = json.loads(reply.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        data = {"ok": False, "error": _error_text(dst_res.stderr)}
    if dst_res.returncode != 0 or not data.get("ok"):
        detail = data.get("error") or _error_text(dst_res.stderr)
        if write_failed is not None:
            detail += f" (while sending: {write_failed})"
        if src_error is not None:
            detail += f" (the export from {src_name} failed too: {src_error})"
        raise CheckpointTransferError(
            f"cannot import the checkpoint of kernel {kernel_id} on {dst_name}: {detail}",
            f"check free disk space and the runtime dir's permissions on {dst_name}",
        )
    if src_error is not None:
        raise CheckpointTransferError(
            f"cannot export the checkpoint of kernel {kernel_id} from {src_name}: {src_error}",
            "was the kernel suspended on that host, and is its runtime dir still there?",
        )
    return int(data["bytes"])
