"""Checkpoint and restore of a kernel's user namespace (suspend/resume).

A checkpoint is a 0700 directory holding one 0600 file, published atomically (written in a temp
dir beside it, fsync'd, renamed into place)::

    manifest.json  {"manifest": {...}, "hmac": HMAC-SHA256(key, canonical JSON of "manifest")}

The data lives in a content-addressed blob store (:mod:`gpu_kernel.checkpoint_blobs`) that the
manifest names relative to itself: ``../.blobs`` by default, ``../../.blobs/<owner>`` for a
kernel's runtime dir (``<root>/<host>/<kernel_id>/checkpoint``), so one user's kernels on one
host share blobs and a save writes only the blobs that are not there yet: a tensor or variable
that did not change since the last save is not written again. The manifest (keyed with the
kernel's session key) lists the digest of every blob; :func:`load_namespace` checks it, then
reads each blob once, checking its digest, before it unpickles anything. Torch is imported only
if the namespace holds tensors (save) or the checkpoint has some (load).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import hmac
import json
import os
import re
import shutil
import sys
import time
import types
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_kernel import checkpoint_blobs as blobs
from gpu_kernel import checkpoint_io as cio
from gpu_kernel import checkpoint_modules as cmod
from gpu_kernel import checkpoint_pickle as cp
from gpu_kernel.checkpoint_blobs import (
    MANIFEST,
    STORE_DIR,
    CheckpointError,
    blob_store,
    runtime_store,
    store_of,
)
from gpu_kernel.checkpoint_load import BlobsUnreadable, Loader
from gpu_kernel.checkpoint_save import ItemSink, NamespacePickler

FORMAT_VERSION = 2  # 2: content-addressed blobs, one pickle per variable or group
_MAX_MANIFEST = 256 << 20

# IPython's own names in user_ns (the kernel also passes shell.user_ns_hidden as ``hidden``).
IPYTHON_NAMES = frozenset(
    [
        "In",
        "Out",
        "_",
        "__",
        "___",
        "_i",
        "_ii",
        "_iii",
        "_oh",
        "_dh",
        "_ih",
        "exit",
        "quit",
        "get_ipython",
        "_exit_code",
    ]
)
_SKIP_RE = re.compile(r"_i\d+|_\d+|__\w+__")


@dataclass(frozen=True)
class SavedVariable:
    name: str
    type_name: str
    bytes: int
    storage: str  # "defs" or "objects"


@dataclass(frozen=True)
class DroppedVariable:
    name: str
    type_name: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    version: int
    created_at: float
    variables: list[SavedVariable]
    dropped: list[DroppedVariable]
    imports: dict[str, str]
    cwd: str | None
    execution_count: int
    total_bytes: int  # of every blob the checkpoint needs
    written_bytes: int = 0  # of the blobs this save wrote (the rest were in the store already)
    notes: list[str] = field(default_factory=list)  # from a load: e.g. a module copied here

    def summary(self) -> str:
        """One line: counts and size, e.g. "14 variables and 3 imports, 1.0 GiB; 2 not saved"."""
        text = f"{len(self.variables)} variables"
        if self.imports:
            text += f" and {len(self.imports)} imports"
        text += f", {format_bytes(self.total_bytes)}"
        if self.dropped:
            text += f"; {len(self.dropped)} not saved"
        return text

    def dropped_lines(self) -> list[str]:
        """One line per dropped variable: "`f`: open file (io.TextIOWrapper) cannot be saved"."""
        return [f"`{d.name}`: {d.reason}" for d in self.dropped]


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def is_saved_name(name: str, hidden: Container[str] = ()) -> bool:
    """False for IPython's own names, history (``_i3``, ``_3``), dunders and ``hidden``."""
    return not (name in hidden or name in IPYTHON_NAMES or _SKIP_RE.fullmatch(name))


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC: a save or load makes many short-lived containers (freed by their
    refcounts), and every collection would walk the whole heap of a big notebook again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# The GMAC tags of each kernel's last save or load (by session key), reused for unchanged blobs.
_TAGS: dict[bytes, dict[str, list[str]]] = {}


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"jupyter-shared-gpu/key-id\0" + key).digest()


