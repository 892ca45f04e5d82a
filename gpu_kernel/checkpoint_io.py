"""Files of a checkpoint: private, HMAC'd while written, verified in one read, published atomically.

Used by :mod:`gpu_kernel.checkpoint`; nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_BUFFER = 1 << 20  # small writes are gathered up to this size before they reach the disk
_CHUNK = 8 << 20  # read size while verifying


class Gmac:
    """GMAC (AES-256-GCM over no plaintext): ~15x faster than HMAC-SHA256 on CPUs without SHA-NI.

    The AES key is HMAC-SHA256(session key, label, file name, nonce): unique per file and nonce.
    """

    def __init__(self, key: bytes, name: str, nonce: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        label = b"jupyter-shared-gpu/checkpoint-gmac/" + name.encode() + b"\0" + nonce
        aes_key = hmac.new(key, label, hashlib.sha256).digest()
        self._enc = Cipher(algorithms.AES(aes_key), modes.GCM(nonce)).encryptor()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._enc.authenticate_additional_data(data)

    def hexdigest(self) -> str:
        self._enc.finalize()
        return self._enc.tag.hex()


def new_mac(key: bytes, name: str, alg: str, nonce: bytes = b"") -> hmac.HMAC | Gmac:
    """The MAC of file ``name``: "hmac-sha256" (can be copied, for rollback) or "gmac-aes256"."""
    if alg == "gmac-aes256":
        return Gmac(key, name, nonce)
    if alg == "hmac-sha256":
        return file_mac(key, name)
    raise ValueError(f"unknown MAC algorithm {alg!r}")


def file_mac(key: bytes, name: str) -> hmac.HMAC:
    """A fresh HMAC-SHA256 for the file ``name`` (bound to the name: files can't be swapped)."""
    return hmac.new(
        key, b"jupyter-shared-gpu/checkpoint-file/" + name.encode() + b"\0", hashlib.sha256
    )


def manifest_mac(key: bytes, canonical: bytes) -> str:
    """The hex HMAC-SHA256 of the manifest's canonical JSON."""
    return hmac.new(key, b"jupyter-shared-gpu/manifest\0" + canonical, hashlib.sha256).hexdigest()


def make_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 (parents too, also 0700), whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)


class HashingWriter:
    """A write-only file object that HMACs what it writes and can roll back to a mark.

    Created with ``O_EXCL|O_NOFOLLOW`` and mode 0600. Small writes are gathered in a buffer;
    large ones (e.g. a tensor's storage as a memoryview) go straight to the disk, uncopied.
    """

    def __init__(self, directory: Path, name: str, key: bytes, alg: str = "hmac-sha256") -> None:
        self.name, self._alg = name, alg
        self._nonce = secrets.token_bytes(12) if alg == "gmac-aes256" else b""
        self._mac: Any = new_mac(key, name, alg, self._nonce)
        self._fd = os.open(directory / name, _FILE_FLAGS, 0o600)
        os.fchmod(self._fd, 0o600)
        self._buf = bytearray()
        self._flushed = 0  # bytes on disk (and in the MAC)
        self._mark: int | None = None
        self._mark_mac: hmac.HMAC | None = (
            None  # the MAC as it was at the mark, once flushed past it
        )

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n >= _BUFFER:
            self._flush()
            self._disk_write(view)
        else:
            self._buf += data
            if len(self._buf) >= _BUFFER:
                self._flush()
        return n

    def tell(self) -> int:
        return self._flushed + len(self._buf)

    def flush(self) -> None:
        """Nothing to do: buffered bytes reach the disk on :meth:`close` (torch calls this)."""

    def mark(self) -> int:
        """Remember this position, to :meth:`rollback` to it if what follows fails."""
        self._mark = self.tell()
        self._mark_mac = None
        return self._mark

    def rollback(self) -> None:
        """Forget everything written since :meth:`mark` (on disk and in the MAC)."""
        assert self._mark is not None
        if self._mark_mac is None:  # nothing flushed since the mark
            del self._buf[self._mark - self._flushed :]
        else:
            self._buf.clear()
            os.ftruncate(self._fd, self._mark)
            os.lseek(self._fd, self._mark, os.SEEK_SET)
            self._flushed = self._mark
            self._mac = self._mark_mac
        self._mark_mac = None

    def _flush(self) -> None:
        if self._buf:
            self._disk_write(memoryview(self._buf))
            self._buf = bytearray()

    def _disk_write(self, view: memoryview) -> None:
        if self._mark is not None and self._mark_mac is None and self._flushed <= self._mark:
            split = self._mark - self._flushed
            self._mac.update(view[:split])
            self._mark_mac = self._mac.copy()
            self._mac.update(view[split:])
        else:
            self._mac.update(view)
        self._flushed += len(view)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> dict[str, Any]:
        """Flush, fsync and close; return the manifest's entry for this file."""
        self._flush()
        os.fsync(self._fd)
        os.close(self._fd)
        entry = {"bytes": self._flushed, "alg": self._alg, "mac": self._mac.hexdigest()}
        return entry | ({"nonce": self._nonce.hex()} if self._nonce else {})

    def discard(self, directory: Path) -> None:
        """Close and delete the file (after a failure)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        (directory / self.name).unlink(missing_ok=True)


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


def _entry_mac(key: bytes, name: str, entry: dict[str, Any]) -> Any:
    return new_mac(key, name, entry.get("alg", ""), bytes.fromhex(entry.get("nonce", "")))


def read_verified(path: Path, entry: dict[str, Any], key: bytes) -> bytearray | None:
    """Read a whole file in one pass while MAC'ing it; None if its size or MAC is wrong."""
    size = int(entry["bytes"])
    mac = _entry_mac(key, path.name, entry)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            return None
        buf = bytearray(size)
        view = memoryview(buf)
        pos = 0
        while pos < size:
            got = os.readv(fd, [view[pos : pos + _CHUNK]])
            if got == 0:
                return None
            mac.update(view[pos : pos + got])
            pos += got
    finally:
        os.close(fd)
    return buf if hmac.compare_digest(mac.hexdigest(), str(entry["mac"])) else None


def open_verified(path: Path, entry: dict[str, Any], key: bytes) -> int | None:
    """Open and MAC a file through a small reused buffer (it stays in the page cache).

    Returns the open fd (the caller loads through ``/proc/self/fd/N``, so a file renamed in
    afterwards is never read), or None if its size or MAC is wrong.
    """
    size = int(entry["bytes"])
    mac = _entry_mac(key, path.name, entry)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError
        buf = memoryview(bytearray(_CHUNK))
        pos = 0
        while pos < size:
            got = os.readv(fd, [buf])
            if got == 0:
                raise ValueError
            mac.update(buf[:got])
            pos += got
        if not hmac.compare_digest(mac.hexdigest(), str(entry["mac"])):
            raise ValueError
    except (ValueError, OSError):
        os.close(fd)
        return None
    return fd


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


class MemFile:
    """A read-only, seekable file over a buffer, with ``readinto`` (torch.load copies once)."""

    def __init__(self, buf: bytearray | bytes) -> None:
        self._view = memoryview(buf)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(self._pos + n, len(self._view))
        data = self._view[self._pos : end].tobytes()
        self._pos = end
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        out = memoryview(b).cast("B")
        n = min(len(out), len(self._view) - self._pos)
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def readline(self, size: int = -1) -> bytes:
        rest = (
            self._view[self._pos :].tobytes()
            if size < 0
            else self._view[self._pos : self._pos + size].tobytes()
        )
        cut = rest.find(b"\n")
        line = rest if cut < 0 else rest[: cut + 1]
        self._pos += len(line)
        return line

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True
