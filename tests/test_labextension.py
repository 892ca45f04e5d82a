"""The prebuilt JupyterLab extension: built from the committed source, small, and shipped in the
wheel with the server extension's auto-enable file (a user's `pip install` needs no Node)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILT = ROOT / "provisioner" / "labextension"
SOURCES = ("labextension/src", "labextension/style", "labextension/package.json",
           "labextension/tsconfig.json")  # fmt: skip
REBUILD = "scripts/build-labextension"


def source_digest() -> str:
    """What scripts/build-labextension records: sha256sum of `sha256sum` over the sorted files."""
    files: list[str] = []
    for name in SOURCES:
        path = ROOT / name
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files += [str(p.relative_to(ROOT)) for p in found]
    listing = "".join(
        f"{hashlib.sha256((ROOT / f).read_bytes()).hexdigest()}  {f}\n" for f in sorted(files)
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def test_built_extension_is_built_from_the_current_source() -> None:
    recorded = (BUILT / "source.sha256").read_text().strip()
    assert recorded == source_digest(), (
        "provisioner/labextension/ is older than labextension/src: rebuild it with "
        f"`{REBUILD}` (Node and npm needed) and commit the result"
    )
    package = json.loads((BUILT / "package.json").read_text())
    remote = package["jupyterlab"]["_build"]["load"]
    assert (BUILT / remote).is_file(), f"the build names {remote}, which is missing: run {REBUILD}"


def test_built_extension_is_small() -> None:
    total = sum(p.stat().st_size for p in (BUILT / "static").rglob("*") if p.is_file())
    assert total < 64 * 1024, f"the lab extension's bundle grew to {total} bytes"


def test_wheel_ships_the_lab_extension_and_enables_the_server_extension(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        data = "jupyter_shared_gpu-0.1.0.data/data/"
        config = json.loads(
            zf.read(f"{data}etc/jupyter/jupyter_server_config.d/jupyter_shared_gpu.json")
        )
    assert config == {"ServerApp": {"jpserver_extensions": {"provisioner.server_extension": True}}}
    lab = f"{data}share/jupyter/labextensions/jupyter-shared-gpu/"
    built = {lab + str(p.relative_to(BUILT)) for p in BUILT.rglob("*") if p.is_file()}
    assert built <= names and any(n.startswith(lab + "static/remoteEntry.") for n in names)
    assert "provisioner/server_extension.py" in names
    assert not any(n.startswith("provisioner/labextension/") for n in names)  # shipped once