def _as_key(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


# -------------------------------------------------------------------------------------- saving


def save_namespace(
    ns: dict[str, Any],
    directory: Path,
    key: bytes,
    *,
    hidden: Container[str] = (),
    execution_count: int = 0,
    cwd: str | None = None,
    store: Path | None = None,
) -> Manifest:
    """Save the user variables of ``ns`` to ``directory`` (replacing a checkpoint there), their
    data to the blob store ``store`` (default ``<directory>/../.blobs``).

    Blobs already in the store are not written again (``Manifest.written_bytes`` says what
    was). Variables that can't be saved are listed in ``Manifest.dropped`` with a reason;
    nothing raises for them. Raises :class:`CheckpointError` if the checkpoint can't be written.
    """
    directory, key = Path(directory).absolute(), _as_key(key)
    root = Path(store).absolute() if store is not None else directory.parent / STORE_DIR
    bstore = blob_store(directory, root)
    imports: dict[str, str] = {}
    dropped: list[DroppedVariable] = []
    defs: list[tuple[str, Any]] = []
    objects: list[tuple[str, Any]] = []
    for name, value in list(ns.items()):
        if not is_saved_name(name, hidden):
            continue
        if isinstance(value, types.ModuleType):
            mod = getattr(value, "__name__", None)
            if mod and sys.modules.get(mod) is value:
                imports[name] = mod
            else:
                dropped.append(
                    DroppedVariable(name, "module", "module that can't be imported by name")
                )
        elif (label := cp.unsaveable_label(value)) is not None:
            dropped.append(DroppedVariable(name, cp.type_name(value), f"{label} cannot be saved"))
        elif isinstance(value, types.FunctionType | type) and cp._needs_dill(value):
            defs.append((name, value))
        else:
            objects.append((name, value))
    try:
        tmp = cio.temp_dir_for(directory)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create a checkpoint in {directory.parent}: {exc}",
            "check that the directory exists, is writable and its disk is not full",
        ) from exc
    try:
        with _no_gc(), bstore.writing():
            sink = ItemSink(bstore, key, _TAGS.get(_key_id(key)))
            pickled = NamespacePickler(ns, sink).run(defs + objects)
            dropped += [DroppedVariable(*d) for d in pickled.dropped]
            modules = cmod.local_modules(
                pickled.modules | set(imports.values()), lambda src: sink.add(src, kind="m")
            )
            used = [i for _n, _e, item, bufs in pickled.groups for i in (item, *bufs)]
            used += [d for d, _loc, _n in pickled.storages.values()]
            used += [m[3] for m in modules if m[3]]
            sink.finish(used)
            blob_list, loc = sink.locations(used)
            manifest = Manifest(
                version=FORMAT_VERSION,
                created_at=time.time(),
                variables=[SavedVariable(*v) for v in pickled.saved],
                dropped=dropped,
                imports=imports,
                cwd=cwd if cwd is not None else os.getcwd(),
                execution_count=execution_count,
                total_bytes=sum(n for _, n in blob_list),
                written_bytes=sink.written,
            )
            body = _manifest_json(manifest) | {
                "store": os.path.relpath(root, directory),
                "sys_path": [p for p in sys.path if isinstance(p, str)],
                "blobs": blob_list,
                "tags": {d: sink.tags[d] for d, _n in blob_list if d in sink.tags},
                "groups": [[n, e, loc[i], [loc[b] for b in bs]] for n, e, i, bs in pickled.groups],
                "storages": {k: [loc[d], where] for k, (d, where, _n) in pickled.storages.items()},
                "modules": [[*m[:3], loc[m[3]] if m[3] else None, m[4]] for m in modules],
            }
            canonical = _canonical(body)
            doc = _HEAD + cio.manifest_mac(key, canonical).encode() + _MID + canonical + b"}"
            cio.write_small(tmp, MANIFEST, doc)
            cio.publish(tmp, directory)
            _TAGS[_key_id(key)] = body["tags"]
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"could not write the checkpoint at {directory}: {exc}",
                "check free disk space and permissions of the checkpoint directory",
            ) from exc
        raise
    bstore.sweep_now_and_then()
    return manifest


def _manifest_json(m: Manifest) -> dict[str, Any]:
    return {
        "version": m.version,
        "created_at": m.created_at,
        "variables": [[v.name, v.type_name, v.bytes, v.storage] for v in m.variables],
        "dropped": [[d.name, d.type_name, d.reason] for d in m.dropped],
        "imports": m.imports,
        "cwd": m.cwd,
        "execution_count": m.execution_count,
        "total_bytes": m.total_bytes,
        "written_bytes": m.written_bytes,
    }


_HEAD, _MID = b'{"hmac": "', b'", "manifest": '  # manifest.json as written: MAC, then body


def _split_manifest(raw: bytes) -> tuple[bytes, bytes | None]:
    """(MAC, canonical body) of a manifest file as :func:`save_namespace` writes it, else
    (b"", None)."""
    start = len(_HEAD) + 64 + len(_MID)
    if raw.startswith(_HEAD) and raw[len(_HEAD) + 64 : start] == _MID and raw.endswith(b"}"):
        return raw[len(_HEAD) : len(_HEAD) + 64], raw[start:-1]
    return b"", None


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ------------------------------------------------------------------------------------- loading


def _integrity_error(directory: Path) -> CheckpointError:
    return CheckpointError(
        f"checkpoint at {directory} failed its integrity check: it was changed after it was "
        "written or belongs to another kernel",
        "nothing was loaded; start a fresh kernel (the checkpoint can't be trusted), and check who "
        "else can write to the checkpoint directory",
    )


