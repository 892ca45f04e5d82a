"""Checkpoint and restore of a kernel's user namespace (suspend/resume).

A checkpoint is a 0700 directory of 0600 files, published atomically (written in a temp dir beside
it, fsync'd, renamed into place)::

    manifest.json  {"manifest": {...}, "hmac": HMAC-SHA256(key, canonical JSON of "manifest")}
    defs.pkl       functions and classes defined in the notebook (dill payloads in a pickle stream)
    torch.pt       one torch.save of all tensors, modules, optimizers (shared storage stays shared)
    objects.pkl    every other variable, one pickle per variable with a shared memo

The manifest lists each file with its size and HMAC-SHA256 keyed with the kernel's session key,
computed while the file is written. :func:`load_namespace` verifies the manifest and every file
(one read pass, into memory) before it unpickles anything. Torch is imported only if the namespace
holds torch objects (save) or the checkpoint has a torch file (load).
"""

from __future__ import annotations

import hmac
import importlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
import types
from collections.abc import Container
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpu_kernel import checkpoint_io as cio
from gpu_kernel import checkpoint_pickle as cp
from gpu_kernel.errors import SharedGPUError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# torch files: verified through a small buffer, then torch.load(mmap=True) from the page cache
# (no copy); False reads them into memory once and loads from there (one more copy).
TORCH_LOAD_MMAP = True
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


class CheckpointError(SharedGPUError):
    """A checkpoint is missing, tampered with, foreign (another kernel's) or can't be written."""


@dataclass(frozen=True)
class SavedVariable:
    name: str
    type_name: str
    bytes: int
    storage: str  # "defs", "objects", "torch" or "torch:<file>"


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
    total_bytes: int

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
) -> Manifest:
    """Save the user variables of ``ns`` to ``directory`` (replacing a checkpoint there).

    Variables that can't be saved are listed in ``Manifest.dropped`` with a reason; nothing raises
    for them. Raises :class:`CheckpointError` if the checkpoint itself can't be written.
    """
    directory, key = Path(directory), _as_key(key)
    saved: list[SavedVariable] = []
    dropped: list[DroppedVariable] = []
    imports: dict[str, str] = {}
    defs: list[tuple[str, Any]] = []
    objects: list[tuple[str, Any]] = []
    torch_types = cp.torch_classes()
    state = cp.SaveState(ns, torch_types)
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
        elif torch_types and isinstance(value, torch_types):
            state.torch_keys[id(value)] = name
            state.torch_objs[name] = value
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
        files: dict[str, dict[str, Any]] = {}
        streams = {
            "defs": _write_stream(tmp, "defs.pkl", defs, state, key, saved, dropped, files),
            "objects": _write_stream(
                tmp, "objects.pkl", objects, state, key, saved, dropped, files, mode="objects"
            ),
        }
        torch_files: dict[str, list[str]] = {}
        if state.torch_objs:  # after objects: they add the torch objects they hold
            torch_files = _write_torch(tmp, key, state, saved, dropped, files)
        manifest = Manifest(
            version=FORMAT_VERSION,
            created_at=time.time(),
            variables=saved,
            dropped=dropped,
            imports=imports,
            cwd=cwd if cwd is not None else os.getcwd(),
            execution_count=execution_count,
            total_bytes=sum(f["bytes"] for f in files.values()),
        )
        body = _manifest_json(manifest) | {"files": files, "streams": streams, "torch": torch_files}
        canonical = _canonical(body)
        doc = {"manifest": body, "hmac": cio.manifest_mac(key, canonical)}
        cio.write_small(tmp, MANIFEST, json.dumps(doc, sort_keys=True).encode())
        cio.publish(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"could not write the checkpoint at {directory}: {exc}",
                "check free disk space and permissions of the checkpoint directory",
            ) from exc
        raise
    return manifest


def _write_stream(
    tmp: Path,
    fname: str,
    items: list[tuple[str, Any]],
    state: cp.SaveState,
    key: bytes,
    saved: list[SavedVariable],
    dropped: list[DroppedVariable],
    files: dict[str, dict[str, Any]],
    mode: str = "defs",
) -> list[list[Any]]:
    """Pickle ``items`` one by one into one file; a failing variable is rolled back and dropped."""
    if not items:
        return []
    w = cio.HashingWriter(tmp, fname, key)
    p = cp.StreamPickler(w, state, mode)
    entries: list[list[Any]] = []
    with cp.main_as(state.ns):
        for name, value in items:
            p.root = value
            error: BaseException | None = None
            for attempt in (value, cp.dill_blob(value)):
                start, log_len = w.mark(), len(state.log)
                try:
                    p.dump(attempt)
                    error = None
                    break
                except Exception as exc:
                    w.rollback()
                    state.rollback(log_len)
                    p.clear_memo()
                    error = exc
                    if isinstance(exc, cp.Unsaveable):
                        break
            if error is not None:
                reason = cp.reason_from_exception(error)
                dropped.append(DroppedVariable(name, cp.type_name(value), reason))
                continue
            end = w.tell()
            entries.append([name, start, end])
            saved.append(SavedVariable(name, cp.type_name(value), end - start, mode))
    files[fname] = w.close()
    return entries


