"""NVML through the fake module, ``python -m gpu_kernel probe``, and ``gpus = "auto"`` discovery
over a real sshd host."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config.loader import HostConfig
from broker.hosts.discovery import DiscoveryError, discover_slots, slots_from_probe
from gpu_kernel import nvml
from tests import fake_nvml
from tests.sshd import ClientKeys, TestHost

GiB = fake_nvml.GiB
GPU0 = "GPU-00000000-1111-2222-3333-444444444444"
GPU1 = "GPU-11111111-1111-2222-3333-444444444444"
MIG_A = "MIG-aaaaaaaa-1111-2222-3333-444444444444"
MIG_B = "MIG-bbbbbbbb-1111-2222-3333-444444444444"


def devices() -> list[dict]:
    """A whole A100 40GB and an A100 80GB split into two MIG 1g.10gb slices."""
    mig = {"profile": "1g.10gb", "memory_total": 10 * GiB, "memory_used": GiB}
    return [
        fake_nvml.a100(GPU0),
        {
            "name": "NVIDIA A100-SXM4-80GB",
            "uuid": GPU1,
            "memory_total": 80 * GiB,
            "utilization": 50,
            "mig": [
                dict(mig, uuid=MIG_A, processes=[{"pid": "self", "used": 512 << 20}]),
                dict(mig, uuid=MIG_B),
            ],
        },
    ]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``pynvml`` is the fake, configured in-process with ``devices()``."""
    fake_nvml.configure({"devices": devices()})
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    nvml.reset()
    yield
    fake_nvml.configure(None)
    nvml.reset()


def test_own_device_figures_for_gpu_and_mig(fake: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU0)
    usage = nvml.device_usage()
    assert usage == {
        "device": GPU0,
        "name": "NVIDIA A100-SXM4-40GB",
        "mig": False,
        "memory_used": 3 * GiB,
        "memory_total": 40 * GiB,
        "utilization": 37,
        "process_memory": 2 * GiB,  # the fake's "self" process is this one
    }
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MIG_A},{MIG_B}")  # the first entry counts
    usage = nvml.device_usage()
    assert usage is not None
    assert usage["mig"] and usage["utilization"] is None  # unsupported on MIG, not an error
    assert usage["process_memory"] == 512 << 20 and usage["memory_total"] == 10 * GiB
    assert nvml.device_usage("1")["name"] == "NVIDIA A100-SXM4-80GB"  # by index
    assert nvml.device_usage(MIG_B, pids=[1])["process_memory"] == 0  # other processes only
    assert nvml.device_usage("7") is None and nvml.device_usage("sim0") is None


def test_list_devices_gives_mig_slices_with_profiles(fake: None) -> None:
    found = nvml.list_devices()
    assert [(d["index"], d["uuid"], d["mig_enabled"]) for d in found] == [
        (0, GPU0, False),
        (1, GPU1, True),
    ]
    assert found[0]["mig_devices"] == [] and found[0]["memory_total"] == 40 * GiB
    assert [(m["profile"], m["uuid"]) for m in found[1]["mig_devices"]] == [
        ("1g.10gb", MIG_A),
        ("1g.10gb", MIG_B),
    ]
    assert nvml.mig_profile("NVIDIA H100 80GB HBM3 MIG 3g.40gb") == "3g.40gb"


def test_no_nvml_answers_none_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as without nvidia-ml-py
    nvml.reset()
    assert not nvml.available() and nvml.device_usage() is None and nvml.list_devices() == []
    fake_nvml.configure({"driver": False, "devices": devices()})  # module there, no driver
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    nvml.reset()
    try:
        assert nvml.device_usage("0") is None and nvml.list_devices() == []
    finally:
        fake_nvml.configure(None)
        nvml.reset()


def test_probe_command_prints_one_json_line(tmp_path: Path) -> None:
    env = dict(os.environ, **fake_nvml.write_config(tmp_path / "nvml.json", devices()))
    cmd = [sys.executable, "-m", "gpu_kernel", "probe"]
    out = subprocess.run(cmd, env=env, capture_output=True, check=True).stdout.decode()
    assert len(out.strip().splitlines()) == 1
    data = json.loads(out)
    assert data["ok"] and data["nvml"] and len(data["devices"]) == 2
    assert data["devices"][1]["mig_devices"][0]["name"] == "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    env.pop(fake_nvml.ENV)
    env["PYTHONPATH"] = str(tmp_path)  # a pynvml that cannot load: as on a host without driver
    (tmp_path / "pynvml.py").write_text("raise OSError('libnvidia-ml.so.1: cannot open')\n")
    data = json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)
    assert data["nvml"] is False and data["devices"] == []