def read_manifest(directory: Path, key: bytes) -> dict[str, Any]:
    """The verified manifest body of the checkpoint at ``directory`` (raises CheckpointError)."""
    directory, key = Path(directory), _as_key(key)
    path = directory / MANIFEST
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint at {directory}",
            "the kernel was not suspended, or its checkpoint was deleted (e.g. it was too old)",
        ) from None
    except OSError as exc:
        raise CheckpointError(
            f"cannot read the checkpoint at {directory}: {exc}",
            "check the directory's owner and permissions",
        ) from exc
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_MAX_MANIFEST + 1)
    if len(raw) > _MAX_MANIFEST:
        raise _integrity_error(directory)
    mac, canonical = _split_manifest(raw)
    good = canonical is not None and hmac.compare_digest(
        cio.manifest_mac(key, canonical).encode(), mac
    )
    if good:
        body = json.loads(canonical or b"")  # as written: the bytes checked, then parsed
    else:  # re-encoded by someone (or not ours): check its canonical form
        try:
            doc = json.loads(raw)
            body, text = doc["manifest"], doc["hmac"]
            ok = isinstance(body, dict) and isinstance(text, str)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok or not hmac.compare_digest(cio.manifest_mac(key, _canonical(body)), text):
            raise _integrity_error(directory)
    if not isinstance(body, dict):
        raise _integrity_error(directory)
    if body.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint at {directory} has format version {body.get('version')}; this "
            f"jupyter-shared-gpu reads version {FORMAT_VERSION}",
            "install the same jupyter-shared-gpu version on every GPU host",
        )
    return body


def load_namespace(
    directory: Path,
    key: bytes,
    *,
    device: str | None = None,
    namespace: dict[str, Any] | None = None,
    modules_dir: Path | None = None,
) -> tuple[dict, Manifest]:
    """Verify and load the checkpoint at ``directory``; return (variables, manifest).

    Everything is verified before anything is unpickled: a tampered, foreign (other key) or
    unreadable checkpoint, or one whose blob is missing or damaged, raises
    :class:`CheckpointError`, loads nothing and leaves the checkpoint as it was.

    ``namespace``: the dict to restore into, and the globals of restored notebook functions (pass
    the shell's ``user_ns``). Default: a new dict, which is returned.

    ``device``: where tensors that were on an accelerator go. None: the CUDA device they were on
    if it exists here, else the current CUDA device (the new slot), else the CPU. A string such as
    "cuda:0" or "cpu": that device. Tensors saved on the CPU stay on the CPU.

    The working directory and ``sys.path`` come back first, then local modules (a saved copy is
    written to ``modules_dir``, default a new temp dir, when the file is not on this host), then
    imports, then the variables. The returned manifest lists the variables restored, in
    ``dropped`` those not saved plus those that failed to restore, each alone with its reason,
    and in ``notes`` what else the user should know.
    """
    with _no_gc():
        return _load(Path(directory).absolute(), _as_key(key), device, namespace, modules_dir)


def _load(
    directory: Path,
    key: bytes,
    device: str | None,
    namespace: dict[str, Any] | None,
    modules_dir: Path | None,
) -> tuple[dict, Manifest]:
    body = read_manifest(directory, key)
    try:
        loader = Loader(body, store_of(directory, body), device, key)
        loader.read_all()
        _TAGS[_key_id(key)] = body["tags"]
    except BlobsUnreadable as exc:
        err = exc.error
        what = (
            "is incomplete"
            if err.problem == blobs.MISSING
            else "failed its integrity check (changed or damaged on disk)"
        )
        raise CheckpointError(
            f"checkpoint at {directory} {what}: its blob {err.digest[:16]}… in "
            f"{exc.store.root} {err.problem}",
            "nothing was loaded and the checkpoint is kept as it is; if the kernel moved between "
            "hosts, the copy may have been cut short: run the cell again, else restart the kernel",
        ) from None
    except (KeyError, ValueError, TypeError):
        raise _integrity_error(directory) from None
    target: dict[str, Any] = {} if namespace is None else namespace
    restored, failed, notes = loader.build(target, modules_dir)
    saved = _manifest_from(body)
    by_name = {v.name: v for v in saved.variables}
    dropped = list(saved.dropped)
    for name, reason in failed:
        v = by_name.get(name)
        kind = "directory" if name == "(working directory)" else (v.type_name if v else "module")
        dropped.append(DroppedVariable(name, kind, reason))
    ok = [by_name[n] for n in restored if n in by_name]
    return target, Manifest(
        saved.version,
        saved.created_at,
        ok,
        dropped,
        {n: m for n, m in saved.imports.items() if n in target},
        saved.cwd,
        saved.execution_count,
        saved.total_bytes,
        saved.written_bytes,
        notes,
    )


def _manifest_from(body: dict[str, Any]) -> Manifest:
    return Manifest(
        version=body["version"],
        created_at=body["created_at"],
        variables=[SavedVariable(*v) for v in body["variables"]],
        dropped=[DroppedVariable(*d) for d in body["dropped"]],
        imports=dict(body["imports"]),
        cwd=body["cwd"],
        execution_count=body["execution_count"],
        total_bytes=body["total_bytes"],
        written_bytes=body.get("written_bytes", 0),
    )


__all__ = [
    "STORE_DIR",
    "CheckpointError",
    "DroppedVariable",
    "Manifest",
    "SavedVariable",
    "blob_store",
    "format_bytes",
    "is_saved_name",
    "load_namespace",
    "read_manifest",
    "runtime_store",
    "save_namespace",
    "store_of",
]
