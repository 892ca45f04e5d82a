"""Files of a checkpoint directory: private, published atomically; the manifest's HMAC.

Used by :mod:`gpu_kernel.checkpoint` (the data lives in :mod:`gpu_kernel.checkpoint_blobs`);
nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
from pathlib import Path

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def manifest_mac(key: bytes, canonical: bytes) -> str:
    """The hex HMAC-SHA256 of the manifest's canonical JSON."""
    return hmac.new(key, b"jupyter-shared-gpu/manifest\0" + canonical, hashlib.sha256).hexdigest()


def make_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 (parents too, also 0700), whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)


def write_small(directory: Path, name: str, data: bytes) -> None:
    """Write ``data`` to a new 0600 file and fsync it."""
    fd = os.open(directory / name, _FILE_FLAGS, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir_for(directory: Path) -> Path:
    """A fresh private temp dir beside ``directory`` (same filesystem, so the rename is atomic)."""
    tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(6)}"
    make_private_dir(tmp)
    return tmp


def publish(tmp: Path, directory: Path) -> None:
    """fsync ``tmp`` and rename it to ``directory``, replacing an older checkpoint there."""
    fsync_dir(tmp)
    old: Path | None = None
    if directory.exists() or directory.is_symlink():
        old = directory.parent / f".{directory.name}.old-{secrets.token_hex(6)}"
        os.rename(directory, old)
    os.rename(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