class _NullSink:
    """A file that discards what torch.save writes (to find which torch object fails)."""

    def write(self, data: Any) -> int:
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def _write_torch(
    tmp: Path,
    key: bytes,
    state: cp.SaveState,
    saved: list[SavedVariable],
    dropped: list[DroppedVariable],
    files: dict[str, dict[str, Any]],
) -> dict[str, list[str]]:
    """One torch.save of every torch object; on failure drop the failing ones (or split files)."""
    torch = sys.modules["torch"]
    pm = cp.torch_pickle_module(state)

    def write(fname: str, objs: dict[str, Any]) -> None:
        w = cio.HashingWriter(tmp, fname, key, alg="gmac-aes256")
        try:
            torch.save(objs, w, pickle_module=pm, pickle_protocol=4)
            files[fname] = w.close()
        except BaseException:
            w.discard(tmp)
            raise

    objs = dict(state.torch_objs)
    layout: dict[str, list[str]] = {}
    try:
        write("torch.pt", objs)
        layout["torch.pt"] = list(objs)
    except Exception:
        good: dict[str, Any] = {}
        for k, obj in objs.items():
            try:
                torch.save({k: obj}, _NullSink(), pickle_module=pm, pickle_protocol=4)
                good[k] = obj
            except Exception as exc:
                if not k.startswith("#"):
                    reason = cp.reason_from_exception(exc)
                    dropped.append(DroppedVariable(k, cp.type_name(obj), reason))
        objs = good
        try:
            write("torch.pt", objs)
            layout["torch.pt"] = list(objs)
        except Exception:
            for i, (k, obj) in enumerate(list(objs.items())):
                try:
                    write(f"torch-{i}.pt", {k: obj})
                    layout[f"torch-{i}.pt"] = [k]
                except Exception as exc:
                    del objs[k]
                    if not k.startswith("#"):
                        reason = cp.reason_from_exception(exc)
                        dropped.append(DroppedVariable(k, cp.type_name(obj), reason))
    for _fname, names in layout.items():
        for k in names:
            if not k.startswith("#"):
                obj = objs[k]
                saved.append(SavedVariable(k, cp.type_name(obj), cp.torch_nbytes(obj), "torch"))
    return layout


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
    }


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
    try:
        doc = json.loads(raw)
        body, mac = doc["manifest"], doc["hmac"]
        ok = isinstance(body, dict) and isinstance(mac, str)
    except (ValueError, KeyError, TypeError):
        ok = False
    if (
        not ok
        or len(raw) > _MAX_MANIFEST
        or not hmac.compare_digest(cio.manifest_mac(key, _canonical(body)), mac)
    ):
        raise _integrity_error(directory)
    if body.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint at {directory} has format version {body.get('version')}; this "
            f"jupyter-shared-gpu reads version {FORMAT_VERSION}",
            "install the same jupyter-shared-gpu version on every GPU host",
        )
    return body


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
    )


def load_namespace(
    directory: Path,
    key: bytes,
    *,
    device: str | None = None,
    namespace: dict[str, Any] | None = None,
) -> tuple[dict, Manifest]:
    """Verify and load the checkpoint at ``directory``; return (variables, manifest).

    Everything is verified before anything is unpickled; a tampered, foreign (other key) or
    unreadable checkpoint raises :class:`CheckpointError` and loads nothing.

    ``namespace``: the dict to restore into, and the globals of restored notebook functions (pass
    the shell's ``user_ns``). Default: a new dict, which is returned.

    ``device``: where tensors that were on an accelerator go. None: the CUDA device they were on
    if it exists here, else the current CUDA device (the new slot), else the CPU. A string such as
    "cuda:0" or "cpu": that device. Tensors saved on the CPU stay on the CPU.

    The returned manifest lists the variables restored, and in ``dropped`` those not saved plus
    those that failed to restore (an import that fails, a missing class...). The working directory
    is restored if it exists here (else a ``(working directory)`` entry in ``dropped`` says so).
    """
    directory, key = Path(directory), _as_key(key)
    body = read_manifest(directory, key)
    blobs: dict[str, bytearray | int] = {}  # pickle streams in memory; torch files as open fds
    try:
        try:
            for fname, info in body["files"].items():
                if not re.fullmatch(r"[\w-]+\.\w+", fname):
                    raise _integrity_error(directory)
                path = directory / fname
                mmap = TORCH_LOAD_MMAP and fname.endswith(".pt")
                blob = (cio.open_verified if mmap else cio.read_verified)(path, info, key)
                if blob is None:
                    raise _integrity_error(directory)
                blobs[fname] = blob
        except (OSError, KeyError, ValueError, TypeError):
            raise _integrity_error(directory) from None
        return _load_verified(body, blobs, device, namespace)
    finally:
        for blob in blobs.values():
            if isinstance(blob, int):
                os.close(blob)


