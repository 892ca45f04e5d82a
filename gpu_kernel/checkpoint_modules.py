"""Local ``.py`` modules a checkpoint depends on: named in its manifest, copied when small.

A class from ``mymod.py`` beside the notebook is pickled by name, so the restoring kernel must
be able to import ``mymod``. :func:`local_modules` (at save) lists the modules the pickles named
whose files are not part of an installation (not under the interpreter's prefixes or a
site-packages directory) with their source when small. :func:`restore_modules` (at load,
after the working directory and ``sys.path`` are back, before anything is unpickled) leaves a
module whose file is here alone, writes the saved copy of one that is not into a private
directory added to the end of ``sys.path``, and names the ones it could do neither for.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

MAX_FILE = 1 << 20  # a module's source is copied with the checkpoint up to this size...
MAX_TOTAL = 8 << 20  # ...and all of them up to this much


@functools.cache
def _installed() -> tuple[str, ...]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(p for p in sysconfig.get_paths().values() if p)
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    roots.add(str(Path(__file__).resolve().parent))  # gpu_kernel itself
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


def _module_file(name: str) -> tuple[str, str] | None:
    """(real path, path relative to its sys.path entry) of a local module's source, or None."""
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py") or not os.path.isfile(path):
        return None
    real = os.path.realpath(path)
    if real.startswith(_installed()):
        return None
    parts = name.split(".")
    rel = "/".join(parts) + ("/__init__.py" if path.endswith("__init__.py") else ".py")
    return real, rel


def local_modules(names: Iterable[str], add_source: Callable[[bytes], str]) -> list[list[Any]]:
    """``[name, path, rel, item or None, size]`` for each local module among ``names`` (and the
    packages above them); ``add_source`` stores a small module's source, returning its item."""
    wanted: set[str] = set()
    for name in names:
        parts = name.split(".")
        wanted.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    records, total = [], 0
    for name in sorted(wanted):
        found = _module_file(name)
        if found is None:
            continue
        path, rel = found
        size = os.path.getsize(path)
        item = None
        if size <= MAX_FILE and total + size <= MAX_TOTAL and path.endswith(rel):
            item = add_source(Path(path).read_bytes())
            total += size
        records.append([name, path, rel, item, size])
    return records


def _safe_rel(rel: object) -> PurePosixPath | None:
    if not isinstance(rel, str) or not rel.endswith(".py"):
        return None
    path = PurePosixPath(rel)
    if path.is_absolute() or any(p in ("", ".", "..") for p in path.parts):
        return None
    return path


def restore_modules(
    records: list[list[Any]], read_item: Callable[[str], bytes], directory: Path
) -> tuple[list[str], list[tuple[str, str]]]:
    """Make the recorded modules importable; returns (notes, [(name, reason) not restorable])."""
    notes: list[str] = []
    missing: list[tuple[str, str]] = []
    added = False
    for name, path, rel, item, _size in records:
        if os.path.isfile(path) or name in sys.modules:
            continue
        safe = _safe_rel(rel)
        if item is None or safe is None:
            missing.append(
                (name, f"{path} is not on this host (too big to copy with the checkpoint)")
            )
            continue
        target = directory.joinpath(*safe.parts)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(read_item(item))
        if not added:
            if str(directory) not in sys.path:
                sys.path.append(str(directory))
            added = True
        notes.append(
            f"module {name}: {path} is not on this host; using the copy saved with "
            f"the checkpoint ({target})"
        )
    return notes, missing


def restore_paths(cwd: str | None, saved_path: list[str]) -> list[tuple[str, str]]:
    """Go back to the saved working directory and put back the ``sys.path`` entries that exist
    here (those saved before the first entry still present go in front); returns problems."""
    problems = []
    if cwd:
        if os.path.isdir(cwd):
            os.chdir(cwd)
        else:
            problems.append(
                ("(working directory)", f"{cwd} does not exist here; staying in {os.getcwd()}")
            )
    front: list[str] = []
    seen_common = False
    for entry in saved_path:
        if not isinstance(entry, str):
            continue
        if entry in sys.path:
            seen_common = True
            continue
        if entry and not os.path.isdir(entry):
            continue
        if seen_common:
            sys.path.append(entry)
        else:
            front.append(entry)
    sys.path[:0] = front
    return problems
