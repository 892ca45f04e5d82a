"""`jupyter shared-gpu install` and the kernelspec's provisioner config, as a user meets them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from provisioner.install import main
from provisioner.settings import ProvisionerSettings, SettingsError


def test_install_writes_a_shared_gpu_kernelspec(tmp_path, capsys):
    rc = main(
        [
            "install",
            "--prefix",
            str(tmp_path),
            "--broker-url",
            "http://127.0.0.1:9999/",
            "--slot-kind",
            "mig-1g.10gb",
            "--lease-timeout",
            "2m",
        ]
    )
    assert rc == 0
    spec_file = tmp_path / "share" / "jupyter" / "kernels" / "shared-gpu" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    assert spec["display_name"] == "Shared GPU"
    stanza = spec["metadata"]["kernel_provisioner"]
    assert stanza["provisioner_name"] == "shared-gpu-provisioner"
    assert stanza["config"]["broker_url"] == "http://127.0.0.1:9999/"
    assert stanza["config"]["slot_kind"] == "mig-1g.10gb"
    assert "token" not in stanza["config"]  # only where to find it
    settings = ProvisionerSettings.from_config(stanza["config"])
    assert settings.lease_timeout == 120.0
    assert settings.broker_url == "http://127.0.0.1:9999"
    assert "Installed kernelspec 'shared-gpu'" in capsys.readouterr().out
    # jupyter_client finds it and knows the provisioner through the installed entry point
    ksm = KernelSpecManager(kernel_dirs=[str(spec_file.parent.parent)])
    assert ksm.get_kernel_spec("shared-gpu").display_name == "Shared GPU"
    # the launcher card's logo: the resources JupyterLab looks for, an SVG and a 64x64 PNG
    svg = (spec_file.parent / "logo-svg.svg").read_text()
    assert svg.startswith("<svg") and 'viewBox="0 0 64 64"' in svg
    png = (spec_file.parent / "logo-64x64.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (64).to_bytes(4, "big") * 2


def test_install_refuses_a_bad_broker_url_and_writes_nothing(tmp_path, capsys):
    rc = main(["install", "--prefix", str(tmp_path), "--broker-url", "127.0.0.1:8765"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "broker_url must be an http(s) URL" in err
    assert "Traceback" not in err
    assert not (tmp_path / "share").exists()


def test_jupyter_shared_gpu_help_explains_each_option():
    out = subprocess.run(
        [sys.executable, "-m", "provisioner.install", "install", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--broker-url",
        "--slot-kind",
        "--token-env",
        "--token-file",
        "--lease-timeout",
        "--display-name",
        "--user",
        "--sys-prefix",
    ):
        assert option in out


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"broker_url": "http://b:1", "brokr": 1}, "unknown key 'brokr'"),
        ({"broker_url": "http://b:1", "slot_knd": "a100"}, "did you mean 'slot_kind'?"),
        ({}, "broker_url must be an http(s) URL"),
        ({"broker_url": "http://b:1", "lease_timeout": "ten minutes"}, "is not a duration"),
        ({"broker_url": "http://b:1", "lease_timeout": "0s"}, "longer than zero"),
        ({"broker_url": "http://b:1", "slot_kind": "a 100"}, "slot_kind 'a 100'"),
    ],
)
def test_bad_provisioner_config_names_the_key_and_the_fix(config, message):
    with pytest.raises(SettingsError) as info:
        ProvisionerSettings.from_config(config, "My GPU")
    text = str(info.value)
    assert message in text
    assert "My GPU" in text
    assert "jupyter shared-gpu install" in text
