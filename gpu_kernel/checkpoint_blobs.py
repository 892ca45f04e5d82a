"""Content-addressed blobs of checkpoints: one store per user and host, shared by their kernels.

A blob is a file named by its digest (:func:`digest`, a SHA-256 tree over 16 MiB chunks, so one
large tensor hashes on every core). ``<store>/<d[:2]>/<d>`` files are 0600 in 0700 dirs, written
to a temp name, fsync'd and renamed, so a blob that exists is whole. A checkpoint's manifest
(HMAC'd with its kernel's key) lists the digests it needs; :meth:`BlobStore.read_into` reads a
blob once, into the buffer the loader keeps, hashing it on the way, and refuses it if the digest
differs: what is loaded is what was checked. Nothing here unpickles anything.

Writers (a save, an import) hold a shared ``flock`` on ``<store>/.lock`` until their manifest
is published; :meth:`BlobStore.sweep` takes it exclusively (or skips) and deletes blobs no
published manifest names once they are older than ``ttl`` (or, oldest first, while the
unreferenced ones exceed ``max_unreferenced`` bytes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpu_kernel.errors import SharedGPUError

CHUNK = 16 << 20  # leaves of the digest tree; also the unit of parallel reads
STEP = 1 << 20  # a GMAC'd blob is read and checked this much at a time (still in the cache)
_TAG = b"jupyter-shared-gpu/blob-v1\0"
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
BLOB_TTL = float(os.environ.get("SHARED_GPU_BLOB_TTL", 12 * 3600))  # s an unreferenced blob stays
MAX_UNREFERENCED = int(os.environ.get("SHARED_GPU_BLOB_MAX_UNREFERENCED", 8 << 30))
SWEEP_EVERY = 600.0  # s between two sweeps of one store
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_pool: ThreadPoolExecutor | None = None
MISSING = "is missing"
STORE_DIR = ".blobs"  # not a valid kernel id: never mistaken for a kernel's runtime dir
_STORE_RE = re.compile(r"(\.\./){1,2}\.blobs(/[A-Za-z_][A-Za-z0-9_.-]{0,31})?")
MANIFEST = "manifest.json"


class CheckpointError(SharedGPUError):
    """A checkpoint is missing, tampered with, foreign (another kernel's) or can't be written."""


class BlobError(Exception):
    """A blob is missing, the wrong size, or its bytes do not match its digest."""

    def __init__(self, digest: str, problem: str) -> None:
        super().__init__(f"blob {digest[:16]}… {problem}")
        self.digest, self.problem = digest, problem


def pool() -> ThreadPoolExecutor:
    """Threads that hash, read and write (hashlib and file I/O release the GIL)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(min(8, os.cpu_count() or 2), thread_name_prefix="ckpt-io")
    return _pool


_SHA256 = hashlib.sha256()  # copied: cheaper than a new one (OpenSSL 3 looks the digest up)
_TAGGED = hashlib.sha256(_TAG)


def _leaf(view: memoryview | bytes) -> bytes:
    h = _SHA256.copy()
    h.update(view)
    return h.digest()


def _root(nbytes: int, leaves: Iterable[bytes]) -> str:
    h = _TAGGED.copy()
    h.update(nbytes.to_bytes(8, "little"))
    for leaf in leaves:
        h.update(leaf)
    return h.hexdigest()


def digest(data: bytes | bytearray | memoryview) -> str:
    """The hex digest naming ``data`` (SHA-256 of its size and its chunks' SHA-256s)."""
    n = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
    if n <= CHUNK:
        return _root(n, [_leaf(data)])
    view = memoryview(data).cast("B")
    return _root(n, pool().map(_leaf, [view[i : i + CHUNK] for i in range(0, n, CHUNK)]))


class Gmac:
    """GMAC: AES-256-GCM over no plaintext, the data as associated data (NIST SP 800-38D).

    ~4x faster than SHA-256 here: a kernel checks its big blobs with it at load. The AES key is
    :func:`blob_key` (the kernel's session key, the blob's digest, a fresh nonce), so a key and
    nonce pair never authenticates two different things."""

    def __init__(self, aes_key: bytes, nonce: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._enc = Cipher(algorithms.AES(aes_key), modes.GCM(nonce)).encryptor()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._enc.authenticate_additional_data(data)

    def hexdigest(self) -> str:
        self._enc.finalize()
        return self._enc.tag.hex()


def blob_key(key: bytes, d: str, nonce: bytes) -> bytes:
    """The AES key of the GMAC of blob ``d`` under a kernel's session ``key``."""
    label = b"jupyter-shared-gpu/blob-gmac\0" + d.encode() + b"\0" + nonce
    return hmac.new(key, label, hashlib.sha256).digest()


def gmac_tag(key: bytes, d: str, data: memoryview) -> list[str]:
    """``[nonce, tag]`` (hex) of ``data`` (blob ``d``) under the session ``key``."""
    nonce = secrets.token_bytes(12)
    mac = Gmac(blob_key(key, d, nonce), nonce)
    for i in range(0, max(len(data), 1), STEP):
        mac.update(data[i : i + STEP])
    return [nonce.hex(), mac.hexdigest()]


def check_digest(name: object) -> str:
    if not isinstance(name, str) or not DIGEST_RE.fullmatch(name):
        raise ValueError(f"not a blob digest: {name!r}")
    return name


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


class BlobStore:
    """The blobs under ``root``; ``manifests`` are the globs (relative to ``refs_base``) of the
    checkpoint manifests that may reference them (read by :meth:`sweep` only)."""

    def __init__(self, root: Path, refs_base: Path, manifests: tuple[str, ...]) -> None:
        self.root, self.refs_base, self.manifests = Path(root), Path(refs_base), manifests
        self._lock_fd: int | None = None
        self._dirty: set[Path] = set()

    def path(self, d: str) -> Path:
        return self.root / d[:2] / d

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[BlobStore]:
        """Hold the store's shared lock (no sweep meanwhile); create it (0700) if needed."""
        self.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._lock_fd = fd
        try:
            yield self
        finally:
            self._lock_fd = None
            os.close(fd)

    def has(self, d: str, nbytes: int) -> bool:
        """True if the blob is here with the right size (and marks it used now)."""
        path = self.path(d)
        try:
            if os.stat(path, follow_symlinks=False).st_size != nbytes:
                return False
            os.utime(path, follow_symlinks=False)
        except OSError:
            return False
        return True

    def put(self, d: str, chunks: Iterable[memoryview | bytes]) -> int:
        """Write a blob (unless present) from ``chunks``; returns the bytes written (0: present)."""
        assert self._lock_fd is not None, "write blobs inside `with store.writing()`"
        views = [memoryview(c).cast("B") for c in chunks]
        size = sum(len(v) for v in views)
        if self.has(d, size):
            return 0

        def fill(fd: int) -> None:
            for view in views:
                _write_all(fd, view)

        self._commit(d, fill)
        return size

    def put_verified(self, d: str, nbytes: int, read: Callable[[int], bytes]) -> int:
        """Write a blob of ``nbytes`` from the stream ``read``, refusing it unless its bytes
        hash to ``d`` (an import); returns the bytes written (0: it was here)."""
        assert self._lock_fd is not None, "write blobs inside `with store.writing()`"

        def fill(fd: int) -> None:
            leaves, left = [], nbytes
            while left or not leaves:
                chunk = _read_exactly(read, min(CHUNK, left))
                leaves.append(_leaf(memoryview(chunk)))
                _write_all(fd, memoryview(chunk))
                left -= len(chunk)
            if _root(nbytes, leaves) != d:
                raise BlobError(d, "arrived with bytes that do not match its digest")

        self._commit(d, fill)
        return nbytes

    def _commit(self, d: str, fill: Callable[[int], None]) -> None:
        """Write blob ``d`` whole or not at all: ``fill(fd)`` writes a private temporary file
        (0600), which is fsync'd and renamed into place; on any error it is removed."""
        folder = self.root / d[:2]
        folder.mkdir(mode=0o700, exist_ok=True)
        tmp = folder / f".{d}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, _FLAGS, 0o600)
        try:
            fill(fd)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.path(d))
        self._dirty.add(folder)

    def sync(self) -> None:
        """fsync the folders blobs were renamed into (before a manifest names them)."""
        for folder in self._dirty:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._dirty.clear()

    # -- reading -----------------------------------------------------------------------------

    def read_into(
        self, d: str, out: memoryview, tag: tuple[bytes, list[str]] | None = None
    ) -> None:
        """Fill ``out`` with the blob's bytes, checking them as they land: against its digest
        (chunks hashed in parallel), or, given ``tag`` = (session key, [nonce, tag]), against
        that GMAC. Raises BlobError if it is missing, the wrong size or not those bytes."""
        out = out.cast("B")
        if tag is not None:
            return self._read_gmac(d, out, *tag)
        try:
            fd = os.open(self.path(d), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobError(d, MISSING) from None
        try:
            if os.fstat(fd).st_size != len(out):
                raise self._damaged(d, "has the wrong size")

            def leaf(start: int) -> bytes:
                view = out[start : start + CHUNK]
                pos = 0
                while pos < len(view):
                    got = os.preadv(fd, [view[pos:]], start + pos)
                    if got <= 0:
                        raise BlobError(d, "was cut short while reading")
                    pos += got
                return _leaf(view)

            starts = range(0, max(len(out), 1), CHUNK)
            leaves = [leaf(0)] if len(starts) == 1 else list(pool().map(leaf, starts))
        finally:
            os.close(fd)
        if _root(len(out), leaves) != d:
            raise self._damaged(d, "does not match its digest")

    def _read_gmac(self, d: str, out: memoryview, key: bytes, nonce_tag: list[str]) -> None:
        nonce = bytes.fromhex(nonce_tag[0])
        mac = Gmac(blob_key(key, d, nonce), nonce)
        try:
            fd = os.open(self.path(d), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobError(d, MISSING) from None
        try:
            if os.fstat(fd).st_size != len(out):
                raise self._damaged(d, "has the wrong size")
            pos = 0
            while pos < len(out):
                piece = out[pos : pos + STEP]
                got = 0
                while got < len(piece):
                    n = os.preadv(fd, [piece[got:]], pos + got)
                    if n <= 0:
                        raise BlobError(d, "was cut short while reading")
                    got += n
                mac.update(piece)
                pos += len(piece)
        finally:
            os.close(fd)
        if not hmac.compare_digest(mac.hexdigest(), str(nonce_tag[1])):
            raise self._damaged(d, "does not match its digest")

    def _damaged(self, d: str, problem: str) -> BlobError:
        """Set a damaged blob aside (``.<d>.damaged``, swept later), so that the next save or
        copy that needs these bytes writes them again instead of trusting the file."""
        path = self.path(d)
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(f".{d}.damaged"))
        return BlobError(d, f"{problem} (set aside; the next save or copy writes it again)")

    # -- sweeping ----------------------------------------------------------------------------

    def referenced(self) -> set[str]:
        """Digests named by the manifests that may use this store (unverified: only to keep)."""
        found: set[str] = set()
        for pattern in self.manifests:
            for path in self.refs_base.glob(pattern):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    body = json.loads(path.read_bytes())["manifest"]
                    found.update(b[0] for b in body["blobs"] if isinstance(b[0], str))
        return found

    def sweep(
        self, now: float | None = None, ttl: float = BLOB_TTL, cap: int = MAX_UNREFERENCED
    ) -> list[str]:
        """Delete unreferenced blobs older than ``ttl``, then the oldest unreferenced ones while
        they exceed ``cap`` bytes; skipped (``[]``) while someone writes. Returns what went."""
        now = time.time() if now is None else now
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return []
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return []
            keep = self.referenced()
            loose: list[tuple[float, int, Path]] = []
            for folder in self.root.iterdir():
                if len(folder.name) != 2 or not folder.is_dir() or folder.is_symlink():
                    continue
                for entry in os.scandir(folder):
                    st = entry.stat(follow_symlinks=False)
                    stale_tmp = (
                        entry.name.endswith((".tmp", ".damaged")) and now - st.st_mtime > 3600
                    )
                    if stale_tmp or (DIGEST_RE.fullmatch(entry.name) and entry.name not in keep):
                        loose.append((st.st_mtime, st.st_size, Path(entry.path)))
            loose.sort()
            total = sum(size for _, size, _ in loose)
            gone = []
            for mtime, size, path in loose:
                if now - mtime <= ttl and total <= cap:
                    continue
                path.unlink(missing_ok=True)
                total -= size
                gone.append(path.name)
            return gone
        finally:
            os.close(fd)

    def sweep_now_and_then(self) -> list[str]:
        """:meth:`sweep` at most every ``SWEEP_EVERY`` seconds (a stamp file's mtime)."""
        stamp = self.root / ".swept"
        try:
            if time.time() - stamp.stat().st_mtime < SWEEP_EVERY:
                return []
        except OSError:
            pass
        with contextlib.suppress(OSError):
            stamp.touch(mode=0o600)
        return self.sweep()


def _read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    parts, left = [], n
    while left:
        got = read(left)
        if not got:
            raise EOFError("the stream ended inside a blob")
        parts.append(got)
        left -= len(got)
    return b"".join(parts)


def runtime_store(runtime_dir: Path, owner: str) -> Path:
    """The blob store of a kernel's runtime dir: ``<root>/<host>/.blobs/<owner>``."""
    return Path(runtime_dir).parent / STORE_DIR / owner


def blob_store(directory: Path, store: Path | str) -> BlobStore:
    """The store ``store`` (absolute, or relative to the checkpoint ``directory``, as manifests
    name it) with the manifests that may reference it (for sweeping)."""
    directory = Path(directory).absolute()
    root = Path(os.path.normpath(directory / store))
    base = root.parent if root.name == STORE_DIR else root.parent.parent
    rel = Path(os.path.relpath(directory, base)).parts
    pattern = "/".join(("*", *rel[1:], MANIFEST))
    return BlobStore(root, base, (pattern,))


def store_of(directory: Path, body: dict[str, Any]) -> BlobStore:
    """The blob store a manifest names (refused unless it is ``../.blobs``-shaped)."""
    rel = body.get("store")
    if not isinstance(rel, str) or not _STORE_RE.fullmatch(rel):
        raise CheckpointError(
            f"checkpoint at {directory} names its blob store as {rel!r}",
            "this checkpoint was not written by jupyter-shared-gpu; start a fresh kernel",
        )
    return blob_store(directory, rel)
