"""Copy a kernel's checkpoint from one GPU host to another, streamed through this machine.

On the hosts: ``python -m gpu_kernel ctl KERNEL_ID export-checkpoint`` writes a tar stream of
``<runtime dir>/checkpoint`` to stdout; ``... import-checkpoint`` reads one from stdin into
``<runtime dir>/checkpoint`` (dirs 0700, files 0600; absolute paths, ``..``, links and special
files refused; the old checkpoint is replaced only once the new one is complete) and prints
``{"ok": true, "path", "files", "bytes"}``. Here: ``copy_checkpoint`` pipes one into the other
in chunks, so a checkpoint of any size never sits in memory. The HMACs inside the checkpoint are
what make it trustworthy; this copy only has to keep it whole and private.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from gpu_kernel.errors import BadRequest, RemoteHostError
from gpu_kernel.protocol import check_host_name, check_kernel_id

if TYPE_CHECKING:
    from gpu_kernel.ssh import HostConnection, HostTarget

CHUNK = 1 << 20
CHECKPOINT_DIR = "checkpoint"
COPY_TIMEOUT = 120.0


class CheckpointTransferError(RemoteHostError):
    """A checkpoint could not be exported, copied or imported."""


# -- on the host -------------------------------------------------------------------------------


def export_checkpoint(rdir: Path, out: IO[bytes]) -> int:
    """Write ``rdir/checkpoint`` as a tar stream to ``out``; returns the bytes of file data."""
    src = rdir / CHECKPOINT_DIR
    if src.is_symlink() or not src.is_dir():
        raise BadRequest(
            f"no checkpoint in {rdir}", "the kernel has not been suspended on this host"
        )
    total = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
            dirnames.sort()
            base = Path(dirpath)
            rel = base.relative_to(src)
            if rel != Path("."):
                info = tarfile.TarInfo(rel.as_posix())
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            for name in sorted(filenames):
                path = base / name
                if path.is_symlink() or not path.is_file():
                    continue  # a checkpoint holds regular files only
                with open(path, "rb") as f:
                    info = tar.gettarinfo(fileobj=f, arcname=(rel / name).as_posix())
                    info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
                    tar.addfile(info, f)
                    total += info.size
    out.flush()
    return total


def _safe_parts(name: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or not parts or ".." in parts or "\\" in name:
        raise BadRequest(f"refusing checkpoint entry {name!r}: not a plain relative path")
    return parts


def import_checkpoint(rdir: Path, inp: IO[bytes]) -> dict:
    """Read a tar stream from ``inp`` into ``rdir/checkpoint``; returns path, files and bytes."""
    rdir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if rdir.is_symlink() or (rdir.exists() and not rdir.is_dir()):
        raise BadRequest(f"runtime dir {rdir} is not a directory", "remove it and try again")
    rdir.mkdir(mode=0o700, exist_ok=True)
    staging = rdir / (CHECKPOINT_DIR + ".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    files = total = 0
    try:
        try:
            tar = tarfile.open(fileobj=inp, mode="r|")  # noqa: SIM115 (closed below)
        except tarfile.TarError as e:
            raise BadRequest(f"not a checkpoint stream: {e}") from e
        with tar:
            for member in tar:
                parts = _safe_parts(member.name)
                target = staging.joinpath(*parts)
                if member.isdir():
                    target.mkdir(mode=0o700, parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise BadRequest(
                        f"refusing checkpoint entry {member.name!r}: links and special files "
                        "have no place in a checkpoint"
                    )
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with os.fdopen(os.open(target, flags, 0o600), "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                files += 1
                total += member.size
    except (tarfile.TarError, OSError) as e:
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
    """Copy the checkpoint of ``kernel_id`` from one host to the other; returns its bytes.

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
        src.close_stdin()
        write_failed: Exception | None = None
        try:
            while chunk := src.stdout.read(CHUNK):
                dst.stdin.write(chunk)
            dst.stdin.flush()
        except OSError as e:  # the importer gave up (its reply says why) or a host went away
            write_failed = e
        with contextlib.suppress(OSError):
            dst.close_stdin()
        if write_failed is not None:  # let the exporter finish instead of blocking on its pipe
            with contextlib.suppress(OSError):
                while src.stdout.read(CHUNK):
                    pass
        src_res = src.wait(timeout)
        reply = b""
        with contextlib.suppress(OSError):
            reply = dst.stdout.read()
        dst_res = dst.wait(timeout)
    if src_res.returncode != 0:
        raise CheckpointTransferError(
            f"cannot export the checkpoint of kernel {kernel_id} from {src_name}: "
            f"{_error_text(src_res.stderr)}",
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
        raise CheckpointTransferError(
            f"cannot import the checkpoint of kernel {kernel_id} on {dst_name}: {detail}",
            f"check free disk space and the runtime dir's permissions on {dst_name}",
        )
    return int(data["bytes"])