def _load_verified(
    body: dict[str, Any],
    blobs: dict[str, Any],
    device: str | None,
    namespace: dict[str, Any] | None,
) -> tuple[dict, Manifest]:
    saved = _manifest_from(body)
    target: dict[str, Any] = {} if namespace is None else namespace
    ok: list[SavedVariable] = []
    dropped = list(saved.dropped)
    by_name = {v.name: v for v in saved.variables}

    def fail(name: str, exc: BaseException) -> None:
        v = by_name.get(name)
        reason = f"could not be restored ({type(exc).__name__}: {str(exc)[:160]})"
        dropped.append(DroppedVariable(name, v.type_name if v else "?", reason))

    ctx = cp.LoadContext(ns=target)
    token = cp.LOAD_CONTEXT.set(ctx)
    try:
        for name, mod in saved.imports.items():
            try:
                target[name] = importlib.import_module(mod)
            except Exception as exc:
                dropped.append(DroppedVariable(name, "module", f"import {mod} failed: {exc}"))
        _load_stream(blobs.get("defs.pkl"), body["streams"]["defs"], target, by_name, ok, fail)
        if body["torch"]:
            _load_torch(blobs, body["torch"], ctx, device, target, by_name, ok, fail)
        _load_stream(
            blobs.get("objects.pkl"), body["streams"]["objects"], target, by_name, ok, fail
        )
    finally:
        cp.LOAD_CONTEXT.reset(token)
    if saved.cwd:
        if os.path.isdir(saved.cwd):
            os.chdir(saved.cwd)
        else:
            dropped.append(
                DroppedVariable(
                    "(working directory)",
                    "directory",
                    f"{saved.cwd} does not exist here; staying in {os.getcwd()}",
                )
            )
    return target, replace(saved, variables=ok, dropped=dropped)


def _load_stream(
    buf: bytearray | None,
    entries: list[list[Any]],
    target: dict[str, Any],
    by_name: dict[str, SavedVariable],
    ok: list[SavedVariable],
    fail: Any,
) -> None:
    if not entries or buf is None:
        return
    f = io.BytesIO(buf)  # one copy of the stream; the C unpickler reads a BytesIO fastest
    up = pickle.Unpickler(f)
    for name, start, _end in entries:
        f.seek(start)
        try:
            target[name] = up.load()
            ok.append(by_name[name])
        except Exception as exc:
            fail(name, exc)
            memo = up.memo.copy()  # the failed load left input buffered: start a fresh unpickler
            up = pickle.Unpickler(f)
            up.memo = memo


def _load_torch(
    blobs: dict[str, bytearray],
    layout: dict[str, list[str]],
    ctx: cp.LoadContext,
    device: str | None,
    target: dict[str, Any],
    by_name: dict[str, SavedVariable],
    ok: list[SavedVariable],
    fail: Any,
) -> None:
    try:
        import torch
    except ImportError as exc:
        for names in layout.values():
            for k in names:
                if not k.startswith("#"):
                    fail(k, exc)
        return
    loc = cp.map_location(device)
    for fname, names in layout.items():
        try:
            blob = blobs[fname]
            mmap = isinstance(blob, int)
            objs = torch.load(
                f"/proc/self/fd/{blob}" if mmap else cio.MemFile(blob),
                map_location=loc,
                pickle_module=cp.torch_load_module(),
                weights_only=False,
                mmap=mmap,
            )
        except Exception as exc:
            for k in names:
                if not k.startswith("#"):
                    fail(k, exc)
            continue
        ctx.torch.update(objs)
        for k in names:
            if not k.startswith("#"):
                target[k] = objs[k]
                ok.append(by_name[k])