def test_slots_from_probe_kinds_and_mig() -> None:
    host = HostConfig(
        name="gpu1",
        address="x",
        auto_gpus=True,
        kind_map=(("NVIDIA A100-SXM4-40GB", "a100"),),
    )
    data = {"nvml": True, "devices": json.loads(json.dumps(_probe_devices()))}
    slots = slots_from_probe(host, data)
    assert [(s.id, s.kind, s.device, s.host, s.simulated) for s in slots] == [
        ("gpu1/0", "a100", GPU0, "gpu1", False),
        ("gpu1/1.0", "mig-1g.10gb", MIG_A, "gpu1", False),  # the MIG GPU itself is no slot
        ("gpu1/1.1", "mig-1g.10gb", MIG_B, "gpu1", False),
    ]
    plain = HostConfig(
        name="gpu2",
        address="x",
        kind_map=(("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "small"),),
    )
    kinds = [s.kind for s in slots_from_probe(plain, data)]
    assert kinds == ["nvidia-a100-sxm4-40gb", "small", "small"]
    with pytest.raises(DiscoveryError, match="NVML does not answer") as e:
        slots_from_probe(plain, {"nvml": False, "devices": []})
    assert "nvidia-ml-py" in e.value.hint
    with pytest.raises(DiscoveryError, match="found no GPU"):
        slots_from_probe(plain, {"nvml": True, "devices": []})


def _probe_devices() -> list[dict]:
    fake_nvml.configure({"devices": devices()})
    saved = sys.modules.get("pynvml")
    sys.modules["pynvml"] = fake_nvml  # type: ignore[assignment]
    nvml.reset()
    try:
        return nvml.list_devices()
    finally:
        if saved is None:
            sys.modules.pop("pynvml", None)
        else:
            sys.modules["pynvml"] = saved
        fake_nvml.configure(None)
        nvml.reset()


def python_with_env(path: Path, **env: str) -> str:
    """A wrapper interpreter for a test host: exports ``env``, then runs this Python."""
    exports = "".join(f"export {k}='{v}'\n" for k, v in env.items())
    path.write_text(f'#!/bin/sh\n{exports}exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


def host_config(host: TestHost, keys: ClientKeys, python: str, **kw: object) -> HostConfig:
    """``host`` as the broker reaches it: its fencing account, whose key runs only the fencing
    command with ``python`` (the admin's forced command names the host's interpreter)."""
    name = f"fence-{abs(hash(python))}"
    fence_key = keys.dir / name
    if not fence_key.exists():
        fence_key = keys.forced_key(name, f"{python} -m gpu_kernel fence --as-self")
    return HostConfig(
        name=host.name,
        address="127.0.0.1",
        port=host.port,
        user=host.user,
        known_hosts=str(keys.known_hosts),
        python=python,
        auto_gpus=True,
        fence_user=host.user,
        fence_key_file=str(fence_key),
        **kw,  # type: ignore[arg-type]
    )


def test_discover_slots_over_ssh(
    ssh_hosts: list[TestHost], client_keys: ClientKeys, tmp_path: Path
) -> None:
    host = ssh_hosts[0]
    config = fake_nvml.write_config(tmp_path / "nvml.json", devices())
    python = python_with_env(tmp_path / "python-gpu", **config)
    slots = discover_slots(host_config(host, client_keys, python))
    assert [(s.id, s.kind, s.device) for s in slots] == [
        (f"{host.name}/0", "nvidia-a100-sxm4-40gb", GPU0),
        (f"{host.name}/1.0", "mig-1g.10gb", MIG_A),
        (f"{host.name}/1.1", "mig-1g.10gb", MIG_B),
    ]

    no_driver = fake_nvml.write_config(tmp_path / "none.json", [], driver=False)
    python = python_with_env(tmp_path / "python-nogpu", **no_driver)
    with pytest.raises(DiscoveryError, match=f"host {host.name} has gpus = .auto. but NVML"):
        discover_slots(host_config(host, client_keys, python))

    missing_python = host_config(host, client_keys, "/nonexistent/python3")
    with pytest.raises(DiscoveryError, match=f"the fencing command on {host.name} gave no") as e:
        discover_slots(missing_python)
    assert "gpu_kernel fence" in e.value.hint  # how to set up the forced command

    other = ssh_hosts[1]
    missing = str(tmp_path / "missing-key")
    bad_key = dataclasses.replace(
        host_config(other, client_keys, python), fence_key_file=missing
    )
    with pytest.raises(DiscoveryError, match=f"cannot probe the GPUs of host {other.name}"):
        discover_slots(bad_key)
